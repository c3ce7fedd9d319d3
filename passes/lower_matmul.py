"""Lowering a matmul group to a tiled GEMM, as in the Triton matmul tutorial: a program per
[BLOCK_M, BLOCK_N] output tile (grouped along M for L2 reuse), batch axes on the second grid
axis, a K loop accumulating in f32 (i32 for integers) with tl.dot, and a masked store.

A group may hold several matmuls that read the same A operand (the gate and up projections of
a gated MLP): one A tile per K step feeds all their accumulators. Pointwise prologues are
evaluated on the operand tiles, epilogues on the output tile, where each matmul's value is its
accumulator rounded to the matmul's dtype (as the unfused op would store it).

Operands are evaluated through lower_eval, so transposes, permutes, slices and broadcast batch
axes of the operands are strides and index arithmetic, never copies. f32 operands use exact
("ieee") products unless torch allows TF32 (torch.get_float32_matmul_precision() != "highest"),
as torch.matmul does.
"""
from __future__ import annotations

import torch

from ..ir.graph import Value
from ..ir.tile import GridDim, Tunable
from ..ir.tile_builder import TileBuilder
from ..ir.types import DType, accumulator
from .fusion import FusedGraph, Group
from .lower_eval import Ctx, Evaluator
from .lower_row import kernel_name, prod, store

DOT_MIN = 16   # tl.dot needs every block dimension >= 16

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages): the Triton matmul tutorial's
# CUDA configurations, plus small-M ones for decode-shaped products (M of 1 to 16)
GEMM_PRESETS = [
    (128, 256, 64, 8, 8, 3), (64, 256, 32, 8, 4, 4), (128, 128, 32, 8, 4, 4), (128, 64, 32, 8, 4, 4),
    (64, 128, 32, 8, 4, 4), (128, 32, 32, 8, 4, 4), (64, 32, 32, 8, 2, 5), (32, 64, 32, 8, 2, 5),
    (128, 128, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3),
    (16, 64, 128, 1, 4, 4), (16, 128, 128, 1, 4, 3), (16, 32, 256, 1, 2, 4), (32, 128, 64, 1, 4, 4),
]


def gemm_presets():
    return tuple((( ("BLOCK_M", bm), ("BLOCK_N", bn), ("BLOCK_K", bk), ("GROUP_M", gm)), w, st)
                 for bm, bn, bk, gm, w, st in GEMM_PRESETS)


def f32_precision() -> str:
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def operand_ctx(v: Value, batch_idx: list, batch_rank: int, last2: tuple) -> Ctx:
    """Context of a matmul operand: its batch axes right-aligned with the output's (size 1
    reads index 0), then the two matrix axes (one for a vector operand)."""
    shape = v.type.shape
    nb = len(shape) - len(last2)
    idx = []
    for k in range(nb):
        out_axis = batch_rank - nb + k
        idx.append(None if shape[k] == 1 else batch_idx[out_axis])
    return Ctx(tuple(idx) + tuple(last2), None)


def is_plain_load(ev: Evaluator, v: Value) -> bool:
    return ev.is_base(v) or ev.producer[v].op in ("transpose", "permute", "expand") and is_plain_load(ev, ev.producer[v].inputs[0])


def lower_matmul(fg: FusedGraph, group: Group) -> list:
    mms = [n for n in group.nodes if n.op == "matmul"]
    node = mms[0]
    a, bv = node.inputs
    out = node.out
    b = TileBuilder(kernel_name(fg, group))
    a_vec, b_vec = a.type.rank == 1, bv.type.rank == 1
    M = 1 if a_vec else a.type.shape[-2]
    K = a.type.shape[-1]
    N = 1 if b_vec else bv.type.shape[-1]
    batch = tuple(out.type.shape[: out.type.rank - (0 if a_vec else 1) - (0 if b_vec else 1)])
    BM = b.tunable(Tunable("BLOCK_M", (16, 32, 64, 128), cpu=32))
    BN = b.tunable(Tunable("BLOCK_N", (16, 32, 64, 128, 256), cpu=32))
    BK = b.tunable(Tunable("BLOCK_K", (16, 32, 64, 128), cpu=32))
    GM = b.tunable(Tunable("GROUP_M", (1, 8), cpu=1))
    sM, sN, sK = b.size(M), b.size(N), b.size(K)

    b.comment("program id -> output tile, grouped along M so neighbours share B tiles in L2")
    pid = b.let(b.program_id(0), "pid")
    num_m = b.let(b.cdiv(sM, BM), "num_pid_m")
    num_n = b.let(b.cdiv(sN, BN), "num_pid_n")
    in_group = b.let(b.mul(GM, num_n), "num_pid_in_group")
    first_m = b.let(b.mul(b.floordiv(pid, in_group), GM), "first_pid_m")
    size_m = b.let(b.minimum(b.sub(num_m, first_m), GM), "group_size_m")
    pid_m = b.let(b.add(first_m, b.mod(b.mod(pid, in_group), size_m)), "pid_m")
    pid_n = b.let(b.floordiv(b.mod(pid, in_group), size_m), "pid_n")
    batch_idx: list = []
    if batch:
        b.comment("second grid axis -> batch index")
        pid_b = b.let(b.program_id(1), "pid_b")
        inner = 1
        for k in reversed(range(len(batch))):
            d = batch[k]
            if d == 1:
                batch_idx.insert(0, None)
                continue
            q = b.floordiv(pid_b, b.size(inner)) if inner != 1 else pid_b
            batch_idx.insert(0, b.let(b.mod(q, b.size(d)) if k else q, f"b{k}"))
            inner = inner * d
    rm = b.let(b.add(b.mul(pid_m, BM), b.arange("BLOCK_M")), "rm")
    rn = b.let(b.add(b.mul(pid_n, BN), b.arange("BLOCK_N")), "rn")
    rk = b.let(b.arange("BLOCK_K"), "rk")
    rows = b.let(b.expand_dims(rm, 1), "rows")
    cols = b.let(b.expand_dims(rn, 0), "cols")

    ev = Evaluator(b, fg, group)
    acc_dt = accumulator(a.type.dtype)
    accs = [b.declare(b.full(("BLOCK_M", "BLOCK_N"), 0 if acc_dt.is_int else 0.0, acc_dt),
                      "acc" if len(mms) == 1 else f"acc_{k}") for k in range(len(mms))]
    precision = f32_precision() if a.type.dtype == DType.f32 else None
    b.comment("K loop: accumulate A[rows, k] @ B[k, cols]")
    with b.loop("k0", 0, sK, BK) as k0:
        ks = b.let(b.add(k0, rk), "ks")
        ka = b.expand_dims(ks, 0)
        kb = b.expand_dims(ks, 1)
        mask_a = b.let(b.and_(b.lt(rows, sM), b.lt(ka, sK)) if not a_vec else b.lt(ka, sK), "mask_a")
        mask_b = b.let(b.and_(b.lt(kb, sK), b.lt(cols, sN)) if not b_vec else b.lt(kb, sK), "mask_b")
        a_ctx = operand_ctx(a, batch_idx, len(batch), (ka,) if a_vec else (rows, ka))
        at = ev(a, Ctx(a_ctx.idx, mask_a))
        if not is_plain_load(ev, a):
            at = b.where(mask_a, at, 0)
        at = b.let(b.broadcast_to(b.cast(at, a.type.dtype), ("BLOCK_M", "BLOCK_K")), "a")
        for mm, acc in zip(mms, accs):
            w = mm.inputs[1]
            b_ctx = operand_ctx(w, batch_idx, len(batch), (kb,) if b_vec else (kb, cols))
            bt = ev(w, Ctx(b_ctx.idx, mask_b))
            if not is_plain_load(ev, w):
                bt = b.where(mask_b, bt, 0)
            bt = b.broadcast_to(b.cast(bt, w.type.dtype), ("BLOCK_K", "BLOCK_N"))
            b.assign(acc, b.dot(at, bt, acc, precision))
    b.comment("epilogue: on the output tile" if len(group.nodes) > len(mms) else "epilogue: store the tile")
    out_idx = list(batch_idx) + ([] if a_vec else [rows]) + ([] if b_vec else [cols])
    out_mask = b.let(b.and_(b.lt(rows, sM), b.lt(cols, sN)), "out_mask")
    out_ctx = Ctx(tuple(out_idx), out_mask)
    for mm, acc in zip(mms, accs):
        tile = acc if len(group.nodes) == 1 else b.let(b.cast(acc, mm.out.type.dtype), mm.out.name or "mm")
        ev.bind(mm.out, out_ctx, tile)
    for v in group.outputs:
        store(ev, fg.buffer(group, v), v, out_ctx)
    grid = [GridDim(((M, "BLOCK_M"), (N, "BLOCK_N")))]
    if batch:
        grid.append(GridDim.of(prod(batch)))
    extra = len(group.nodes) - len(mms)
    kernel = b.kernel(grid, doc=f"{group.name} (matmul): [{M}, {K}] @ [{K}, {N}] tiles, batch {list(batch)}"
                                + (f", {len(mms)} matmuls sharing A" if len(mms) > 1 else "")
                                + (f", {extra} fused pointwise op(s)" if extra else ""),
                      warps=(4, 8), stages=(2, 3, 4), presets=gemm_presets())
    return [(kernel, None, 0)]


