"""The fusion groups' vocabulary: the classes of level-1 nodes (host, glue, compute), the ops
that take a group of their own, and the two records the partition produces, :class:`Group` and
:class:`FusedGraph`.

Pipeline position: none (data, not a pass). The partition (passes/fusion.py) and the cost model
(passes/cost.py) both read it; the cost model imports nothing of the partition, and the
partition asks the cost model, so the two sit on either side of one line.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..ir.graph import Graph, Node, Value
from ..ir.types import TensorType

GLUE_OPS = {"reshape", "permute", "transpose", "slice", "expand", "concat", "gather_rows", "causal", "arange",
            "fill", "unslice", "scatter_along", "take",
            "unpack_int4", "unpack_24", "fp8_bits"}
# glue that keeps canonical indices canonical (so reductions upstream stay evaluable)
CANONICAL_GLUE = {"expand"}
ROW_REDUCTIONS = {"sum", "mean", "max", "min", "softmax", "log_softmax"}
OWN_GROUP = {"matmul": "matmul", "topk": "topk", "cumsum": "scan", "expert_matmul": "expert",
             "flash_attention": "flash", "flash_attention_mod": "flash", "flash_attention_bwd": "flash_bwd", "expert_gemm": "moe", "moe_align": "moe_align",
             "moe_router": "router", "scatter_rows": "scatter", "expert_wgrad": "wgrad", "matmul_i32": "matmul", "matmul_f8": "matmul", "bsr_matmul": "bsr", "lowrank_matmul": "lowrank",
             "scan": "recurrence"}
# contractions that take their consumers as epilogues
JOINS_CONSUMERS = {"matmul", "matmul_i32", "matmul_f8", "expert_gemm", "bsr_matmul", "lowrank_matmul"}
MATMULS = {"matmul", "matmul_i32", "matmul_f8"}


@dataclass(frozen=True, eq=False)
class Group:
    """One kernel's worth of level-1 nodes. ``domain``/``axes`` describe a row group's
    iteration space: the full shape and its reduced axes (empty for pure pointwise groups)."""
    name: str
    kind: str                      # row | matmul | topk | scan | expert | (later: flash, moe, ...)
    nodes: tuple[Node, ...]
    outputs: tuple[Value, ...]     # values this group stores
    domain: tuple = ()
    axes: tuple[int, ...] = ()
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class FusedGraph:
    graph: Graph
    groups: tuple[Group, ...]      # in execution order
    host: tuple[Node, ...]         # scalar nodes for the host
    names: dict                    # Value -> buffer name, for every stored value and parameter
    results: tuple[str, ...] = ()  # the buffer returned in each result slot
    recompute: frozenset = frozenset()   # compute nodes treated as glue (recomputed where used)
    # the graph before straight_through nodes were dropped (passes/straight_through.py): what the
    # gradients are derived from; None where it is ``graph``
    source: Graph | None = None

    @property
    def differentiated(self) -> Graph:
        return self.source if self.source is not None else self.graph

    def buffer(self, group: Group, v: Value) -> str:
        """Where a group stores v: its own buffer, or a copy group's result buffer."""
        return group.extra["buffer"] if group.kind == "copy" else self.names[v]


def is_unit_reshape(n: Node) -> bool:
    """A reshape that only inserts or removes size-1 axes."""
    if n.op != "reshape":
        return False
    a = [d for d in n.inputs[0].type.shape if d != 1]
    b = [d for d in n.out.type.shape if d != 1]
    return a == b


def node_class(n: Node, recompute: frozenset = frozenset()) -> str:
    if all(not isinstance(v.type, TensorType) for v in n.outputs):
        return "host"
    if n.op in GLUE_OPS or n in recompute:
        return "glue"
    return "compute"


def recomputed_casts(g: Graph) -> frozenset:
    """Casts of parameters used by several nodes: cheaper to redo in every kernel that needs
    them (one read of the parameter) than to store a widened copy and read it back."""
    users = g.users()
    params = {p.value for p in g.params}
    return frozenset(n for n in g.nodes if n.op == "cast" and n.inputs[0] in params
                     and isinstance(n.out.type, TensorType) and len(users.get(n.out, [])) > 1)
