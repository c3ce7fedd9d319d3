"""Pass: change an op's working float dtype (``opforge run --dtype``, tests in f32 and f16).

Pipeline position: optional, after canonicalisation. Every occurrence of ``old`` becomes
``new``: parameter and value types, casts and literals. Other dtypes stay, so a spec's explicit
f32 accumulation stays f32 when an f16 op runs in bf16.
"""
from __future__ import annotations

from ..ir.graph import Attrs, Graph, Node, Param, Value
from ..ir.types import DType, ScalarType, TensorType, Type
from .context import PassContext


def main_float_dtype(g: Graph) -> DType | None:
    for p in g.tensor_params:
        if p.value.type.dtype.is_float:
            return p.value.type.dtype
    return None


def retype(g: Graph, old: DType, new: DType, ctx: PassContext | None = None) -> Graph:
    if old == new:
        return g

    def t(ty: Type) -> Type:
        if ty.dtype != old:
            return ty
        return ScalarType(new) if isinstance(ty, ScalarType) else TensorType(new, ty.shape)

    vmap: dict[Value, Value] = {}

    def v(x: Value) -> Value:
        if x not in vmap:
            vmap[x] = Value(t(x.type), x.name)
        return vmap[x]

    params = tuple(Param(p.name, v(p.value), p.default, p.has_default, p.layout, p.span) for p in g.params)
    nodes = []
    for n in g.nodes:
        attrs = Attrs({k: (new if a == old else a) if isinstance(a, DType)
                       else retype(a, old, new) if isinstance(a, Graph) else a       # a scan's body
                       for k, a in n.attrs.items()})
        nodes.append(Node(n.op, tuple(v(i) for i in n.inputs), attrs, tuple(v(o) for o in n.outputs), n.span))
    return g.replace(params=params, nodes=tuple(nodes), outputs=tuple(v(o) for o in g.outputs),
                     result_types=tuple(t(r) for r in g.result_types))
