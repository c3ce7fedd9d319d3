"""Lowering a matmul group to a tiled GEMM, as in the Triton matmul tutorial: a program per
[BLOCK_M, BLOCK_N] output tile (grouped along M for L2 reuse), a K loop accumulating in f32
(i32 for integers) with tl.dot, and a masked store.

Batch axes: when no B operand has a batch axis of its own (``[B, S, D] @ W.T``, the common
case of a linear layer), they are folded into M: the tile's rows run over the flattened
``batch x M`` and each row's batch indices and row are unflattened from it, so a weight tile is
read once per M tile of all the batch's rows together (at B = 32, S = 1 the weight is read
once, not 32 times). Otherwise (a batched product, ``bmm``) the batch axes take the second
grid axis.

A group may hold several matmuls that read the same A operand (the gate and up projections of
a gated MLP): one A tile per K step feeds all their accumulators. Pointwise prologues are
evaluated on the operand tiles, epilogues on the output tile, where each matmul's value is its
accumulator rounded to the matmul's dtype (as the unfused op would store it).

Split-K: when the output has too few tiles to fill the GPU and K is long (decode shapes), a
second alternative splits K across a third grid axis; each split writes f32 partial sums to a
scratch buffer and a small kernel adds them and runs the epilogue (deterministic: no atomics).

W8A8 products: int8 operands accumulate in i32; e4m3 operands (``matmul_f8``, stored as u8
bit patterns) accumulate in f32 and take the fp8 tensor-core dot where the GPU has one
(ir/fp8.py), else f16 tiles that hold the e4m3 values exactly.

Operands are evaluated through lower_eval, so transposes, permutes, slices and broadcast batch
axes of the operands are strides and index arithmetic, never copies. f32 operands use exact
("ieee") products unless torch allows TF32 (torch.get_float32_matmul_precision() != "highest"),
as torch.matmul does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..ir import fp8
from ..ir.graph import Value
from ..ir.tile import SPLIT_MAX, Alternative, Buffer, GridDim, Guard, Tunable
from ..ir.tile_builder import TileBuilder
from ..ir.types import DType, accumulator
from .fusion import MATMULS, FusedGraph, Group
from .lower_eval import Ctx, Evaluator, address, unflatten
from .packed_operands import PackedOperands
from .lower_row import kernel_name, prod, store

DOT_MIN = 16   # tl.dot needs every block dimension >= 16

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) the autotuner times. Checked by
# compiling every example kernel for sm_90a and sm_80 (tests/test_native_sweep.py): none spills
# or overflows shared memory. Prefill tiles take whole warpgroups with BLOCK_M >= 64 (wgmma on
# Hopper); decode tiles are 16 or 32 rows (mma.sync). Dropped after that check: 16x64x128 and
# 16x32x256 (spill even in a plain GEMM), 16x64x64, 32x64x32 on 2 warps and 256x128x64 (spill
# with two accumulators), 64x256 and 128x128x32 on 4 warps (spill with W8A8 and int4).
GEMM_PRESETS = [
    (128, 256, 64, 8, 8, 3), (128, 128, 64, 8, 8, 3), (128, 128, 32, 8, 8, 4), (64, 128, 32, 8, 4, 4),
    (128, 64, 32, 8, 4, 4), (64, 64, 64, 8, 4, 4),
    (16, 128, 64, 1, 4, 3), (16, 64, 128, 1, 2, 4), (32, 64, 64, 1, 4, 4),
    (32, 128, 64, 1, 4, 4),
]
# GEMMs that compute an operand (dequantise, decode fp8, expand 2:4), accumulate in i32, or
# keep several accumulators: 128x256 spills there (int4, W8A8, LoRA's chained dot)
HEAVY_GEMM_PRESETS = [p for p in GEMM_PRESETS if p[:2] != (128, 256)]
# several accumulators (a gated MLP's gate and up): 128x128 on 8 warps spills 168 B on sm_80
MULTI_GEMM_PRESETS = [(128, 64, 64, 8, 8, 3), (128, 64, 32, 8, 4, 4), (64, 128, 32, 8, 4, 4), (64, 64, 64, 8, 4, 4)] \
    + [p for p in GEMM_PRESETS if p[0] < 64]


def gemm_presets(heavy: bool = False, accumulators: int = 1):
    table = MULTI_GEMM_PRESETS if accumulators > 1 else HEAVY_GEMM_PRESETS if heavy else GEMM_PRESETS
    return tuple(((("BLOCK_M", bm), ("BLOCK_N", bn), ("BLOCK_K", bk), ("GROUP_M", gm)), w, st)
                 for bm, bn, bk, gm, w, st in table)


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


@dataclass(frozen=True)
class TileIds:
    """A program's output tile: per-axis batch indices (folded: [BLOCK_M, 1] tiles; else scalars
    from the second grid axis), the M-axis row index (None where M is 1), the columns, and the
    row mask (the flattened row inside its extent)."""
    batch_idx: list
    rows: Any
    cols: Any
    in_rows: Any


def batch_free(w: Value, vec: bool) -> bool:
    """Whether a B operand has no batch axis larger than 1 (it is shared by every batch element)."""
    shape = w.type.shape
    return all(d == 1 for d in shape[: len(shape) - (1 if vec else 2)])


class Gemm:
    """The shape of a matmul group and the pieces its kernels share."""

    def __init__(self, fg: FusedGraph, group: Group):
        self.fg, self.group = fg, group
        self.mms = [n for n in group.nodes if n.op in MATMULS]
        self.fp8 = self.mms[0].op == "matmul_f8"
        self.a, bv = self.mms[0].inputs
        self.out = self.mms[0].out
        self.a_vec, self.b_vec = self.a.type.rank == 1, bv.type.rank == 1
        self.M = 1 if self.a_vec else self.a.type.shape[-2]
        self.K = self.a.type.shape[-1]
        self.N = 1 if self.b_vec else bv.type.shape[-1]
        out = self.out.type
        self.batch = tuple(out.shape[: out.rank - (0 if self.a_vec else 1) - (0 if self.b_vec else 1)])
        # batch axes folded into M when every B operand is shared by the whole batch
        self.fold = bool(self.batch) and not self.a_vec and all(batch_free(mm.inputs[1], self.b_vec) for mm in self.mms)
        self.rows = prod(self.batch) * self.M if self.fold else self.M    # extent of the tile rows
        self.grid_batch = () if self.fold else self.batch               # batch on grid axis 1
        self.acc_dt = DType.f32 if self.fp8 else accumulator(self.a.type.dtype)
        self.partials = f"{group.name}_partials"

    def presets(self, ev: Evaluator):
        """The autotuner's candidates; with packed operands BLOCK_K is each of the step's
        phase dots (the preset's K extent over the phases)."""
        table = gemm_presets(self.heavy(ev), len(self.mms))
        packed = self.packed(ev)
        return table if packed is None else packed.presets(table)

    def heavy(self, ev: Evaluator) -> bool:
        """More live state than one plain accumulator over loaded tiles (GEMM_PRESETS)."""
        computed = not is_plain_load(ev, self.a) or any(not is_plain_load(ev, mm.inputs[1]) for mm in self.mms)
        return computed or self.fp8 or self.acc_dt.is_int or len(self.mms) > 1 or len(self.group.nodes) > len(self.mms) + 2

    def partial_idx(self, t: TileIds) -> list:
        """Index of a tile in the partial sums' buffer (after the matmul and split axes)."""
        return list(t.batch_idx) + [t.rows, t.cols]

    def partial_buffer(self) -> Buffer:
        return Buffer(self.partials, DType.f32, (len(self.mms), SPLIT_MAX) + self.batch + (self.M, self.N), "scratch")

    def split_rule(self):
        return ("split_k", self.rows, self.N, self.K, prod(self.grid_batch))

    # -- shared pieces -------------------------------------------------------------------------
    def tile_ids(self, b: TileBuilder) -> TileIds:
        """pid -> (pid_m, pid_n), grouped along M; batch indices unflattened from the rows
        (folded) or from the second grid axis."""
        BM, BN, GM = (TExprOf(b, n) for n in ("BLOCK_M", "BLOCK_N", "GROUP_M"))
        sM, sN = b.size(self.rows), b.size(self.N)
        b.comment("program id -> output tile, grouped along M so neighbours share B tiles in L2")
        pid = b.let(b.program_id(0), "pid")
        num_m = b.let(b.cdiv(sM, BM), "num_pid_m")
        num_n = b.let(b.cdiv(sN, BN), "num_pid_n")
        in_group = b.let(b.mul(GM, num_n), "num_pid_in_group")
        first_m = b.let(b.mul(b.floordiv(pid, in_group), GM), "first_pid_m")
        size_m = b.let(b.minimum(b.sub(num_m, first_m), GM), "group_size_m")
        pid_m = b.let(b.add(first_m, b.mod(b.mod(pid, in_group), size_m)), "pid_m")
        pid_n = b.let(b.floordiv(b.mod(pid, in_group), size_m), "pid_n")
        batch_idx = self.batch_indices(b)
        rm = b.let(b.add(b.mul(pid_m, BM), b.arange("BLOCK_M")), "rm")
        rn = b.let(b.add(b.mul(pid_n, BN), b.arange("BLOCK_N")), "rn")
        rows = b.let(b.expand_dims(rm, 1), "rows")
        cols = b.let(b.expand_dims(rn, 0), "cols")
        in_rows = b.lt(rows, sM)
        if self.fold:
            b.comment("batch axes folded into M: each row's batch indices and row")
            *batch_idx, rows = unflatten(b, rows, self.batch + (self.M,), "r")
        return TileIds(batch_idx, rows, cols, in_rows)

    def batch_indices(self, b: TileBuilder) -> list:
        if not self.grid_batch:
            return []
        b.comment("second grid axis -> batch index")
        return unflatten(b, b.let(b.program_id(1), "pid_b"), self.batch, "b")

    def k_step(self, b: TileBuilder, ev: Evaluator):
        """The K extent one loop step covers: BLOCK_K, or phases * BLOCK_K with packed B
        operands (passes/packed_operands.py)."""
        bk = TExprOf(b, "BLOCK_K")
        packed = self.packed(ev)
        return bk if packed is None else b.mul(bk, packed.phases)

    def packed(self, ev: Evaluator) -> PackedOperands | None:
        if not hasattr(self, "_packed"):
            self._packed = PackedOperands.of(ev, [mm.inputs[1] for mm in self.mms])
        return self._packed

    def k_loop(self, b: TileBuilder, ev: Evaluator, t: TileIds, accs, start, stop=None) -> None:
        """K from ``start`` to ``stop`` (None: to the end of K, which is then the only bound).

        Packed B operands (int4, 2:4; passes/packed_operands.py): each step covers
        ``phases * BLOCK_K`` of K as one dot per phase p, over the k = k0 + phases * r + p (a
        sum over K in any order), so that each packed byte is loaded once per step and unpacked
        into the phases' tiles."""
        batch_idx, rows, cols = t.batch_idx, t.rows, t.cols
        sN, sK = b.size(self.N), b.size(self.K)
        whole = stop is None
        stop = sK if whole else stop
        rk = b.let(b.arange("BLOCK_K"), "rk")
        precision = f32_precision() if self.a.type.dtype == DType.f32 else None
        packed = self.packed(ev)
        b.comment("K loop: accumulate A[rows, k] @ B[k, cols]" if packed is None else packed.comment)
        with b.loop("k0", start, stop, self.k_step(b, ev)) as k0:
            parts = [b.let(b.add(k0, rk), "ks")] if packed is None else packed.phase_indices(b, k0, rk)
            kas = [b.expand_dims(ks, 0) for ks in parts]
            kbs = [b.expand_dims(ks, 1) for ks in parts]
            if packed is not None:
                packed.install(ev, kbs, k0, rk)
            a_tiles = []
            for ka in kas:
                in_k = b.lt(ka, sK) if whole else b.and_(b.lt(ka, sK), b.lt(ka, stop))
                mask_a = b.let(b.and_(t.in_rows, in_k) if not self.a_vec else in_k, "mask_a")
                a_ctx = operand_ctx(self.a, batch_idx, len(self.batch), (ka,) if self.a_vec else (rows, ka))
                at = ev(self.a, Ctx(a_ctx.idx, mask_a))
                if not is_plain_load(ev, self.a):
                    at = b.where(mask_a, at, 0)
                at = b.broadcast_to(b.cast(at, self.a.type.dtype), ("BLOCK_M", "BLOCK_K"))
                a_tiles.append(b.let(fp8.dot_operand(b, at) if self.fp8 else at, "a"))
            for mm, acc in zip(self.mms, accs):
                w = mm.inputs[1]
                for kb, at in zip(kbs, a_tiles):
                    in_kb = b.lt(kb, sK) if whole else b.and_(b.lt(kb, sK), b.lt(kb, stop))
                    mask_b = b.let(b.and_(in_kb, b.lt(cols, sN)) if not self.b_vec else in_kb, "mask_b")
                    b_ctx = operand_ctx(w, batch_idx, len(self.batch), (kb,) if self.b_vec else (kb, cols))
                    bt = ev(w, Ctx(b_ctx.idx, mask_b))
                    if not is_plain_load(ev, w):
                        bt = b.where(mask_b, bt, 0)
                    bt = b.broadcast_to(b.cast(bt, w.type.dtype), ("BLOCK_K", "BLOCK_N"))
                    bt = fp8.dot_operand(b, bt) if self.fp8 else bt
                    b.assign(acc, b.dot(at, bt, acc, precision))
            if packed is not None:
                packed.uninstall(ev)

    def epilogue(self, b: TileBuilder, ev: Evaluator, t: TileIds, accs) -> None:
        batch_idx, rows, cols = t.batch_idx, t.rows, t.cols
        group = self.group
        b.comment("epilogue: on the output tile" if len(group.nodes) > len(self.mms) else "epilogue: store the tile")
        out_idx = list(batch_idx) + ([] if self.a_vec else [rows]) + ([] if self.b_vec else [cols])
        out_mask = b.let(b.and_(t.in_rows, b.lt(cols, b.size(self.N))), "out_mask")
        out_ctx = Ctx(tuple(out_idx), out_mask)
        for mm, acc in zip(self.mms, accs):
            tile = acc if len(group.nodes) == 1 else b.let(b.cast(acc, mm.out.type.dtype), mm.out.name or "mm")
            ev.bind(mm.out, out_ctx, tile)
        for v in group.outputs:
            store(ev, self.fg.buffer(group, v), v, out_ctx)

    def accumulators(self, b: TileBuilder) -> list:
        zero = 0 if self.acc_dt.is_int else 0.0
        return [b.declare(b.full(("BLOCK_M", "BLOCK_N"), zero, self.acc_dt), "acc" if len(self.mms) == 1 else f"acc_{k}")
                for k in range(len(self.mms))]

    def tunables(self, b: TileBuilder, ev: Evaluator) -> None:
        b.tunable(Tunable("BLOCK_M", (16, 32, 64, 128), cpu=32))
        b.tunable(Tunable("BLOCK_N", (16, 32, 64, 128, 256), cpu=32))
        # tl.dot of 8-bit operands (int8, e4m3) needs K blocks of at least 32
        eight_bit = self.fp8 or self.a.type.dtype == DType.i8
        if self.packed(ev) is not None:
            ks = self.packed(ev).block_ks
            b.tunable(Tunable("BLOCK_K", ks, cpu=ks[0]))
        else:
            b.tunable(Tunable("BLOCK_K", (32, 64, 128) if eight_bit else (16, 32, 64, 128), cpu=32))
        b.tunable(Tunable("GROUP_M", (1, 8), cpu=1))

    def grid(self, *extra: GridDim) -> list:
        grid = [GridDim(((self.rows, "BLOCK_M"), (self.N, "BLOCK_N")))]
        if self.grid_batch or extra:
            grid.append(GridDim.of(prod(self.grid_batch)))
        return grid + list(extra)

    def extents(self) -> tuple:
        return (("BLOCK_M", self.rows), ("BLOCK_N", self.N), ("BLOCK_K", self.K))

    def doc(self, what: str) -> str:
        extra = len(self.group.nodes) - len(self.mms)
        batch = f"batch {list(self.batch)} folded into M" if self.fold else f"batch {list(self.batch)}"
        return (f"{self.group.name} ({what}): [{self.M}, {self.K}] @ [{self.K}, {self.N}] tiles, {batch}"
                + (f", {len(self.mms)} matmuls sharing A" if len(self.mms) > 1 else "")
                + (f", {extra} fused pointwise op(s)" if extra else ""))


def TExprOf(b: TileBuilder, name: str):
    from ..ir.tile import TExpr
    return TExpr("arg", (name,), DType.i32, ())


def lower_matmul(fg: FusedGraph, group: Group) -> list:
    gm = Gemm(fg, group)
    alternatives = []
    if not gm.acc_dt.is_int:
        name, *args = gm.split_rule()
        alternatives.append(Alternative((split_partial(gm), split_reduce(gm)), Guard(name, tuple(args)),
                                        (gm.partial_buffer(),)))
    alternatives.append(Alternative((full_gemm(gm),)))
    return alternatives


def full_gemm(gm: Gemm):
    b = TileBuilder(kernel_name(gm.fg, gm.group))
    ev = Evaluator(b, gm.fg, gm.group)
    gm.tunables(b, ev)
    t = gm.tile_ids(b)
    accs = gm.accumulators(b)
    gm.k_loop(b, ev, t, accs, 0)
    gm.epilogue(b, ev, t, accs)
    return b.kernel(gm.grid(), doc=gm.doc("matmul"), warps=(4, 8), stages=(2, 3, 4), presets=gm.presets(ev),
                    extents=gm.extents())


def split_partial(gm: Gemm):
    b = TileBuilder(kernel_name(gm.fg, gm.group, "_splitk"))
    ev = Evaluator(b, gm.fg, gm.group)
    gm.tunables(b, ev)
    split = b.tunable(Tunable("SPLIT_K", rule=gm.split_rule()))
    t = gm.tile_ids(b)
    b.comment("third grid axis -> this program's share of K")
    s = b.let(b.program_id(2), "split")
    step = gm.k_step(b, ev)
    chunk = b.let(b.mul(b.cdiv(b.cdiv(b.size(gm.K), split), step), step), "k_chunk")
    start = b.let(b.mul(s, chunk), "k_start")
    stop = b.let(b.minimum(b.add(start, chunk), b.size(gm.K)), "k_stop")
    accs = gm.accumulators(b)
    gm.k_loop(b, ev, t, accs, start, stop)
    b.comment("partial sums to scratch; the reduce kernel adds the first SPLIT_K of them")
    out_mask = b.let(b.and_(t.in_rows, b.lt(t.cols, b.size(gm.N))), "out_mask")
    for i, acc in enumerate(accs):
        b.store(address(b, gm.partials, DType.f32, [b.const(i), s] + gm.partial_idx(t)), acc, out_mask)
    # SPLIT_K programs on the third axis, one per share of K
    return b.kernel(gm.grid(GridDim.count("SPLIT_K")), doc=gm.doc("split-K partial GEMM"), warps=(4, 8), stages=(2, 3, 4), presets=gm.presets(ev),
                    extents=gm.extents())


def split_reduce(gm: Gemm):
    b = TileBuilder(kernel_name(gm.fg, gm.group, "_splitk_reduce"))
    ev = Evaluator(b, gm.fg, gm.group)
    gm.tunables(b, ev)
    split = b.tunable(Tunable("SPLIT_K", rule=gm.split_rule()))
    t = gm.tile_ids(b)
    out_mask = b.let(b.and_(t.in_rows, b.lt(t.cols, b.size(gm.N))), "in_mask")
    accs = [b.declare(b.full(("BLOCK_M", "BLOCK_N"), 0.0, DType.f32), f"acc_{i}" if len(gm.mms) > 1 else "acc")
            for i in range(len(gm.mms))]
    b.comment("add the splits' partial sums")
    with b.loop("s", 0, split, 1) as s:
        for i, acc in enumerate(accs):
            ptr = address(b, gm.partials, DType.f32, [b.const(i), s] + gm.partial_idx(t))
            b.assign(acc, b.add(acc, b.load(ptr, out_mask)))
    gm.epilogue(b, ev, t, accs)
    return b.kernel(gm.grid(), doc=gm.doc("split-K reduce + epilogue"), warps=(4, 8), stages=(1,),
                    presets=tuple(((("BLOCK_M", bm), ("BLOCK_N", bn), ("BLOCK_K", 32), ("GROUP_M", 8)), w, 1)
                                  for bm, bn, w in ((64, 64, 4), (32, 128, 4), (128, 64, 8), (16, 256, 4))))
