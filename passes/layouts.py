"""Pass: turn weight-layout annotations into packed-weight parameters and the nodes that read
them (DESIGN.md, pass 2).

Pipeline position: after canonicalisation, before the pattern rewrites and fusion; it runs
when weights are bound (``mod.op.bind(...)``), for the layout chosen for each weight.

Each rule replaces a dense weight ``w: [N, K]`` by its packed tensors (runtime/packing.py) and
either rebuilds the dense value from them (dequantising prologues, which fusion puts into the
GEMM's B loads: the GEMM reads the packed bytes) or replaces the contraction that uses it:

    @quant(int8)          w' = cast(cast(q, f32) * scale[:, None], dt)
    @quant(int4, group=G) w' = (cast(unpack_int4(packed), dt) - zero') * scale'   (', the group's, in dt)
    @quant(fp8)           w' = cast(fp8_bits(bits) * scale[:, None], dt)
    @sparse(2:4)          w' = unpack_24(values, meta)
    @quant(int8, act=int8) x @ w.T -> (matmul_i32(q8(x), q.T) * sx) * scale      (x per row)
    @quant(fp8, act=fp8)   x @ w.T -> (matmul_f8(e4m3(x), bits.T) * sx) * scale  (x per row)
                           (both differentiated straight through: as x @ w'.T, w' dequantised)
    @sparse(block=B)      x @ w.T -> bsr_matmul(x, blocks, col_idx, row_ptr)
    @lowrank(...)         x @ w.T -> lowrank_matmul(x, v, u)

The last four need the weight used as ``x @ w.T``; any other use is a SpecError there.
"""
from __future__ import annotations

from ..ir.diagnostics import SpecError
from ..ir.dims import Sym, div
from ..ir.graph import Graph, Layout, Node, Param, Value
from ..ir.types import DType, TensorType
from .canonicalize import dead_code
from .context import PassContext
from ..ir.emit import Emitter

CONTRACTION_LAYOUTS = ("w8a8", "block", "lowrank")

# the largest magnitude of each activation quantization (the row's max |x| maps to it)
ACT_QMAX = {"int8": 127.0, "fp8": 448.0}


def layout_tag(layout: Layout) -> str:
    """A short identifier for op names: int4g128, int8, w8a8, fp8, w8a8fp8, s24, bsr32, lr16,
    lrtol."""
    kw = dict(layout.kwargs)
    if layout.kind == "quant":
        q = layout.args[0]
        if kw.get("act"):
            return "w8a8" if q == "int8" else f"w8a8{q}"
        return f"int4g{kw['group']}" if q == "int4" else q
    if layout.kind == "sparse":
        return f"bsr{kw['block']}" if "block" in kw else "s24"
    if layout.kind == "lowrank":
        return f"lr{kw['rank']}" if "rank" in kw else "lrtol"
    return "dense"


def rule_of(layout: Layout) -> str:
    kw = dict(layout.kwargs)
    if layout.kind == "quant" and kw.get("act"):
        return "w8a8"
    if layout.kind == "sparse" and "block" in kw:
        return "block"
    if layout.kind == "lowrank":
        return "lowrank"
    return "prologue"


def packed_params(p: Param, layout: Layout) -> list[tuple[str, TensorType]]:
    """(name, type) of the packed tensors that replace the weight parameter p."""
    t = p.value.type
    N, K = t.shape
    dt = t.dtype
    name = p.name
    kw = dict(layout.kwargs)
    if layout.kind == "quant" and layout.args[0] == "int8":
        return [(f"{name}_q", TensorType(DType.i8, (N, K))), (f"{name}_scale", TensorType(DType.f32, (N,)))]
    if layout.kind == "quant" and layout.args[0] == "int4":
        g = kw["group"]
        return [(f"{name}_packed", TensorType(DType.u8, (N, div(K, 2)))),
                (f"{name}_scale", TensorType(dt, (N, div(K, g)))),
                (f"{name}_zero", TensorType(DType.u8, (N, div(K, g))))]
    if layout.kind == "quant" and layout.args[0] == "fp8":
        return [(f"{name}_bits", TensorType(DType.u8, (N, K))), (f"{name}_scale", TensorType(DType.f32, (N,)))]
    if layout.kind == "sparse" and "block" not in kw:
        return [(f"{name}_values", TensorType(dt, (N, div(K, 2)))),
                (f"{name}_meta", TensorType(DType.u8, (N, Sym.of(f"{name}_meta_cols"))))]
    if layout.kind == "sparse":
        b = kw["block"]
        nnz = Sym.of(f"{name}_blocks")
        return [(f"{name}_blocks", TensorType(dt, (nnz, b, b))), (f"{name}_col_idx", TensorType(DType.i32, (nnz,))),
                (f"{name}_row_ptr", TensorType(DType.i32, (Sym.of(f"{name}_row_blocks_plus_1"),)))]
    if layout.kind == "lowrank":
        r = Sym.of(f"{name}_rank")
        return [(f"{name}_u", TensorType(dt, (N, r))), (f"{name}_v", TensorType(dt, (r, K)))]
    raise ValueError(layout)


def dequantised(e: Emitter, p: Param, layout: Layout, packed: dict[str, Value]) -> Value:
    """The dense weight rebuilt from packed tensors, for the prologue rules."""
    t = p.value.type
    N, K = t.shape
    dt = t.dtype
    name = p.name
    kw = dict(layout.kwargs)
    if layout.kind == "sparse":
        return e("unpack_24", [packed[f"{name}_values"], packed[f"{name}_meta"]])
    q = layout.args[0]
    if q in ("int8", "fp8"):
        src = packed[f"{name}_q"] if q == "int8" else packed[f"{name}_bits"]
        vals = e("cast", [src], {"dtype": DType.f32}) if q == "int8" else e("fp8_bits", [src])
        scale = e("reshape", [packed[f"{name}_scale"]], {"shape": (N, 1)})
        return e("cast", [e("mul", [vals, scale])], {"dtype": dt})
    # in the weight's dtype, which is exact here: q - zero is an integer in [-15, 15] and its
    # product with the scale has at most 4 + 11 significant bits, so rounding that product once
    # to dt (f16, bf16, f32) is what rounding the f32 product to dt gives
    g = kw["group"]
    q4 = e("cast", [e("unpack_int4", [packed[f"{name}_packed"]])], {"dtype": dt})

    def per_group(v: Value) -> Value:   # [N, K/G] -> [N, K]: each group's value repeated G times
        v = e("reshape", [v], {"shape": (N, div(K, g), 1)})
        v = e("expand", [v], {"shape": (N, div(K, g), g)})
        v = e("reshape", [v], {"shape": (N, K)})
        return v if v.type.dtype == dt else e("cast", [v], {"dtype": dt})
    zero = per_group(packed[f"{name}_zero"])
    scale = per_group(packed[f"{name}_scale"])
    return e("mul", [e("sub", [q4, zero]), scale])


def apply_layouts(g: Graph, chosen: dict[str, Layout], shapes: dict | None = None,
                  ctx: PassContext | None = None) -> Graph:
    """``chosen``: weight parameter name -> the concrete layout it is packed with;
    ``shapes``: packed tensor name -> its actual shape (data-dependent sizes become integers)."""
    shapes = shapes or {}
    if not chosen:
        return g
    users = g.users()
    params: list[Param] = []
    prologue = Emitter(g.span)
    remap: dict[Value, Value] = {}
    replace_mm: dict[Node, tuple[str, Param, Layout, dict]] = {}
    for p in g.params:
        if p.name not in chosen:
            params.append(p)
            continue
        layout = chosen[p.name]
        packed = {}
        for name, t in packed_params(p, layout):
            if name in shapes:
                t = TensorType(t.dtype, tuple(int(d) for d in shapes[name]))
            v = Value(t, name)
            packed[name] = v
            params.append(Param(name, v, span=p.span))
        rule = rule_of(layout)
        if rule == "prologue":
            remap[p.value] = dequantised(prologue, p, layout, packed)
            continue
        for mm in contraction_uses(g, p, layout, users):
            replace_mm[mm] = (rule, p, layout, packed)
    nodes: list[Node] = list(prologue.nodes)
    for n in g.nodes:
        ins = tuple(remap.get(v, v) for v in n.inputs)
        if n in replace_mm:
            rule, p, layout, packed = replace_mm[n]
            e = Emitter(n.span)
            x = ins[0]
            if rule == "block":
                e("bsr_matmul", [x, packed[f"{p.name}_blocks"], packed[f"{p.name}_col_idx"],
                                 packed[f"{p.name}_row_ptr"]], {"n": p.value.type.shape[0]}, out=n.out)
            elif rule == "lowrank":
                e("lowrank_matmul", [x, packed[f"{p.name}_v"], packed[f"{p.name}_u"]], out=n.out)
            else:
                _w8a8(e, x, p, layout, packed, n.out)
            nodes.extend(e.nodes)
            continue
        nodes.append(n if ins == n.inputs else Node(n.op, ins, n.attrs, n.outputs, n.span))
    tag = "_".join(f"{name}_{layout_tag(lay)}" for name, lay in chosen.items())
    out = g.replace(name=f"{g.name}__{tag}", params=tuple(params), nodes=tuple(dead_code(nodes, g.outputs)))
    return out


def _is_wt(u: Node) -> bool:
    """w.T: a transpose of the two axes, or the permutation [1, 0]."""
    return (u.op == "transpose" and (u.attrs["a"], u.attrs["b"]) == (0, 1)) or \
        (u.op == "permute" and tuple(u.attrs["perm"]) == (1, 0))


def contraction_uses(g: Graph, p: Param, layout: Layout, users=None) -> list[Node]:
    """The matmuls reading p as ``x @ p.T``; any other use of p is a SpecError there (block
    sparsity, low rank and act= replace the contraction itself)."""
    users = users if users is not None else g.users()
    out = []
    for u in users.get(p.value, []):
        mms = users.get(u.out, []) if _is_wt(u) else []
        if not mms or any(m.op != "matmul" or m.inputs[1] is not u.out or m.inputs[0].type.rank < 1 for m in mms):
            raise SpecError(f"'{p.name}' with {layout} can only be used as x @ {p.name}.T", u.span or p.span,
                            "this layout changes the contraction itself; use the weight only in matmuls")
        out.extend(mms)
    return out


def check_layout_uses(g: Graph, ctx: PassContext | None = None) -> Graph:
    """Validation pass (after canonicalisation): layouts that replace the contraction are used
    only as x @ w.T. Makes `opforge check` and compile report misuse, not only bind."""
    users = g.users()
    for p in g.params:
        if p.layout is not None and p.layout.kind != "auto" and rule_of(p.layout) != "prologue":
            contraction_uses(g, p, p.layout, users)
    return g


def _w8a8(e: Emitter, x: Value, p: Param, layout: Layout, packed: dict[str, Value], out: Value) -> None:
    """Activations quantized per row at run time: sx = max|x| / ACT_QMAX, then xq = round(x / sx) to
    int8, or x / sx rounded to e4m3 (as bits) for act=fp8; the product of the two quantized
    operands is exact, accumulated in i32 (int8) or f32 (fp8); both scales in the epilogue."""
    act = dict(layout.kwargs)["act"]
    xf = e("cast", [x], {"dtype": DType.f32})
    sx = e("div", [e("max", [e("abs", [xf])], {"axis": x.type.rank - 1, "keepdim": True}),
                   e.const(ACT_QMAX[act], DType.f32)])
    sx = e("maximum", [sx, e.const(1e-30, DType.f32)], name="act_scale")
    if act == "int8":
        xq = e("cast", [e("round", [e("div", [xf, sx])])], {"dtype": DType.i8}, name="act_q")
        acc = _int8_products(e, xq, e("transpose", [packed[f"{p.name}_q"]], {"a": 0, "b": 1}))
    else:
        xq = e("fp8_encode", [e("div", [xf, sx])], name="act_q")
        acc = e("matmul_f8", [xq, e("transpose", [packed[f"{p.name}_bits"]], {"a": 0, "b": 1})])
    y = e("mul", [e("mul", [acc, sx]), packed[f"{p.name}_scale"]])
    # differentiated straight through the activation quantization: as x @ w'.T with w' the
    # dequantised weight, so dX = dY @ w' (one GEMM dequantising in its loads); the shadow is
    # never computed in the forward (passes/straight_through.py)
    shadow = e("matmul", [x, e("transpose", [dequantised(e, p, layout, packed)], {"a": 0, "b": 1})])
    y = e("straight_through", [e("cast", [shadow], {"dtype": DType.f32}), y])
    e("cast", [y], {"dtype": out.type.dtype}, out=out)


# The most terms an i32 sum of int8 x int8 products holds without wrapping (127 * 127 each),
# rounded down to a multiple of 128 so the chunks stay whole K blocks.
I32_PRODUCTS_MAX = ((2 ** 31 - 1) // (127 * 127)) // 128 * 128


def _int8_products(e: Emitter, xq: Value, wq_t: Value) -> Value:
    """xq @ wq_t in f32, exact per chunk: one i32 matmul per chunk of at most I32_PRODUCTS_MAX
    along K (a longer i32 sum could wrap), the chunks' sums added in f32."""
    K = xq.type.shape[-1]
    if not isinstance(K, int):
        raise SpecError(f"@quant(int8, act=int8) needs the contraction size bound to a number, got {K}", e.span)
    acc = None
    for start in range(0, max(K, 1), I32_PRODUCTS_MAX):
        stop = min(K, start + I32_PRODUCTS_MAX)
        a, b = xq, wq_t
        if (start, stop) != (0, K):
            r = xq.type.rank
            a = e("slice", [xq], {"starts": (0,) * (r - 1) + (start,), "stops": tuple(xq.type.shape[:-1]) + (stop,),
                                  "steps": (1,) * r})
            b = e("slice", [wq_t], {"starts": (start, 0), "stops": (stop, wq_t.type.shape[1]), "steps": (1, 1)})
        part = e("cast", [e("matmul_i32", [a, b])], {"dtype": DType.f32})
        acc = part if acc is None else e("add", [acc, part])
    return acc
