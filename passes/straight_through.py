"""Pass: drop ``straight_through`` nodes before fusion (a forward's kernels never compute the
shadow a straight-through estimate differentiates).

Pipeline position: the first step of fuse_and_plan (passes/plan.py), after the pattern rewrites;
the gradients are derived from the graph before it (FusedGraph.source), where the node's VJP
(ir/prims_elementwise.py) passes the cotangent of its value to its first operand, the shadow.

``straight_through(shadow, value)`` is ``value``: every use of its result reads ``value``
instead, and what only the shadow needed (W8A8's dense-weight GEMM, passes/layouts.py) is dead
code.
"""
from __future__ import annotations

import dataclasses

from ..ir.graph import Graph
from .canonicalize import dead_code


def strip_straight_through(g: Graph) -> Graph:
    if not any(n.op == "straight_through" for n in g.nodes):
        return g
    sub = {}
    nodes = []
    for n in g.nodes:
        ins = tuple(sub.get(x, x) for x in n.inputs)
        if n.op == "straight_through":
            sub[n.out] = ins[1]
            continue
        nodes.append(n if ins == n.inputs else dataclasses.replace(n, inputs=ins))
    outputs = tuple(sub.get(v, v) for v in g.outputs)
    return g.replace(nodes=tuple(dead_code(nodes, outputs)), outputs=outputs)
