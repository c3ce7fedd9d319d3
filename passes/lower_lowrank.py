"""Lowering the contraction layouts that change the loop itself:

- bsr_matmul: x @ W.T with W in block-CSR. A program per (row tile of x, block row of W); it
  walks only that block row's non-zero blocks (row_ptr, col_idx), loading the matching B-wide
  slice of x and the B x B block, so all-zero blocks cost nothing. BLOCK_N is the block size.
- lowrank_matmul: (x @ v.T) @ u.T. A program per output tile computes its rows' rank-R
  product t = x @ v.T over the K loop, keeps it in registers (BLOCK_R covers R, at most 256),
  rounds it to the input dtype as the reference does, and multiplies by its tile of u.
Both take pointwise epilogues on the output tile like the GEMM. Leading axes of x are rows.
"""
from __future__ import annotations

from ..ir.tile import GridDim, Tunable
from ..ir.tile_builder import TileBuilder
from ..ir.types import DType, accumulator
from .fusion import FusedGraph, Group
from .lower_eval import Ctx, Evaluator, unflatten
from .lower_matmul import f32_precision
from .lower_row import kernel_name, prod, store


def _rows(b: TileBuilder, lead: tuple, tag: str):
    """Row tile over the flattened leading axes, and each axis' index."""
    BM = b.tunable(Tunable("BLOCK_M", (16, 32, 64, 128), cpu=32))
    pid_m = b.let(b.program_id(0), "pid_m")
    rows = b.let(b.expand_dims(b.add(b.mul(pid_m, BM), b.arange("BLOCK_M")), 1), "rows")
    return rows, unflatten(b, rows, lead, tag)


def _epilogue(b, ev, fg, group, node, lead_idx, rows, cols, n_rows, N, acc):
    mask = b.let(b.and_(b.lt(rows, b.size(n_rows)), b.lt(cols, b.size(N))), "out_mask")
    ctx = Ctx(tuple(lead_idx) + (cols,), mask)
    tile = acc if len(group.nodes) == 1 else b.let(b.cast(acc, node.out.type.dtype), "mm")
    ev.bind(node.out, ctx, tile)
    for v in group.outputs:
        store(ev, fg.buffer(group, v), v, ctx)


def lower_bsr(fg: FusedGraph, group: Group) -> list:
    node = next(n for n in group.nodes if n.op == "bsr_matmul")
    x, blocks, col_idx, row_ptr = node.inputs
    bs = blocks.type.shape[-1]
    lead = tuple(x.type.shape[:-1])
    K, N = x.type.shape[-1], node.attrs["n"]
    b = TileBuilder(kernel_name(fg, group))
    rows, lead_idx = _rows(b, lead, "r")
    b.comment(f"second grid axis -> one block row of W ({bs} output columns)")
    rb = b.let(b.program_id(1), "block_row")
    local = b.arange("BLOCK_B")
    b.tunable(Tunable("BLOCK_B", covers=bs, lo=bs, hi=bs))
    cols = b.let(b.expand_dims(b.add(b.mul(rb, bs), local), 0), "cols")
    n_local = b.let(b.expand_dims(local, 0), "n_local")
    k_local = b.let(b.expand_dims(local, 1), "k_local")
    ev = Evaluator(b, fg, group)
    start = b.let(ev(row_ptr, Ctx((rb,), None)), "first")
    stop = b.let(ev(row_ptr, Ctx((b.add(rb, 1),), None)), "last")
    sK, n_rows = b.size(K), prod(lead)
    row_ok = b.let(b.lt(rows, b.size(n_rows)), "row_mask")
    acc = b.declare(b.full(("BLOCK_M", "BLOCK_B"), 0.0, accumulator(x.type.dtype)), "acc")
    precision = f32_precision() if x.type.dtype == DType.f32 else None
    b.comment("only this block row's non-zero blocks")
    with b.loop("p", start, stop, 1) as p:
        kb = b.let(ev(col_idx, Ctx((p,), None)), "block_col")
        ks = b.let(b.expand_dims(b.add(b.mul(kb, bs), local), 0), "ks")
        xt = ev(x, Ctx(tuple(lead_idx) + (ks,), b.and_(row_ok, b.lt(ks, sK))))
        wt = ev(blocks, Ctx((p, n_local, k_local), None))
        b.assign(acc, b.dot(b.cast(xt, x.type.dtype), b.cast(wt, blocks.type.dtype), acc, precision))
    _epilogue(b, ev, fg, group, node, lead_idx, rows, cols, n_rows, N, acc)
    nb = row_ptr.type.shape[0] - 1
    kernel = b.kernel([GridDim.of(n_rows, "BLOCK_M"), GridDim.of(nb)],
                      doc=f"{group.name} (block-sparse matmul, {bs}x{bs} blocks)", warps=(4, 8), stages=(2, 3),
                      extents=(("BLOCK_M", n_rows),))
    return [(kernel, None, 0)]


LOWRANK_MAX = 256
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) the autotuner times: decode rows, then
# warpgroup-sized row tiles (wgmma on Hopper needs BLOCK_M >= 64 and 4 warps per warpgroup)
LOWRANK_PRESETS = ((16, 64, 128, 4, 3), (16, 128, 64, 4, 3), (32, 64, 64, 4, 3), (64, 64, 64, 4, 3),
                   (64, 128, 64, 4, 3), (128, 64, 64, 8, 3), (128, 128, 64, 8, 2))


def lower_lowrank(fg: FusedGraph, group: Group) -> list:
    node = next(n for n in group.nodes if n.op == "lowrank_matmul")
    x, v, u = node.inputs
    lead = tuple(x.type.shape[:-1])
    K, R, N = x.type.shape[-1], v.type.shape[0], u.type.shape[0]
    b = TileBuilder(kernel_name(fg, group))
    rows, lead_idx = _rows(b, lead, "r")
    BN = b.tunable(Tunable("BLOCK_N", (32, 64, 128), cpu=32))
    BK = b.tunable(Tunable("BLOCK_K", (32, 64, 128), cpu=32))
    b.tunable(Tunable("BLOCK_R", covers=R, lo=16, hi=LOWRANK_MAX))
    pid_n = b.let(b.program_id(1), "pid_n")
    cols = b.let(b.expand_dims(b.add(b.mul(pid_n, BN), b.arange("BLOCK_N")), 0), "cols")
    r_cols = b.let(b.expand_dims(b.arange("BLOCK_R"), 0), "r")
    r_rows = b.let(b.expand_dims(b.arange("BLOCK_R"), 1), "r_t")
    ev = Evaluator(b, fg, group)
    sK, sR, sN, n_rows = b.size(K), b.size(R), b.size(N), prod(lead)
    row_ok = b.let(b.lt(rows, b.size(n_rows)), "row_mask")
    precision = f32_precision() if x.type.dtype == DType.f32 else None
    t = b.declare(b.full(("BLOCK_M", "BLOCK_R"), 0.0, DType.f32), "t")
    b.comment("t = x @ v.T for this row tile: the rank-R product stays in registers")
    with b.loop("k0", 0, sK, BK) as k0:
        ks = b.let(b.add(k0, b.arange("BLOCK_K")), "ks")
        ka, kb = b.expand_dims(ks, 0), b.expand_dims(ks, 1)
        xt = ev(x, Ctx(tuple(lead_idx) + (ka,), b.and_(row_ok, b.lt(ka, sK))))
        vt = ev(v, Ctx((r_cols, kb), b.and_(b.lt(r_cols, sR), b.lt(kb, sK))))
        b.assign(t, b.dot(b.cast(xt, x.type.dtype), b.cast(vt, v.type.dtype), t, precision))
    b.comment("then t @ u.T for this output tile")
    ut = ev(u, Ctx((cols, r_rows), b.and_(b.lt(cols, sN), b.lt(r_rows, sR))))
    acc = b.let(b.dot(b.cast(t, x.type.dtype), b.cast(ut, u.type.dtype),
                      b.full(("BLOCK_M", "BLOCK_N"), 0.0, DType.f32), precision), "acc")
    _epilogue(b, ev, fg, group, node, lead_idx, rows, cols, n_rows, N, acc)
    kernel = b.kernel([GridDim.of(n_rows, "BLOCK_M"), GridDim.of(N, "BLOCK_N")],
                      doc=f"{group.name} (low-rank matmul: (x @ v.T) @ u.T)", warps=(4, 8), stages=(2, 3),
                      presets=tuple(((("BLOCK_M", bm), ("BLOCK_N", bn), ("BLOCK_K", bk)), w, st)
                                    for bm, bn, bk, w, st in LOWRANK_PRESETS),
                      extents=(("BLOCK_M", n_rows), ("BLOCK_N", N), ("BLOCK_K", K)))
    return [(kernel, R, LOWRANK_MAX)]
