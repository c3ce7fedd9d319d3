"""Lowering cumsum: tl.cumsum over a tile per row when the axis fits one tile, else a loop over
chunks carrying each row's running total. Floats accumulate in f32, integers in i32 (the
result then wraps to the input dtype, as the reference's does). A reverse cumsum (from the end
of the axis: the gradient of a cumsum) runs the same scan over the mirrored index n - 1 - i."""
from __future__ import annotations

from ..ir.tile import GridDim, Tunable
from ..ir.tile_builder import TileBuilder
from ..ir.types import DType
from .fusion import FusedGraph, Group
from .lower_eval import Evaluator
from .lower_row import SINGLE_PASS_MAX, RowFrame, kernel_name, store


def lower_scan(fg: FusedGraph, group: Group) -> list:
    (node,) = group.nodes
    axis = node.attrs["axis"]
    domain = tuple(node.inputs[0].type.shape)
    return [(_lower(fg, group, node, axis, domain, single=True), domain[axis], SINGLE_PASS_MAX),
            (_lower(fg, group, node, axis, domain, single=False), None, 0)]


def _lower(fg, group, node, axis, domain, single: bool):
    b = TileBuilder(kernel_name(fg, group, "" if single else "_looped"))
    bn = Tunable("BLOCK_N", covers=domain[axis], hi=SINGLE_PASS_MAX) if single else \
        Tunable("BLOCK_N", (256, 1024, 4096), cpu=256)
    frame = RowFrame(b, domain, (axis,), block_m=Tunable("BLOCK_M", (1, 2, 4, 8), cpu=8), block_n=bn,
                     tile_cols=False)
    ev = Evaluator(b, fg, group)
    x, out = node.inputs[0], node.out
    name = fg.buffer(group, out)
    n = domain[axis]

    def columns(start=None):
        ctx = frame.columns(start)
        if not node.attrs.get("reverse") or ctx.idx[axis] is None:
            return ctx
        idx = list(ctx.idx)
        idx[axis] = b.let(b.sub(b.sub(b.size(n), 1), idx[axis]), "mirrored")
        return ctx.with_idx(idx)
    if single:
        ctx = columns()
        tile = b.where(ctx.mask, ev(x, ctx), 0)
        ev.bind(out, ctx, b.let(b.cumsum(tile, 1), "scan"))
        store(ev, name, out, ctx)
    else:
        dt = x.type.dtype
        total = DType.f32 if dt.is_float else DType.i64 if dt == DType.i64 else DType.i32
        carry = b.declare(b.full(("BLOCK_M", 1), 0.0 if dt.is_float else 0, total), "carry")
        with b.loop("start", 0, b.size(frame.n_cols), frame.BN) as start:
            ctx = columns(start)
            tile = b.let(b.where(ctx.mask, ev(x, ctx), 0), "chunk")
            ev.bind(out, ctx, b.let(b.add(b.cumsum(tile, 1), carry), "scan"))
            store(ev, name, out, ctx)
            b.assign(carry, b.add(carry, b.reduce(tile, 1, "sum")))
    return b.kernel([GridDim.of(frame.n_rows, "BLOCK_M")],
                    doc=f"{group.name} (cumsum): {'one tile per row' if single else 'chunks with a running total'}",
                    warps=(1, 2, 4, 8))

