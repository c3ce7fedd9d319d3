"""Pass: lower every fusion group to level-2 kernels and assemble the host plan.

Pipeline position: last; input is the fused graph (passes/fusion.py), output the Plan
(ir/tile.py) that the runtime executes: buffers, host scalars, and launch steps in order.
Which template lowers a group is decided here by the group's kind (LOWERINGS); each template
returns its kernels with the guards that choose between them at call time.
"""
from __future__ import annotations

import dataclasses

from ..ir.graph import Value
from ..ir.tile import Alternative, Buffer, Guard, Launch, Plan, TileKernel
from ..ir.tile_builder import WIDE_SUFFIX, index64
from ..ir.types import TensorType
from ..ir.tile_verifier import verify_kernel
from .context import checks_enabled
from .fusion import FusedGraph, fuse, last_joined
from .lower_eval import LoweringError
from .lower_expert import lower_expert
from .lower_flash import lower_flash
from .lower_flash_bwd import lower_flash_bwd
from .lower_lowrank import lower_bsr, lower_lowrank
from .lower_moe import lower_align, lower_moe_gemm, lower_router
from .lower_matmul import lower_matmul
from .lower_row import lower_row
from .lower_recurrence import lower_recurrence
from .lower_scan import lower_scan
from .lower_scatter import lower_scatter, lower_wgrad
from .lower_topk import lower_topk
from .straight_through import strip_straight_through

LOWERINGS = {
    "row": lower_row,
    "copy": lower_row,
    "matmul": lower_matmul,
    "topk": lower_topk,
    "scan": lower_scan,
    "recurrence": lower_recurrence,
    "expert": lower_expert,
    "flash": lower_flash,
    "flash_bwd": lower_flash_bwd,
    "moe": lower_moe_gemm,
    "moe_align": lower_align,
    "router": lower_router,
    "bsr": lower_bsr,
    "lowrank": lower_lowrank,
    "scatter": lower_scatter,
    "wgrad": lower_wgrad,
}


def register_lowering(kind: str, fn) -> None:
    """Later passes (flash attention, MoE dispatch, packed layouts) add group kinds here."""
    LOWERINGS[kind] = fn


def fuse_and_plan(g, ctx=None) -> tuple[FusedGraph, Plan]:
    """Partition a kernel graph into groups and lower them. A group the templates cannot lower
    as formed (a join the partitioner's rules let through, found when its template cannot
    place a node) is formed again smaller: the node at fault, or else the group's last-joined
    member, starts a group of its own. Each retry splits one more node, so it ends."""
    source = g
    g = strip_straight_through(g)
    alone: set = set()
    order = {n: i for i, n in enumerate(g.nodes)}
    while True:
        fg = fuse(g, ctx, frozenset(alone))
        if source is not g:
            fg = dataclasses.replace(fg, source=source)
        try:
            return fg, build_plan(fg)
        except LoweringError as e:
            grp = getattr(e, "group", None)
            members = [n for n in grp.nodes] if grp is not None else []
            members.sort(key=order.get, reverse=True)      # the root first
            culprit = e.node if e.node in members[1:] and e.node not in alone else None
            if culprit is None:
                rest = [n for n in members[1:] if n not in alone]
                if not rest:
                    raise
                culprit = last_joined([members[0]] + rest, order)
            alone.add(culprit)


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
        try:
            lowered = lower(fg, grp)
        except LoweringError as e:
            e.group = grp
            raise
        for alt in lowered:
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


def wide_kernels(fg: FusedGraph, group_name: str) -> dict[str, TileKernel]:
    """The group's kernels lowered again with int64 index arithmetic (ir/tile_builder.index64),
    by the name of the kernel each one widens. The runtime asks for them only when some offset
    of a call could reach 2**31, so most ops never build them."""
    grp = next(g for g in fg.groups if g.name == group_name)
    with index64():
        alts = [as_alternative(a) for a in LOWERINGS[grp.kind](fg, grp)]
    out = {}
    for alt in alts:
        for k in alt.kernels:
            if checks_enabled():
                verify_kernel(k)
            out[k.name[: -len(WIDE_SUFFIX)]] = k
    return out
