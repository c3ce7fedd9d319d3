"""Lowering the gradients of gathers: ``scatter_rows`` (out[ids[i]] += src[i], the gradient of
``table[ids]``) and ``expert_wgrad`` (each expert's weight gradient over the slots routed to it).

scatter_rows: pointwise tiles over src, rows flattened from ids' axes and columns from the
rest; each tile is added into the zeroed output rows its ids name with ``tl.atomic_add``, so
rows named several times sum in an order that is not fixed (the last bits of floats may differ
between runs; docs/language.md says so).

expert_wgrad: one program per (expert, tile of N, tile of K), looping over all (token, choice)
slots in blocks and taking only those routed to its expert (a masked dot): correct for any
routing, and E times the products of a grouped GEMM over slots sorted by expert.
"""
from __future__ import annotations

from ..ir.tile import GridDim, Tunable
from ..ir.tile_builder import TileBuilder
from ..ir.types import DType
from .fusion import FusedGraph, Group
from .lower_eval import Ctx, Evaluator, address
from .lower_matmul import f32_precision
from .lower_row import RowFrame, kernel_name, prod


def lower_scatter(fg: FusedGraph, group: Group) -> list:
    (node,) = group.nodes
    src, ids = node.inputs
    out = node.out
    r = ids.type.rank
    domain = tuple(src.type.shape)
    b = TileBuilder(kernel_name(fg, group))
    frame = RowFrame(b, domain, tuple(range(r, len(domain))) or (len(domain) - 1,),
                     block_m=Tunable("BLOCK_M", (1, 2, 4, 8, 16), cpu=8),
                     block_n=Tunable("BLOCK_N", (32, 64, 128, 256, 512), cpu=64), tile_cols=True)
    ev = Evaluator(b, fg, group)
    ctx = frame.columns()
    b.comment("add each source row into the output row its id names")
    tile = ev(src, ctx)
    row = b.let(b.cast(ev(ids, ctx.with_idx(ctx.idx[:r])), DType.i64), "dest")
    dest = address(b, fg.buffer(group, out), out.type.dtype, (row,) + tuple(ctx.idx[r:]), out.type.shape)
    b.atomic_add(dest, tile, ctx.mask)
    grid = [GridDim.of(frame.n_rows, "BLOCK_M"), GridDim.of(frame.n_cols, "BLOCK_N")]
    return [(b.kernel(grid, doc=f"{group.name} (scatter rows): atomic adds into the zeroed output",
                      warps=(2, 4, 8)), None, 0)]


def lower_wgrad(fg: FusedGraph, group: Group) -> list:
    (node,) = group.nodes
    x, dout, idx = node.inputs
    out = node.out
    E, N, K = out.type.shape
    T, KSEL = idx.type.shape
    b = TileBuilder(kernel_name(fg, group))
    BN = b.tunable(Tunable("BLOCK_N", (16, 32, 64, 128), cpu=16))
    BK = b.tunable(Tunable("BLOCK_K", (16, 32, 64, 128), cpu=16))
    BS = b.tunable(Tunable("BLOCK_S", (16, 32, 64), cpu=16))
    ev = Evaluator(b, fg, group)
    b.comment("program -> (expert, tile of N, tile of K)")
    expert = b.let(b.program_id(0), "expert")
    pid_n = b.let(b.program_id(1), "pid_n")
    pid_k = b.let(b.program_id(2), "pid_k")
    rn = b.let(b.expand_dims(b.add(b.mul(pid_n, BN), b.arange("BLOCK_N")), 1), "rn")
    rk = b.let(b.expand_dims(b.add(b.mul(pid_k, BK), b.arange("BLOCK_K")), 0), "rk")
    slots = prod((T, KSEL))
    acc = b.declare(b.full(("BLOCK_N", "BLOCK_K"), 0.0, DType.f32), "acc")
    b.comment("every (token, choice) slot routed to this expert: dout^T x, summed")
    with b.loop("s0", 0, b.size(slots), BS) as s0:
        s = b.let(b.add(s0, b.arange("BLOCK_S")), "s")
        t = b.let(b.floordiv(s, b.size(KSEL)), "token")
        j = b.let(b.mod(s, b.size(KSEL)), "choice")
        in_s = b.lt(s, b.size(slots))
        mine = b.let(b.and_(in_s, b.binop("eq", b.cast(ev(idx, Ctx((t, j), in_s)), DType.i64),
                                         b.cast(expert, DType.i64))), "mine")
        d_ctx = Ctx((b.expand_dims(t, 0), b.expand_dims(j, 0), rn), b.and_(b.expand_dims(mine, 0), b.lt(rn, b.size(N))))
        dt = b.where(d_ctx.mask, ev(dout, d_ctx), 0.0)                      # [BLOCK_N, BLOCK_S]
        x_idx = (b.expand_dims(t, 1), rk) if x.type.rank == 2 else (b.expand_dims(t, 1), b.expand_dims(j, 1), rk)
        x_ctx = Ctx(x_idx, b.and_(b.expand_dims(mine, 1), b.lt(rk, b.size(K))))
        xt = b.where(x_ctx.mask, ev(x, x_ctx), 0.0)                          # [BLOCK_S, BLOCK_K]
        dt = b.broadcast_to(b.cast(dt, x.type.dtype), ("BLOCK_N", "BLOCK_S"))
        xt = b.broadcast_to(b.cast(xt, x.type.dtype), ("BLOCK_S", "BLOCK_K"))
        b.assign(acc, b.dot(dt, xt, acc, f32_precision() if x.type.dtype == DType.f32 else None))
    mask = b.and_(b.lt(rn, b.size(N)), b.lt(rk, b.size(K)))
    b.store(address(b, fg.buffer(group, out), out.type.dtype, (expert, rn, rk), out.type.shape), acc, mask)
    grid = [GridDim.of(E), GridDim.of(N, "BLOCK_N"), GridDim.of(K, "BLOCK_K")]
    return [(b.kernel(grid, doc=f"{group.name} (expert weight gradient): masked dots over all slots",
                      warps=(4,)), None, 0)]
