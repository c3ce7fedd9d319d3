"""Bytes moved, before and after fusion, as exact symbolic sizes (``explain()`` reports them).

Unfused, every compute node reads its tensor operands and writes its results (views are free
either way: they are index arithmetic). Fused, a group reads each distinct value it loads once
and writes what it stores. These are the fewest bytes each plan must move; matmuls re-read
operand tiles from cache, which the roofline of a benchmark accounts for separately.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir.dims import Dim
from ..ir.graph import Graph, Node, Value
from ..ir.types import TensorType
from .groups import JOINS_CONSUMERS, FusedGraph, node_class


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


# -- the partitioner's cost model -----------------------------------------------------------------
def join_saves_bytes(n: Node, stored: bool, producer: dict) -> bool:
    """A join saves the write and the re-read of n's result, unless n's result is stored anyway
    (then it saves re-reading n's inputs in a separate kernel: still a saving when n reads
    anything at all). Recomputing a contraction never pays: the partitioner never duplicates one."""
    return not stored or any(isinstance(v.type, TensorType) for v in n.inputs)


@dataclass(frozen=True)
class Resources:
    loads: int            # distinct tensors read at the group's tile size
    accumulators: int     # matmul accumulators kept across the K loop
    shared_bytes: int     # a GEMM's operand tiles in shared memory (smallest preset)

    @property
    def live_tiles(self) -> int:
        return self.loads + 2 * self.accumulators

    def fits(self, ctx) -> bool:
        return self.live_tiles <= ctx.max_live_tiles and self.shared_bytes <= ctx.max_shared_bytes

    def __str__(self) -> str:
        return f"{self.loads} tile load(s), {self.accumulators} accumulator(s), ~{self.shared_bytes // 1024} KiB shared"


def resources(nodes, producer: dict, recompute: frozenset = frozenset()) -> Resources:
    """Estimate what a group would hold on chip: each distinct tensor it loads is a tile in
    registers, each matmul an f32 accumulator (counted twice: it lives across the K loop), and
    each GEMM operand tile pipelined through shared memory."""
    inside = set(nodes)
    loads: set = set()
    for n in nodes:
        loads |= {v for v in base_inputs(n, producer, set(), recompute) if producer.get(v) not in inside}
    mms = [n for n in nodes if n.op in JOINS_CONSUMERS]
    stages, bm, bn, bk, item = 3, 64, 64, 32, 2
    shared = stages * (bm * bk + len(mms) * bk * bn) * item if mms else 0
    return Resources(len(loads), len(mms), shared)
