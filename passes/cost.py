"""Bytes moved, before and after fusion, as exact symbolic sizes (``explain()`` reports them).

Unfused, every compute node reads its tensor operands and writes its results (views are free
either way: they are index arithmetic). Fused, a group reads each distinct value it loads once
and writes what it stores. These are the fewest bytes each plan must move; matmuls re-read
operand tiles from cache, which the roofline of a benchmark accounts for separately.
"""
from __future__ import annotations

from ..ir.dims import Dim
from ..ir.graph import Graph, Node, Value
from ..ir.types import TensorType
from .fusion import FusedGraph, node_class


def nbytes(v: Value) -> Dim:
    n: Dim = v.type.dtype.itemsize
    for d in v.type.shape:
        n = n * d
    return n


def base_inputs(node: Node, producer: dict, stop: set, recompute: frozenset = frozenset()) -> set[Value]:
    """The stored values a node's operands are read from (through glue)."""
    out: set[Value] = set()
    stack = [v for v in node.inputs if isinstance(v.type, TensorType)]
    while stack:
        v = stack.pop()
        p = producer.get(v)
        if p is None or p in stop or node_class(p, recompute) == "compute":
            out.add(v)
        elif node_class(p, recompute) == "glue":
            stack.extend(x for x in p.inputs if isinstance(x.type, TensorType))
    return out


def unfused_bytes(g: Graph) -> Dim:
    producer = g.producers()
    total: Dim = 0
    for n in g.nodes:
        if node_class(n) != "compute":
            continue
        for v in base_inputs(n, producer, set()):
            total = total + nbytes(v)
        for v in n.outputs:
            total = total + nbytes(v)
    computed = {v for n in g.nodes if node_class(n) == "compute" for v in n.outputs}
    for v in set(g.outputs):
        if v not in computed:
            # a result that is a parameter or a view of values is copied: read and written
            total = total + 2 * nbytes(v)
    return total


def fused_bytes(fg: FusedGraph) -> Dim:
    producer = fg.graph.producers()
    total: Dim = 0
    for grp in fg.groups:
        inside = set(grp.nodes)
        reads: set[Value] = set()
        for n in grp.nodes:
            reads |= {v for v in base_inputs(n, producer, set(), fg.recompute) if producer.get(v) not in inside}
        if grp.kind == "copy":
            reads |= base_inputs(Node("copy", grp.outputs, {}, ()), producer, set(), fg.recompute)
        for v in reads:
            total = total + nbytes(v)
        for v in grp.outputs:
            total = total + nbytes(v)
    return total


def report(fg: FusedGraph, original: Graph | None = None) -> str:
    """``original``: the graph before pattern rewrites (what 'unfused' means to a reader)."""
    before, after = unfused_bytes(original or fg.graph), fused_bytes(fg)
    return f"bytes moved: {before} unfused, {after} fused ({len(fg.groups)} kernel(s))"
