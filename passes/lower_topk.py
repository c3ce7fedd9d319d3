"""Lowering top-k: one tile per row holding the whole axis (up to TOPK_MAX elements), then k
rounds of "take the largest value not taken yet, lowest index first", so ties resolve to the
lower index exactly as the reference's stable sort does. Values keep the input dtype; indices
are i32. NaN inputs are not supported (they never compare equal to the row max).
"""
from __future__ import annotations

from ..ir.tile import GridDim, Tunable
from ..ir.tile_builder import TileBuilder
from ..ir.types import DType
from .fusion import FusedGraph, Group
from .lower_eval import Evaluator, address
from .lower_row import RowFrame, kernel_name

TOPK_MAX = 65536
BIG_INDEX = 1 << 30


def lower_topk(fg: FusedGraph, group: Group) -> list:
    (node,) = group.nodes
    x = node.inputs[0]
    k, axis = node.attrs["k"], node.attrs["axis"]
    values, indices = node.outputs
    domain = tuple(x.type.shape)
    b = TileBuilder(kernel_name(fg, group))
    frame = RowFrame(b, domain, (axis,), block_m=Tunable("BLOCK_M", (1, 2, 4, 8), cpu=8),
                     block_n=Tunable("BLOCK_N", covers=domain[axis], hi=TOPK_MAX), tile_cols=False)
    ev = Evaluator(b, fg, group)
    ctx = frame.columns()
    cols = ctx.idx[axis] if ctx.idx[axis] is not None else b.const(0)
    b.comment("load the row; lanes past the end never win")
    tile = ev(x, ctx)
    if x.type.dtype.is_float:
        vals = b.let(b.widen(tile), "vals")
        lowest = float("-inf")
    else:
        vals = b.let(b.cast(tile, DType.i64), "vals")
        lowest = -(1 << 62)
    taken = b.declare(b.binop("ne", b.full(("BLOCK_M", "BLOCK_N"), 0, DType.i32), 0), "taken")
    names = {v: fg.buffer(group, v) for v in (values, indices) if v in group.outputs}
    with b.loop("j", 0, k, 1) as j:
        b.comment("the largest value not taken yet, and its lowest index")
        avail = b.let(b.and_(ctx.mask, b.unary("not", taken)), "avail")
        best = b.let(b.reduce(b.where(avail, vals, lowest), 1, "max"), "best")
        hit = b.and_(avail, b.binop("eq", vals, best))
        idx = b.let(b.reduce(b.where(hit, cols, BIG_INDEX), 1, "min"), "best_idx")
        for v, tile_v in ((values, best), (indices, b.cast(idx, DType.i32))):
            if v not in names:
                continue      # a result nobody uses
            at = [j if a == axis else frame.outer_idx.get(a) for a in range(len(domain))]
            b.store(address(b, names[v], v.type.dtype, at, v.type.shape), tile_v, frame.row_mask)
        b.assign(taken, b.binop("or", taken, b.binop("eq", cols, idx)))
    kernel = b.kernel([GridDim.of(frame.n_rows, "BLOCK_M")],
                      doc=f"{group.name} (top-{k}): k rounds of max over a whole row", warps=(1, 2, 4, 8))
    return [(kernel, domain[axis], TOPK_MAX)]
