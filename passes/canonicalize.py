"""Pass: canonicalise a graph.

Pipeline position: after inlining, before layouts and fusion; later passes may assume its
result. Rewrites, each a small rule in RULES:
- fold constants: scalar primitives whose operands are all literals, and symbolic sizes that
  are plain integers;
- drop no-ops: a cast to the same dtype, a reshape/expand to the same shape, a full slice,
  transposing twice, a permutation that keeps every axis;
- shorten cast chains: cast(cast(x, A), B) is cast(x, B) when A holds every value of x's dtype
  exactly (f16 -> f32 -> f16 is x itself);
- common subexpressions (a spec may write cast(x, f32) three times);
- dead nodes.
"""
from __future__ import annotations

import math
from typing import Callable


from ..ir import registry
from ..ir.graph import Attrs, Graph, Node, Value
from ..ir.torch_dtypes import RefCtx
from ..ir.types import DType, ScalarType
from .context import PassContext

# dtype -> the dtypes that hold all of its values exactly
WIDENS = {
    DType.f16: {DType.f32, DType.f64},
    DType.bf16: {DType.f32, DType.f64},
    DType.f8e4m3: {DType.f16, DType.bf16, DType.f32, DType.f64},
    DType.f32: {DType.f64},
    DType.i8: {DType.i32, DType.i64, DType.f16, DType.bf16, DType.f32},
    DType.u8: {DType.i32, DType.i64, DType.f16, DType.bf16, DType.f32},
    DType.i32: {DType.i64},
    DType.bool: {DType.i8, DType.u8, DType.i32, DType.i64, DType.f16, DType.bf16, DType.f32},
}


class Rewriter:
    """Walks nodes in order with a value remapping; rules return a replacement value or None."""

    def __init__(self, g: Graph):
        self.g = g
        self.remap: dict[Value, Value] = {}
        self.nodes: list[Node] = []
        self.producer: dict[Value, Node] = {}
        self.consts: dict[Value, object] = {}

    def emit(self, n: Node) -> None:
        self.nodes.append(n)
        for v in n.outputs:
            self.producer[v] = n
        if n.op == "const":
            self.consts[n.out] = n.attrs["value"]

    def new_node(self, op: str, inputs, attrs: dict, like: Node) -> Value:
        out = Value(like.out.type, like.out.name)
        self.emit(Node(op, tuple(inputs), Attrs(attrs), (out,), like.span))
        return out


Rule = Callable[[Rewriter, Node], "Value | None"]


def fold_constants(rw: Rewriter, n: Node):
    if n.op == "dim" and isinstance(n.attrs["size"], int):
        return rw.new_node("const", [], {"value": n.attrs["size"], "dtype": DType.i64}, n)
    prim = registry.get(n.op)
    if prim.kind is not registry.Kind.POINTWISE or not n.inputs or len(n.outputs) != 1:
        return None
    if not all(v in rw.consts for v in n.inputs) or not isinstance(n.out.type, ScalarType):
        return None
    ctx = RefCtx()
    args = [ctx.tensor(rw.consts[v], v.type.dtype) for v in n.inputs]
    r = prim.reference(ctx, args, dict(n.attrs), [n.out.type], [v.type for v in n.inputs])
    value = r.item()
    if n.out.type.dtype.is_float:
        value = float(value)
    elif n.out.type.dtype.is_bool:
        value = bool(value)
    else:
        value = int(value)
    return rw.new_node("const", [], {"value": value, "dtype": n.out.type.dtype}, n)


def drop_noops(rw: Rewriter, n: Node):
    x = n.inputs[0] if n.inputs else None
    if n.op == "cast" and x.type.dtype == n.attrs["dtype"]:
        return x
    if n.op in ("reshape", "expand") and tuple(x.type.shape) == tuple(n.out.type.shape):
        return x
    if n.op == "slice" and all(a == 0 and b == d and s == 1 for a, b, s, d in
                               zip(n.attrs["starts"], n.attrs["stops"], n.attrs["steps"], x.type.shape)):
        return x
    if n.op == "permute" and n.attrs["perm"] == tuple(range(len(n.attrs["perm"]))):
        return x
    if n.op == "transpose":
        p = rw.producer.get(x)
        if p is not None and p.op == "transpose" and (p.attrs["a"], p.attrs["b"]) == (n.attrs["a"], n.attrs["b"]):
            return p.inputs[0]
    return None


def shorten_casts(rw: Rewriter, n: Node):
    if n.op != "cast":
        return None
    p = rw.producer.get(n.inputs[0])
    if p is None or p.op != "cast":
        return None
    src = p.inputs[0]
    mid = p.attrs["dtype"]
    if mid not in WIDENS.get(src.type.dtype, ()):
        return None
    if n.attrs["dtype"] == src.type.dtype:
        return src
    return rw.new_node("cast", [src], dict(n.attrs), n)


RULES: list[Rule] = [fold_constants, drop_noops, shorten_casts]


def _attr_key(v):
    if isinstance(v, float):
        return ("f", repr(v)) if not math.isnan(v) else ("nan",)
    if isinstance(v, (tuple, list)):
        return tuple(_attr_key(x) for x in v)
    return v


def canonicalize(g: Graph, ctx: PassContext) -> Graph:
    rw = Rewriter(g)
    seen: dict[tuple, Node] = {}
    for n in g.nodes:
        ins = tuple(rw.remap.get(v, v) for v in n.inputs)
        if ins != n.inputs:
            n = Node(n.op, ins, n.attrs, n.outputs, n.span)
        replaced = None
        for rule in RULES:
            replaced = rule(rw, n)
            if replaced is not None:
                break
        if replaced is not None:
            rw.remap[n.out] = replaced
            continue
        key = (n.op, tuple(id(v) for v in n.inputs), tuple((k, _attr_key(v)) for k, v in n.attrs.items()))
        if key in seen:
            for a, b in zip(n.outputs, seen[key].outputs):
                rw.remap[a] = b
            continue
        seen[key] = n
        rw.emit(n)
    outputs = tuple(rw.remap.get(v, v) for v in g.outputs)
    return g.replace(nodes=tuple(dead_code(rw.nodes, outputs)), outputs=outputs)


def dead_code(nodes: list[Node], outputs) -> list[Node]:
    live = set(outputs)
    keep = []
    for n in reversed(nodes):
        if any(v in live for v in n.outputs):
            keep.append(n)
            live.update(n.inputs)
    return keep[::-1]


