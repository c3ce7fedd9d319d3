"""Pass: give size symbols fixed values.

Pipeline position: before the layout pass, when weights are bound: a bound weight's sizes can
no longer change, so its symbols become integers in every type and attribute of the graph
(the packed tensors' data-dependent sizes, such as a block-sparse weight's count of non-zero
blocks, are then plain integers too, and kernels specialise on them).
"""
from __future__ import annotations

from typing import Mapping

from ..ir.dims import Dim, subst_any
from ..ir.graph import Attrs, Graph, Node, Param, Value
from .inline import subst_type


def specialize(g: Graph, sizes: Mapping[str, Dim]) -> Graph:
    if not sizes:
        return g
    vmap: dict[Value, Value] = {}

    def v(x: Value) -> Value:
        if x not in vmap:
            vmap[x] = Value(subst_type(x.type, sizes), x.name)
        return vmap[x]

    params = tuple(Param(p.name, v(p.value), p.default, p.has_default, p.layout, p.span) for p in g.params)
    nodes = tuple(Node(n.op, tuple(v(i) for i in n.inputs),
                       Attrs({k: subst_any(a, sizes) for k, a in n.attrs.items()}),
                       tuple(v(o) for o in n.outputs), n.span) for n in g.nodes)
    return g.replace(params=params, nodes=nodes, outputs=tuple(v(o) for o in g.outputs),
                     result_types=tuple(subst_type(t, sizes) for t in g.result_types))
