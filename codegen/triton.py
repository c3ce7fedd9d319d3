"""Printing level-2 kernels as Triton source, in the style of the Triton tutorials: parameters
grouped as pointers, sizes, strides, scalars, then UPPER_CASE constexpr block sizes; banner
comments from the lowering; one statement per line. A table maps each tile op to its text;
nothing here decides anything.
"""
from __future__ import annotations

import math

from ..ir.tile import Comment, For, Let, Store, TExpr, TileKernel
from ..ir.types import DType

TL_DTYPES = {
    DType.f32: "tl.float32", DType.f16: "tl.float16", DType.bf16: "tl.bfloat16",
    DType.f8e4m3: "tl.float8e4nv", DType.f64: "tl.float64", DType.i64: "tl.int64", DType.i32: "tl.int32",
    DType.i8: "tl.int8", DType.u8: "tl.uint8", DType.bool: "tl.int1",
}

# op -> (precedence, text template); operands are {0}, {1}, ...
INFIX = {
    "or": (6, "{0} | {1}"), "and": (8, "{0} & {1}"), "shr": (9, "{0} >> {1}"), "shl": (9, "{0} << {1}"),
    "lt": (5, "{0} < {1}"), "le": (5, "{0} <= {1}"), "gt": (5, "{0} > {1}"), "ge": (5, "{0} >= {1}"),
    "eq": (5, "{0} == {1}"), "ne": (5, "{0} != {1}"),
    "add": (10, "{0} + {1}"), "sub": (10, "{0} - {1}"),
    "mul": (11, "{0} * {1}"), "truediv": (11, "{0} / {1}"), "floordiv": (11, "{0} // {1}"), "mod": (11, "{0} % {1}"),
}
CALLS = {
    "exp": "tl.exp", "exp2": "tl.exp2", "log": "tl.log", "log2": "tl.log2", "sqrt": "tl.sqrt",
    "rsqrt": "tl.rsqrt", "sin": "tl.sin", "cos": "tl.cos", "abs": "tl.abs", "erf": "tl.erf",
    "floor": "tl.floor", "sigmoid": "tl.sigmoid", "maximum": "tl.maximum", "minimum": "tl.minimum",
    "where": "tl.where", "cdiv": "tl.cdiv",
}
REDUCE = {"sum": "tl.sum", "max": "tl.max", "min": "tl.min"}
ARGREDUCE = {"max": "tl.argmax", "min": "tl.argmin"}
NONASSOC = {"sub", "truediv", "floordiv", "mod", "and", "or", "shr", "shl"}  # & and | keep their grouping (see tile_builder.binop)
PRIMARY = 20


def const_text(v, dtype) -> str:
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, float):
        if math.isinf(v):
            return 'float("inf")' if v > 0 else 'float("-inf")'
        if math.isnan(v):
            return 'float("nan")'
        return repr(v)
    return str(v)


def expr(e: TExpr) -> tuple[int, str]:
    """(precedence, text) of an expression."""
    op, a = e.op, e.args
    if op in ("var", "arg"):
        return PRIMARY, a[0]
    if op == "const":
        t = const_text(a[0], e.dtype)
        return (12 if t.startswith("-") else PRIMARY), t
    if op == "program_id":
        return PRIMARY, f"tl.program_id(axis={a[0]})"
    if op == "arange":
        return PRIMARY, f"tl.arange(0, {a[0]})"
    if op in INFIX:
        prec, tmpl = INFIX[op]
        left = wrap(a[0], prec, prec == 5)
        right = wrap(a[1], prec + (1 if op in NONASSOC or prec == 5 else 0), prec == 5)
        return prec, tmpl.format(left, right)
    if op == "neg":
        return 12, "-" + wrap(a[0], 12)
    if op == "not":
        return 12, "~" + wrap(a[0], 12)
    if op in ("maximum", "minimum") and e.dtype.is_float:
        # torch.maximum semantics: a NaN operand gives NaN (Triton's default returns the other)
        return PRIMARY, f"{CALLS[op]}({text(a[0])}, {text(a[1])}, propagate_nan=tl.PropagateNan.ALL)"
    if op in CALLS:
        return PRIMARY, f"{CALLS[op]}({', '.join(text(x) for x in a)})"
    if op == "cast":
        if a[0].shape == ():
            # scalars may be constexprs (Triton specialises integer arguments equal to 1)
            return PRIMARY, f"tl.cast({text(a[0])}, {TL_DTYPES[a[1]]})"
        return PRIMARY, f"{wrap(a[0], PRIMARY)}.to({TL_DTYPES[a[1]]})"
    if op == "bitcast":
        return PRIMARY, f"{wrap(a[0], PRIMARY)}.to({TL_DTYPES[a[1]]}, bitcast=True)"
    if op == "load":
        ptr, mask, other = a
        if mask is None:
            return PRIMARY, f"tl.load({text(ptr)})"
        return PRIMARY, f"tl.load({text(ptr)}, mask={text(mask)}, other={const_text(other, None)})"
    if op == "expand_dims":
        x, axis = a
        if len(x.shape) == 1:
            return PRIMARY, f"{wrap(x, PRIMARY)}[{':, None' if axis in (1, -1) else 'None, :'}]"
        return PRIMARY, f"tl.expand_dims({text(x)}, {axis})"
    if op == "broadcast_to":
        return PRIMARY, f"tl.broadcast_to({text(a[0])}, {shape_text(a[1])})"
    if op == "full":
        shape, value = a
        return PRIMARY, f"tl.full({shape_text(shape)}, {const_text(value, e.dtype)}, dtype={TL_DTYPES[e.dtype]})"
    if op == "dot":
        prec = f', input_precision="{a[3]}"' if a[3] else ""
        # an i32 accumulator is named: Triton 3.6 asserts the accumulator's dtype is out_dtype
        # (default float32), 3.9 infers it
        out = f", out_dtype={TL_DTYPES[e.dtype]}" if e.dtype != DType.f32 else ""
        imprecise = f", max_num_imprecise_acc={a[4]}" if a[4] is not None else ""
        return PRIMARY, f"tl.dot({text(a[0])}, {text(a[1])}, {text(a[2])}{prec}{out}{imprecise})"
    if op == "reduce":
        x, axis, kind = a
        return PRIMARY, f"{REDUCE[kind]}({text(x)}, axis={axis}, keep_dims=True)"
    if op == "argreduce":
        x, axis, kind = a
        return PRIMARY, f"{ARGREDUCE[kind]}({text(x)}, axis={axis}, keep_dims=True)"
    if op == "cumsum":
        return PRIMARY, f"tl.cumsum({text(a[0])}, axis={a[1]})"
    if op == "reshape":
        return PRIMARY, f"tl.reshape({text(a[0])}, {shape_text(a[1])})"
    if op == "trans":
        return PRIMARY, f"tl.trans({text(a[0])})"
    raise KeyError(f"no Triton text for tile op {op!r}")


def shape_text(shape) -> str:
    inner = ", ".join(str(s) for s in shape)
    return f"({inner},)" if len(shape) == 1 else f"({inner})"


def wrap(e: TExpr, prec: int, is_compare_ctx: bool = False) -> str:
    p, t = expr(e)
    return f"({t})" if p < prec or (is_compare_ctx and p == 5) else t


def text(e: TExpr) -> str:
    return expr(e)[1]


def body(stmts, indent: int) -> list[str]:
    pad = "    " * indent
    out = []
    for s in stmts:
        if isinstance(s, Comment):
            out.append(f"{pad}# -- {s.text} --")
        elif isinstance(s, Let):
            out.append(f"{pad}{s.var.name} = {text(s.value)}")
        elif isinstance(s, Store):
            mask = f", mask={text(s.mask)}" if s.mask is not None else ""
            fn = "tl.atomic_add" if s.atomic_add else "tl.store"
            out.append(f"{pad}{fn}({text(s.ptr)}, {text(s.value)}{mask})")
        elif isinstance(s, For):
            step = f", {text(s.step)}"
            out.append(f"{pad}for {s.var.name} in range({text(s.start)}, {text(s.stop)}{step}):")
            out.extend(body(s.body, indent + 1) or [f"{pad}    pass"])
        else:
            raise TypeError(s)
    return out


KIND_TITLES = {"ptr": "pointers", "size": "sizes", "stride": "strides", "scalar": "scalars"}


def render_kernel(k: TileKernel) -> str:
    lines = ["@triton.jit", f"def {k.name}("]
    last = None
    for p in k.params:
        if p.kind != last:
            lines.append(f"    # {KIND_TITLES[p.kind]}")
            last = p.kind
        lines.append(f"    {p.name},")
    if k.tunables:
        lines.append("    # block sizes")
        for t in k.tunables:
            lines.append(f"    {t.name}: tl.constexpr,")
    lines.append("):")
    if k.doc:
        lines.append(f'    """{k.doc}"""')
    lines.extend(body(k.body, 1))
    return "\n".join(lines)


def render_module(kernels, header: str = "") -> str:
    parts = []
    if header:
        parts.extend(f"# {line}" for line in header.splitlines())
    parts += ["import triton", "import triton.language as tl", ""]
    for k in kernels:
        parts += ["", render_kernel(k), ""]
    return "\n".join(parts).rstrip() + "\n"


