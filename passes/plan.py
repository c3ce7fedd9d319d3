"""Pass: lower every fusion group to level-2 kernels and assemble the host plan.

Pipeline position: last; input is the fused graph (passes/fusion.py), output the Plan
(ir/tile.py) that the runtime executes: buffers, host scalars, and launch steps in order.
Which template lowers a group is decided here by the group's kind (LOWERINGS); each template
returns its kernels with the guards that choose between them at call time.
"""
from __future__ import annotations

from ..ir.graph import Value
from ..ir.tile import Alternative, Buffer, Guard, Launch, Plan
from ..ir.types import TensorType
from ..ir.tile_verifier import verify_kernel
from .context import checks_enabled
from .fusion import FusedGraph
from .lower_expert import lower_expert
from .lower_flash import lower_flash
from .lower_lowrank import lower_bsr, lower_lowrank
from .lower_moe import lower_align, lower_moe_gemm, lower_router
from .lower_matmul import lower_matmul
from .lower_row import lower_row
from .lower_scan import lower_scan
from .lower_topk import lower_topk

LOWERINGS = {
    "row": lower_row,
    "copy": lower_row,
    "matmul": lower_matmul,
    "topk": lower_topk,
    "scan": lower_scan,
    "expert": lower_expert,
    "flash": lower_flash,
    "moe": lower_moe_gemm,
    "moe_align": lower_align,
    "router": lower_router,
    "bsr": lower_bsr,
    "lowrank": lower_lowrank,
}


def register_lowering(kind: str, fn) -> None:
    """Later passes (flash attention, MoE dispatch, packed layouts) add group kinds here."""
    LOWERINGS[kind] = fn


def build_plan(fg: FusedGraph) -> Plan:
    g = fg.graph
    buffers: dict[str, Buffer] = {}
    for p in g.params:
        if isinstance(p.value.type, TensorType):
            buffers[fg.names[p.value]] = Buffer(fg.names[p.value], p.value.type.dtype, tuple(p.value.type.shape), "input")
    results = set(fg.results)
    for grp in fg.groups:
        for v in grp.outputs:
            name = fg.buffer(grp, v)
            buffers[name] = Buffer(name, v.type.dtype, tuple(v.type.shape), "output" if name in results else "temp",
                                   zeroed=v in grp.extra.get("zeroed", ()))
    scalars: dict[str, Value] = {}
    for p in g.params:
        if not isinstance(p.value.type, TensorType):
            scalars[fg.names[p.value]] = p.value
    for n in fg.host:
        if n.op != "const":
            for v in n.outputs:
                scalars[fg.names[v]] = v
    steps = []
    for grp in fg.groups:
        lower = LOWERINGS.get(grp.kind)
        if lower is None:
            raise RuntimeError(f"internal error: the partitioner made a {grp.kind} group, which no template lowers")
        alternatives = []
        for alt in lower(fg, grp):
            alt = as_alternative(alt)
            if checks_enabled():
                for k in alt.kernels:
                    verify_kernel(k)
            for buf in alt.scratch:
                buffers[buf.name] = buf
            writes = tuple(fg.buffer(grp, v) for v in grp.outputs)
            scratch = {buf.name for buf in alt.scratch}
            reads = tuple(sorted({p.buffer for k in alt.kernels for p in k.params if p.kind == "ptr"}
                                 - set(writes) - scratch))
            alternatives.append(Launch(alt.kernels[0], grp.name, reads, writes, alt.guard, alt.kernels[1:]))
        steps.append(tuple(alternatives))
    return Plan(g.name, buffers, tuple(p.name for p in g.params), tuple(fg.host), scalars, tuple(steps),
                fg.results)


def as_alternative(x) -> Alternative:
    """Templates return Alternatives, or (kernel, extent, limit) for 'when extent <= limit'."""
    if isinstance(x, Alternative):
        return x
    kernel, extent, limit = x
    return Alternative((kernel,), Guard("at_most", (extent, limit)) if extent is not None else None)
