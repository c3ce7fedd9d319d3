"""Pass: inline calls of other ops of the same file.

Pipeline position: first, right after the front end builds the graphs. Needs
``PassContext.program`` for the callees. After it no ``call`` node remains. The callee's sizes
are substituted by the caller's (the call's ``sizes`` attribute holds the unification the front
end did), in value types and in attributes alike.
"""
from __future__ import annotations

from ..ir.dims import subst, subst_any
from ..ir.graph import Attrs, Graph, Node, Value
from ..ir.types import ScalarType, TensorType, Type
from .context import PassContext


def subst_type(t: Type, mapping) -> Type:
    if isinstance(t, ScalarType) or not mapping:
        return t
    return TensorType(t.dtype, tuple(subst(d, mapping) for d in t.shape))


def inline(g: Graph, ctx: PassContext) -> Graph:
    if not any(n.op == "call" for n in g.nodes):
        return g
    if ctx.program is None:
        raise ValueError(f"{g.name} calls other ops; inlining needs PassContext(program=...)")
    nodes: list[Node] = []
    remap: dict[Value, Value] = {}
    for n in g.nodes:
        ins = tuple(remap.get(v, v) for v in n.inputs)
        if n.op != "call":
            nodes.append(n if ins == n.inputs else Node(n.op, ins, n.attrs, n.outputs, n.span))
            continue
        callee = inline(ctx.program[n.attrs["callee"]], ctx)
        mapping = dict(n.attrs["sizes"])
        vmap: dict[Value, Value] = {p.value: a for p, a in zip(callee.params, ins)}
        for cn in callee.nodes:
            outs = tuple(Value(subst_type(v.type, mapping), f"{callee.name}.{v.name}" if v.name else None)
                         for v in cn.outputs)
            attrs = Attrs({k: subst_any(v, mapping) for k, v in cn.attrs.items()})
            nodes.append(Node(cn.op, tuple(vmap[v] for v in cn.inputs), attrs, outs, cn.span))
            vmap.update(zip(cn.outputs, outs))
        for o, co in zip(n.outputs, callee.outputs):
            remap[o] = vmap[co]
    return g.replace(nodes=tuple(nodes), outputs=tuple(remap.get(v, v) for v in g.outputs))
