"""Lowering the mixture-of-experts kernels made by passes/moe_dispatch.py:

- router: a program per BLOCK_M tokens computes their logits over all experts (one tile wide,
  a K loop of tl.dot), takes the top k in registers (largest first, ties to the lower expert),
  and the softmax of those k logits; only gates and expert ids are written.
- align: one program sorts the T*k slots (t * k + j) by expert, stably: a histogram, padded
  offsets (a cumsum), then each slot's rank within its expert. Each expert's run is padded
  with the sentinel T*k to a multiple of the GEMM row block; it also writes each block's
  expert and the number of blocks. Every element of its outputs is written.
- grouped GEMM: a program per (row block, column block). The block's expert picks the weight
  matrix; its rows are slots, so the loads gather token rows (x[t] or x[t, j]) and the stores
  scatter to out[t, j]; padded rows are masked. Programs past the last block do nothing. With
  the gated combine fused, the epilogue adds each slot's weighted row into out[t] with
  tl.atomic_add: for k = 2 the sum is exact in any order (one rounding of a + b), for larger
  k the order of the additions may vary between runs in the last bit.
"""
from __future__ import annotations

from ..ir.dims import Dim
from ..ir.prims_fused import MOE_BLOCK_MAX
from ..ir.tile import GridDim, Tunable
from ..ir.tile_builder import TileBuilder
from ..ir.types import DType, accumulator
from .fusion import FusedGraph, Group
from .lower_eval import Ctx, Evaluator, address
from .lower_matmul import f32_precision
from .lower_row import kernel_name, store

BIG_INDEX = 1 << 30


def _store_at(b, name, dtype, idx, value, mask, atomic=False):
    (b.atomic_add if atomic else b.store)(address(b, name, dtype, idx), value, mask)


# -- router -------------------------------------------------------------------------------------
def lower_router(fg: FusedGraph, group: Group) -> list:
    (node,) = group.nodes
    x, w = node.inputs
    vals_out, idx_out = node.outputs
    k, dtype, softmax = node.attrs["k"], node.attrs["dtype"], node.attrs["softmax"]
    T, D = x.type.shape
    E = w.type.shape[0]
    b = TileBuilder(kernel_name(fg, group))
    BM = b.tunable(Tunable("BLOCK_M", (16, 32, 64), cpu=32))
    BK = b.tunable(Tunable("BLOCK_K", (32, 64, 128), cpu=32))
    b.tunable(Tunable("BLOCK_E", covers=E, lo=16, hi=1024))
    sT, sD, sE = b.size(T), b.size(D), b.size(E)
    ev = Evaluator(b, fg, group)
    b.comment("program -> BLOCK_M tokens; all experts' logits in one tile")
    pid = b.let(b.program_id(0), "pid")
    rows = b.let(b.expand_dims(b.add(b.mul(pid, BM), b.arange("BLOCK_M")), 1), "rows")
    ecols = b.let(b.expand_dims(b.arange("BLOCK_E"), 0), "experts")
    row_ok = b.let(b.lt(rows, sT), "row_mask")
    e_ok = b.let(b.lt(ecols, sE), "expert_mask")
    acc = b.declare(b.full(("BLOCK_M", "BLOCK_E"), 0.0, DType.f32), "acc")
    precision = f32_precision() if x.type.dtype == DType.f32 else None
    with b.loop("k0", 0, sD, BK) as k0:
        ks = b.let(b.add(k0, b.arange("BLOCK_K")), "ks")
        ka, kb = b.expand_dims(ks, 0), b.expand_dims(ks, 1)
        xt = b.cast(ev(x, Ctx((rows, ka), b.and_(row_ok, b.lt(ka, sD)))), x.type.dtype)
        wt = b.cast(ev(w, Ctx((ecols, kb), b.and_(e_ok, b.lt(kb, sD)))), w.type.dtype)
        b.assign(acc, b.dot(xt, wt, acc, precision))
    logits = b.cast(b.cast(acc, x.type.dtype), dtype)      # the matmul's dtype, then the cast's
    vals = b.let(b.where(e_ok, b.widen(logits), float("-inf")), "logits")
    b.comment(f"top {k}: the largest logit not taken yet, lowest expert index first")
    taken = b.declare(b.binop("ne", b.full(("BLOCK_M", "BLOCK_E"), 0, DType.i32), 0), "taken")
    best = []
    for j in range(k):
        avail = b.let(b.and_(e_ok, b.unary("not", taken)), f"avail_{j}")
        top = b.let(b.reduce(b.where(avail, vals, float("-inf")), 1, "max"), f"top_{j}")
        arg = b.let(b.reduce(b.where(b.and_(avail, b.binop("eq", vals, top)), ecols, BIG_INDEX), 1, "min"),
                    f"expert_{j}")
        b.assign(taken, b.binop("or", taken, b.binop("eq", ecols, arg)))
        best.append((top, arg))
    if softmax:
        b.comment("softmax over the chosen logits (the first is the largest)")
        exps = [b.let(b.unary("exp", b.sub(t, best[0][0])), f"e_{j}") for j, (t, _) in enumerate(best)]
        total = exps[0]
        for e in exps[1:]:
            total = b.add(total, e)
        inv = b.let(b.truediv(1.0, total), "inv_total")
        outs = [b.mul(e, inv) for e in exps]
    else:
        outs = [t for t, _ in best]
    for j in range(k):   # a result nobody uses is not stored
        if vals_out in group.outputs:
            _store_at(b, fg.buffer(group, vals_out), vals_out.type.dtype, (rows, b.const(j)), outs[j], row_ok)
        if idx_out in group.outputs:
            _store_at(b, fg.buffer(group, idx_out), DType.i32, (rows, b.const(j)), b.cast(best[j][1], DType.i32),
                      row_ok)
    kernel = b.kernel([GridDim.of(T, "BLOCK_M")], doc=f"{group.name} (router): logits, top-{k}"
                      + (", softmax of the chosen" if softmax else ""), warps=(4,), stages=(2, 3),
                      extents=(("BLOCK_M", T), ("BLOCK_K", D)))
    return [(kernel, E, 1024)]


# -- align --------------------------------------------------------------------------------------
def lower_align(fg: FusedGraph, group: Group) -> list:
    (node,) = group.nodes
    (idx,) = node.inputs
    slots_v, blocks_v, count_v = node.outputs
    T, K = idx.type.shape
    E: Dim = node.attrs["experts"]
    n = T * K
    b = TileBuilder(kernel_name(fg, group))
    BS = b.tunable(Tunable("BLOCK_S", (256, 1024), cpu=128))
    BM = b.tunable(Tunable("BLOCK_M", rule=("moe_block", n, E)))
    b.tunable(Tunable("BLOCK_E", covers=E, lo=2, hi=1024))
    sN, sE, sK = b.size(n), b.size(E), b.size(K)
    ev = Evaluator(b, fg, group)
    es = b.let(b.expand_dims(b.arange("BLOCK_E"), 0), "es")
    e_ok = b.let(b.lt(es, sE), "expert_mask")
    sname, bname, cname = (fg.buffer(group, v) for v in (slots_v, blocks_v, count_v))

    def slot_experts(s0):
        s = b.let(b.expand_dims(b.add(s0, b.arange("BLOCK_S")), 1), "s")
        ok = b.let(b.lt(s, sN), "slot_mask")
        e = ev(idx, Ctx((b.floordiv(s, sK), b.mod(s, sK)), ok))
        onehot = b.let(b.cast(b.and_(b.binop("eq", e, es), ok), DType.i32), "onehot")
        return s, ok, onehot

    b.comment("pass 1: tokens per expert, padded to the row block; exclusive offsets")
    counts = b.declare(b.full((1, "BLOCK_E"), 0, DType.i32), "counts")
    with b.loop("s0", 0, sN, BS) as s0:
        _, _, onehot = slot_experts(s0)
        b.assign(counts, b.add(counts, b.reduce(onehot, 0, "sum")))
    padded = b.let(b.mul(b.floordiv(b.add(counts, b.sub(BM, 1)), BM), BM), "padded")
    # the exclusive offsets by a cumsum over a 1-D view: Triton 3.6 cannot lower a cumsum along
    # axis 1 of this [1, BLOCK_E] tile (its layout is the one-hot tile's; an assertion in
    # ScanOpToLLVM fails), 3.9 can; the 1-D form compiles on both
    flat = b.cumsum(b.reshape(padded, ("BLOCK_E",)), 0)
    offsets = b.let(b.sub(b.reshape(flat, (1, "BLOCK_E")), padded), "offsets")
    total = b.let(b.reduce(padded, 1, "sum"), "total")
    b.comment("pass 2: each slot's place: its expert's offset plus its rank among that expert's slots")
    running = b.declare(b.full((1, "BLOCK_E"), 0, DType.i32), "running")
    with b.loop("s0", 0, sN, BS) as s0:
        s, ok, onehot = slot_experts(s0)
        rank = b.add(b.sub(b.cumsum(onehot, 0), 1), running)
        pos = b.let(b.reduce(b.where(b.binop("ne", onehot, 0), b.add(offsets, rank), 0), 1, "sum"), "pos")
        _store_at(b, sname, DType.i32, (pos,), b.cast(s, DType.i32), ok)
        b.assign(running, b.add(running, b.reduce(onehot, 0, "sum")))
    sentinel = b.cast(sN, DType.i32)
    b.comment("padding of each expert's run, and the unused tail, get the sentinel T*k")
    with b.loop("q", 0, BM, 1) as q:
        p = b.add(b.add(offsets, counts), q)
        _store_at(b, sname, DType.i32, (p,), b.add(b.full((1, "BLOCK_E"), 0, DType.i32), sentinel),
                  b.and_(e_ok, b.lt(q, b.sub(padded, counts))))
    n_slots = slots_v.type.shape[0]
    with b.loop("t0", 0, b.size(n_slots), BS) as t0:
        p = b.let(b.expand_dims(b.add(t0, b.arange("BLOCK_S")), 1), "p")
        _store_at(b, sname, DType.i32, (p,), b.add(b.full(("BLOCK_S", 1), 0, DType.i32), sentinel),
                  b.and_(b.lt(p, b.size(n_slots)), b.binop("ge", p, total)))
    b.comment("each block's expert: how many experts' runs end at or before its first row")
    ends = b.let(b.add(offsets, padded), "ends")
    n_blocks = blocks_v.type.shape[0]
    with b.loop("b0", 0, b.size(n_blocks), BS) as b0:
        blk = b.let(b.expand_dims(b.add(b0, b.arange("BLOCK_S")), 1), "blk")
        owner = b.reduce(b.cast(b.and_(b.binop("le", ends, b.mul(blk, BM)), e_ok), DType.i32), 1, "sum")
        _store_at(b, bname, DType.i32, (blk,), owner, b.lt(blk, b.size(n_blocks)))
    _store_at(b, cname, DType.i32, (b.full((1, 1), 0, DType.i32),), b.floordiv(total, BM), None)
    # 8 warps: with 4, a 1024-slot block's one-hot tile and its cumsum spill on sm_90a
    kernel = b.kernel([GridDim.of(1)], doc=f"{group.name} (align): slots sorted by expert, one program",
                      warps=(8,))
    return [(kernel, E, 1024)]


# -- grouped GEMM -------------------------------------------------------------------------------
def lower_moe_gemm(fg: FusedGraph, group: Group) -> list:
    gemms = [n for n in group.nodes if n.op == "expert_gemm"]
    first = gemms[0]
    x, _, idx, slots_v, blocks_v, count_v = first.inputs
    T, KSEL = idx.type.shape
    E, N, K = first.inputs[1].type.shape
    combine = [n for n in group.nodes if n.op == "sum"]
    b = TileBuilder(kernel_name(fg, group))
    BM = b.tunable(Tunable("BLOCK_M", rule=("moe_block", T * KSEL, E)))
    BN = b.tunable(Tunable("BLOCK_N", (32, 64, 128), cpu=32))
    BK = b.tunable(Tunable("BLOCK_K", (32, 64, 128), cpu=32))
    sN, sK, sKSEL, n_slots = b.size(N), b.size(K), b.size(KSEL), b.size(T * KSEL)
    ev = Evaluator(b, fg, group)
    b.comment("program -> (row block of slots sorted by expert, column block)")
    pid = b.let(b.program_id(0), "pid")
    num_n = b.let(b.cdiv(sN, BN), "num_pid_n")
    blk = b.let(b.floordiv(pid, num_n), "blk")
    pid_n = b.let(b.mod(pid, num_n), "pid_n")
    live = b.let(b.lt(blk, ev(count_v, Ctx((None,), None))), "live")
    expert = b.let(b.cast(ev(blocks_v, Ctx((blk,), live)), DType.i64), "expert")
    r = b.let(b.expand_dims(b.add(b.mul(blk, BM), b.arange("BLOCK_M")), 1), "r")
    slot = b.let(ev(slots_v, Ctx((r,), live)), "slot")
    row_ok = b.let(b.and_(live, b.lt(slot, n_slots)), "row_mask")
    token = b.let(b.floordiv(slot, sKSEL), "token")
    choice = b.let(b.mod(slot, sKSEL), "choice")
    cols = b.let(b.expand_dims(b.add(b.mul(pid_n, BN), b.arange("BLOCK_N")), 0), "cols")
    acc_dt = accumulator(x.type.dtype)
    accs = [b.declare(b.full(("BLOCK_M", "BLOCK_N"), 0.0, acc_dt), "acc" if len(gemms) == 1 else f"acc_{i}")
            for i in range(len(gemms))]
    precision = f32_precision() if x.type.dtype == DType.f32 else None
    b.comment("K loop: gathered token rows @ the block's expert weights")
    k_stop = b.let(b.where(live, sK, 0), "k_stop")   # programs past the last block skip the loop
    with b.loop("k0", 0, k_stop, BK) as k0:
        ks = b.let(b.add(k0, b.arange("BLOCK_K")), "ks")
        ka, kb = b.expand_dims(ks, 0), b.expand_dims(ks, 1)
        x_idx = (token, ka) if x.type.rank == 2 else (token, choice, ka)
        xt = b.let(b.cast(ev(x, Ctx(x_idx, b.and_(row_ok, b.lt(ka, sK)))), x.type.dtype), "a")
        for g, acc in zip(gemms, accs):
            w = g.inputs[1]
            wt = ev(w, Ctx((expert, cols, kb), b.and_(b.and_(live, b.lt(cols, sN)), b.lt(kb, sK))))
            b.assign(acc, b.dot(xt, b.cast(wt, w.type.dtype), acc, precision))
    b.comment("epilogue on the output tile; rows scatter back to their (token, choice)")
    out_mask = b.let(b.and_(row_ok, b.lt(cols, sN)), "out_mask")
    out_ctx = Ctx((token, choice, cols), out_mask)
    for g, acc in zip(gemms, accs):
        ev.bind(g.out, out_ctx, b.let(b.cast(acc, g.out.type.dtype), g.out.name or "y"))
    for v in group.outputs:
        producer = fg.graph.producers()[v]
        if producer.op == "sum":
            b.comment("gated combine: add this choice's row into its token's output")
            val = ev(producer.inputs[0], out_ctx)
            _store_at(b, fg.buffer(group, v), v.type.dtype, (token, cols), val, out_mask, atomic=True)
        else:
            store(ev, fg.buffer(group, v), v, out_ctx)
    # at most cdiv(T*k, BLOCK_M) + E padded blocks; BLOCK_M <= MOE_BLOCK_MAX makes this a bound
    grid = [GridDim(((T * KSEL + MOE_BLOCK_MAX * E, "BLOCK_M"), (N, "BLOCK_N")))]
    presets = tuple(((("BLOCK_N", bn), ("BLOCK_K", bk)), w, st)
                    for bn, bk, w, st in ((64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 64, 8, 3)))
    kernel = b.kernel(grid, doc=f"{group.name} (grouped expert GEMM, {len(gemms)} weight(s)"
                      + (", gated combine" if combine else "") + ")", warps=(4, 8), stages=(2, 3, 4), presets=presets,
                      extents=(("BLOCK_N", N), ("BLOCK_K", K)))
    return [(kernel, None, 0)]
