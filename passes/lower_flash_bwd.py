"""Lowering flash_attention_bwd: FlashAttention-2's backward in two kernels (the row kernel for
delta = rowsum(dO * O) is its own group, made by the gradient rule).

- dK/dV kernel: a program per BLOCK_N keys of one batch entry keeps its K and V tiles on chip
  and loops over the query blocks that can see them (causal: from the diagonal down; other
  masks per tile). Per query block it recomputes the scores s = q k^T * scale, the
  probabilities p = exp(s - lse) from the forward's log-sum-exp (P is never stored), and adds
  dV += p^T dO, dS = p * (dO v^T - delta), dK += dS^T q * scale.
- dQ kernel: a program per BLOCK_M queries keeps q, dO, lse and delta on chip and loops over the
  key blocks (up to the diagonal when causal): dQ += dS k * scale.
Deterministic: each output element is written by one program (no atomics); dQ recomputes the
scores once more instead of adding into dQ from the dK/dV kernel. Scores are in log2 units
(exp2), as in the forward. Rows whose keys are all masked get zero gradients.
"""
from __future__ import annotations

from ..ir.tile import Alternative, GridDim, TExpr, Tunable
from ..ir.tile_builder import TileBuilder
from ..ir.types import DType, accumulator
from .fusion import FusedGraph, Group
from .lower_eval import Ctx, Evaluator, unflatten
from .lower_flash import LOG2E
from .lower_matmul import operand_ctx
from .lower_row import kernel_name, prod, store

PRESETS = ((64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2), (32, 64, 4, 2), (64, 32, 4, 3), (16, 64, 4, 2))


class FlashBwd:
    def __init__(self, fg: FusedGraph, group: Group):
        self.fg, self.group = fg, group
        (self.node,) = group.nodes
        n = self.node
        self.q, self.k, self.v, self.lse, self.delta, self.do = n.inputs[:6]
        rest = list(n.inputs[6:])
        self.scale = rest.pop(0) if n.attrs["scale"] else None
        self.mask = rest.pop(0) if n.attrs["mask"] == "tensor" else None
        self.causal = n.attrs["mask"] == "causal"
        self.dq, self.dk, self.dv = n.outputs
        self.S, self.E = self.q.type.shape[-2:]
        self.T = self.k.type.shape[-2]
        self.Ev = self.v.type.shape[-1]
        self.batch = tuple(self.dq.type.shape[:-2])
        self.acc = accumulator(self.q.type.dtype)     # f32 (f64 for float64 gradient checks)

    def begin(self, suffix: str):
        b = TileBuilder(kernel_name(self.fg, self.group, suffix))
        b.tunable(Tunable("BLOCK_M", (16, 32, 64, 128), cpu=16))
        b.tunable(Tunable("BLOCK_N", (16, 32, 64, 128), cpu=16))
        b.tunable(Tunable("BLOCK_E", covers=self.E, lo=16, hi=512))
        b.tunable(Tunable("BLOCK_EV", covers=self.Ev, lo=16, hi=512))
        ev = Evaluator(b, self.fg, self.group)
        pid = b.let(b.program_id(0), "pid")
        pid_b = b.let(b.program_id(1), "pid_b") if self.batch else b.const(0)
        batch_idx = unflatten(b, pid_b, self.batch, "b")
        e = b.let(b.expand_dims(b.arange("BLOCK_E"), 0), "e")
        evc = b.let(b.expand_dims(b.arange("BLOCK_EV"), 0), "ev")
        scale = ev(self.scale, Ctx((), None)) if self.scale is not None else b.const(1.0)
        scale = b.let(b.cast(scale, self.acc), "sm_scale")
        return b, ev, pid, batch_idx, e, evc, scale

    def tile(self, b, ev, v, batch_idx, rows, cols, row_ok, col_ok):
        ctx = operand_ctx(v, batch_idx, len(self.batch), (rows, cols))
        return b.cast(ev(v, Ctx(ctx.idx, b.and_(row_ok, col_ok))), v.type.dtype)

    def row_vector(self, b, ev, v, batch_idx, rows, row_ok):
        ctx = operand_ctx(v, batch_idx, len(self.batch), (rows,))
        return b.widen(ev(v, Ctx(ctx.idx, row_ok)))

    def probabilities(self, b, ev, batch_idx, q, k_t, rows, cols, row_ok, col_ok, lse, scale):
        """p = exp(s - lse) on the tile (0 where masked), s = q k^T * scale: [BLOCK_M, BLOCK_N]."""
        s = b.dot(q, k_t, b.full(("BLOCK_M", "BLOCK_N"), 0.0, self.acc))
        keep = b.and_(row_ok, col_ok)
        if self.causal:
            if self.T == self.S:
                keep = b.and_(keep, b.binop("le", cols, rows))
            else:
                keep = b.and_(keep, b.binop("le", b.add(cols, b.size(self.S)), b.add(rows, b.size(self.T))))
        if self.mask is not None:
            m_ctx = operand_ctx(self.mask, batch_idx, len(self.batch), (rows, cols))
            keep = b.and_(keep, b.binop("ne", ev(self.mask, Ctx(m_ctx.idx, keep)), 0))
        keep = b.and_(keep, b.binop("ne", lse, float("-inf")))
        logits = b.sub(b.mul(s, b.mul(scale, LOG2E)), b.mul(lse, LOG2E))
        return b.let(b.where(keep, b.unary("exp2", logits), 0.0), "p")

    def grid(self, extent, block: str):
        g = [GridDim.of(extent, block)]
        if self.batch:
            g.append(GridDim.of(prod(self.batch)))
        return g


def _presets():
    return tuple(((("BLOCK_M", bm), ("BLOCK_N", bn)), w, st) for bm, bn, w, st in PRESETS)


def dkdv_kernel(f: FlashBwd):
    b, ev, pid, batch_idx, e, evc, scale = f.begin("_dkdv")
    BM = TExpr("arg", ("BLOCK_M",), DType.i32, ())
    BN = TExpr("arg", ("BLOCK_N",), DType.i32, ())
    sS, sT, sE, sEv = (b.size(x) for x in (f.S, f.T, f.E, f.Ev))
    b.comment("program -> a block of keys of one batch entry; K and V stay on chip")
    keys = b.let(b.expand_dims(b.add(b.mul(pid, BN), b.arange("BLOCK_N")), 1), "keys")      # [BN, 1]
    key_ok = b.let(b.lt(keys, sT), "key_ok")
    k_tile = b.let(f.tile(b, ev, f.k, batch_idx, keys, e, key_ok, b.lt(e, sE)), "k")          # [BN, E]
    v_tile = b.let(f.tile(b, ev, f.v, batch_idx, keys, evc, key_ok, b.lt(evc, sEv)), "v")    # [BN, EV]
    dk = b.declare(b.full(("BLOCK_N", "BLOCK_E"), 0.0, f.acc), "dk")
    dv = b.declare(b.full(("BLOCK_N", "BLOCK_EV"), 0.0, f.acc), "dv")
    if f.causal:
        b.comment("causal: only the query blocks at or below these keys' diagonal")
        first = b.mul(pid, BN)
        if f.T != f.S:
            first = b.sub(b.add(first, sS), sT)
        lo = b.let(b.mul(b.floordiv(b.maximum(first, 0), BM), BM), "lo")
    else:
        lo = 0
    with b.loop("start_m", lo, sS, BM) as m0:
        rows = b.let(b.expand_dims(b.add(m0, b.arange("BLOCK_M")), 1), "rows")              # [BM, 1]
        row_ok = b.let(b.lt(rows, sS), "row_ok")
        q = b.let(f.tile(b, ev, f.q, batch_idx, rows, e, row_ok, b.lt(e, sE)), "q")             # [BM, E]
        do = b.let(f.tile(b, ev, f.do, batch_idx, rows, evc, row_ok, b.lt(evc, sEv)), "do")    # [BM, EV]
        lse = b.let(f.row_vector(b, ev, f.lse, batch_idx, rows, row_ok), "lse")
        delta = b.let(f.row_vector(b, ev, f.delta, batch_idx, rows, row_ok), "delta")
        cols = b.let(b.expand_dims(b.add(b.mul(pid, BN), b.arange("BLOCK_N")), 0), "cols")     # [1, BN]
        p = f.probabilities(b, ev, batch_idx, q, b.trans(k_tile), rows, cols, row_ok, b.lt(cols, sT), lse, scale)
        b.comment("dV += p^T dO; dS = p (dO V^T - delta); dK += dS^T q")
        b.assign(dv, b.dot(b.trans(b.cast(p, f.v.type.dtype)), do, dv))
        dp = b.dot(do, b.trans(v_tile), b.full(("BLOCK_M", "BLOCK_N"), 0.0, f.acc))
        ds = b.let(b.mul(p, b.sub(dp, delta)), "ds")
        b.assign(dk, b.dot(b.trans(b.cast(ds, f.q.type.dtype)), q, dk))
    b.comment("store dK (scaled) and dV")
    store_tile(b, ev, f, f.dk, batch_idx, keys, e, b.and_(key_ok, b.lt(e, sE)), b.mul(dk, scale))
    store_tile(b, ev, f, f.dv, batch_idx, keys, evc, b.and_(key_ok, b.lt(evc, sEv)), dv)
    return b.kernel(f.grid(f.T, "BLOCK_N"), doc=f"{f.group.name} (flash attention backward: dK, dV over query blocks)",
                    warps=(4, 8), stages=(1, 2, 3), presets=_presets(), family="flash_bwd")


def dq_kernel(f: FlashBwd):
    b, ev, pid, batch_idx, e, evc, scale = f.begin("_dq")
    BM = TExpr("arg", ("BLOCK_M",), DType.i32, ())
    BN = TExpr("arg", ("BLOCK_N",), DType.i32, ())
    sS, sT, sE, sEv = (b.size(x) for x in (f.S, f.T, f.E, f.Ev))
    b.comment("program -> a block of queries of one batch entry; q, dO, lse and delta stay on chip")
    rows = b.let(b.expand_dims(b.add(b.mul(pid, BM), b.arange("BLOCK_M")), 1), "rows")
    row_ok = b.let(b.lt(rows, sS), "row_ok")
    q = b.let(f.tile(b, ev, f.q, batch_idx, rows, e, row_ok, b.lt(e, sE)), "q")
    do = b.let(f.tile(b, ev, f.do, batch_idx, rows, evc, row_ok, b.lt(evc, sEv)), "do")
    lse = b.let(f.row_vector(b, ev, f.lse, batch_idx, rows, row_ok), "lse")
    delta = b.let(f.row_vector(b, ev, f.delta, batch_idx, rows, row_ok), "delta")
    dq = b.declare(b.full(("BLOCK_M", "BLOCK_E"), 0.0, f.acc), "dq")
    if f.causal:
        b.comment("causal: keys past the diagonal of this row block are never loaded")
        last = b.mul(b.add(pid, 1), BM)
        if f.T != f.S:
            last = b.sub(b.add(last, sT), sS)
        hi = b.let(b.maximum(b.minimum(last, sT), 0), "hi")
    else:
        hi = sT
    e_rows = b.let(b.expand_dims(b.arange("BLOCK_E"), 1), "e_t")
    ev_rows = b.let(b.expand_dims(b.arange("BLOCK_EV"), 1), "ev_t")
    with b.loop("start_n", 0, hi, BN) as n0:
        cols = b.let(b.expand_dims(b.add(n0, b.arange("BLOCK_N")), 0), "cols")               # [1, BN]
        col_ok = b.lt(cols, sT)
        k_t = b.let(f.tile(b, ev, f.k, batch_idx, cols, e_rows, col_ok, b.lt(e_rows, sE)), "k_t")     # [E, BN]
        v_t = b.let(f.tile(b, ev, f.v, batch_idx, cols, ev_rows, col_ok, b.lt(ev_rows, sEv)), "v_t")  # [EV, BN]
        p = f.probabilities(b, ev, batch_idx, q, k_t, rows, cols, row_ok, col_ok, lse, scale)
        dp = b.dot(do, v_t, b.full(("BLOCK_M", "BLOCK_N"), 0.0, f.acc))
        ds = b.let(b.mul(p, b.sub(dp, delta)), "ds")
        b.assign(dq, b.dot(b.cast(ds, f.k.type.dtype), b.trans(k_t), dq))
    b.comment("store dQ (scaled)")
    store_tile(b, ev, f, f.dq, batch_idx, rows, e, b.and_(row_ok, b.lt(e, sE)), b.mul(dq, scale))
    return b.kernel(f.grid(f.S, "BLOCK_M"), doc=f"{f.group.name} (flash attention backward: dQ over key blocks)",
                    warps=(4, 8), stages=(1, 2, 3), presets=_presets(), family="flash_bwd")


def store_tile(b, ev, f: FlashBwd, v, batch_idx, rows, cols, mask, tile) -> None:
    ctx = Ctx(tuple(batch_idx) + (rows, cols), mask)
    ev.bind(v, ctx, tile)
    if v in f.group.outputs:
        store(ev, f.fg.buffer(f.group, v), v, ctx)


def lower_flash_bwd(fg: FusedGraph, group: Group) -> list:
    f = FlashBwd(fg, group)
    return [Alternative((dkdv_kernel(f), dq_kernel(f)))]
