"""Lowering flash_attention and flash_attention_mod: the Triton tutorial's fused attention
forward, generalised.

A program per BLOCK_M query rows of one batch entry (batch axes, broadcast ones included, on
the second grid axis). Grouped-query attention (k and v broadcast over the R query heads of a
group) folds those heads into the rows (row = position * R + head), so a group's heads share
every K/V tile. The q tile stays in registers; key/value blocks stream through with an online
softmax (running max m, running sum l, rescaled accumulator), so the S x T scores never reach
memory. In the general form the spec's score cone (passes/flash_attention.py) is evaluated on
each tile of raw scores. Causal masks, and masks made of positions or per-batch lengths
(passes/mask_range.py), bound the key loop (tiles outside are never loaded); inside it every
mask is evaluated per tile.
Any head dim works: BLOCK_E is its next power of two, masked. Rows whose keys are all masked
give NaN, as softmax of all -inf does in torch. Scores are kept in log2 units (exp2).

Decode (few query blocks, long keys): a second alternative splits the keys across a third
grid axis ("flash-decoding"); each split writes its (m, l, unnormalised output) to scratch and
a combine kernel merges the splits with the same rescaling, so a single query row still keeps
the whole GPU reading the KV cache.
"""
from __future__ import annotations

from ..ir.tile import SPLIT_MAX, Alternative, Buffer, GridDim, Guard, TExpr, Tunable
from ..ir.tile_builder import TileBuilder
from ..ir.types import DType, accumulator
from .fusion import FusedGraph, Group
from .lower_eval import Ctx, Evaluator, address, unflatten
from .lower_matmul import operand_ctx
from .lower_row import kernel_name, prod, store
from .mask_range import TileOps, key_range_of

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# (BLOCK_M, BLOCK_N, num_warps, num_stages); 128 query rows take two warpgroups (with one, the
# [128, head dim] accumulator and the score tile spill at head dim 128); 128 x 32 is the tile a
# computed score fits in on mma.sync GPUs (runtime/autotune.MMA_SYNC_FLASH_ELEMENTS)
PRESETS = ((128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4),
           (16, 64, 4, 3), (16, 128, 4, 2))


class Flash:
    def __init__(self, fg: FusedGraph, group: Group):
        self.fg, self.group = fg, group
        (self.node,) = (n for n in group.nodes if n.op in ("flash_attention", "flash_attention_mod"))
        n = self.node
        self.mod = n.op == "flash_attention_mod"
        self.scale = self.mask = self.range = None
        self.causal = False
        if self.mod:     # the scores' matmul and the cone computing s from it are in the group
            (mm,) = (m for m in group.nodes if m.op == "matmul")
            producer = fg.graph.producers()
            self.mm, self.s = mm, n.inputs[0]
            self.q, self.k, self.v = mm.inputs[0], producer[mm.inputs[1]].inputs[0], n.inputs[1]
            self.range = key_range_of(self.s, producer)
        else:
            self.q, self.k, self.v = n.inputs[:3]
            rest = list(n.inputs[3:])
            self.scale = rest.pop(0) if n.attrs["scale"] else None
            self.mask = rest.pop(0) if n.attrs["mask"] == "tensor" else None
            self.causal = n.attrs["mask"] == "causal"
        self.out, self.lse = n.outputs
        self.acc = accumulator(self.q.type.dtype)     # f32 (f64 for float64 gradient checks)
        self.S, self.E = self.q.type.shape[-2:]
        self.T = self.k.type.shape[-2]
        self.Ev = self.v.type.shape[-1]
        self.batch = tuple(self.out.type.shape[:-2])
        self.fold = self.group_axis()
        self.R = self.batch[self.fold] if self.fold is not None else 1
        self.outer = tuple(d for a, d in enumerate(self.batch) if a != self.fold)
        self.rows = self.S * self.R if self.fold is not None else self.S   # query rows of one program grid
        self.nb = prod(self.outer)
        self.m_buf, self.l_buf, self.o_buf = (f"{group.name}_{x}" for x in ("m", "l", "o"))

    def group_axis(self) -> int | None:
        """Grouped-query attention: the innermost batch axis along which q varies but k and v
        are broadcast (one key/value head for R query heads). Its R heads are folded into the
        rows of a tile (row = position * R + head), so the heads of a group share every key and
        value tile: K and V are read once per group, not once per query head."""
        nb = len(self.batch)
        for a in reversed(range(nb)):
            if self.batch[a] == 1:
                continue
            sizes = []
            for x in (self.k, self.v):
                xb = x.type.shape[:-2]
                k = a - (nb - len(xb))
                sizes.append(1 if k < 0 else xb[k])
            qb = self.q.type.shape[:-2]
            kq = a - (nb - len(qb))
            if sizes == [1, 1] and kq >= 0 and qb[kq] == self.batch[a]:
                return a
        return None

    def scratch(self):
        return (Buffer(self.m_buf, self.acc, (SPLIT_MAX, self.nb, self.rows), "scratch"),
                Buffer(self.l_buf, self.acc, (SPLIT_MAX, self.nb, self.rows), "scratch"),
                Buffer(self.o_buf, self.acc, (SPLIT_MAX, self.nb, self.rows, self.Ev), "scratch"))

    def split_rule(self):
        return ("split_kv", self.rows, self.T, self.nb)

    # -- shared pieces -------------------------------------------------------------------------
    def begin(self, suffix: str):
        b = TileBuilder(kernel_name(self.fg, self.group, suffix))
        BM = b.tunable(Tunable("BLOCK_M", (16, 32, 64, 128), cpu=16))
        b.tunable(Tunable("BLOCK_N", (16, 32, 64, 128), cpu=16))
        b.tunable(Tunable("BLOCK_E", covers=self.E, lo=16, hi=512))
        b.tunable(Tunable("BLOCK_EV", covers=self.Ev, lo=16, hi=512))
        b.comment("program -> a block of query rows of one batch entry")
        pid_m = b.let(b.program_id(0), "pid_m")
        pid_b = b.let(b.program_id(1), "pid_b") if self.outer else b.const(0)
        outer_idx = unflatten(b, pid_b, self.outer, "b")
        qrows = b.let(b.expand_dims(b.add(b.mul(pid_m, BM), b.arange("BLOCK_M")), 1), "rows")
        if self.fold is None:
            rows, batch_idx = qrows, outer_idx
            row_ok = b.let(b.lt(rows, b.size(self.S)), "row_mask")
        else:
            b.comment(f"grouped-query heads folded into the rows: row = position * {self.R} + head")
            R = b.size(self.R)
            row_ok = b.let(b.lt(qrows, b.mul(b.size(self.S), R)), "row_mask")
            rows = b.let(b.floordiv(qrows, R), "pos")
            head = b.let(b.mod(qrows, R), "head")
            batch_idx = list(outer_idx[:self.fold]) + [head] + list(outer_idx[self.fold:])
        self.qrows = qrows
        ev_cols = b.let(b.expand_dims(b.arange("BLOCK_EV"), 0), "ev")
        return b, pid_m, pid_b, batch_idx, rows, row_ok, ev_cols

    def positions(self, b: TileBuilder, pid_m):
        """The first and last query position of this program's rows (scalars)."""
        BM = TExpr("arg", ("BLOCK_M",), DType.i32, ())
        first = b.mul(pid_m, BM)
        last = b.sub(b.minimum(b.add(first, BM), b.size(self.rows)), 1)
        if self.fold is not None:
            R = b.size(self.R)
            first, last = b.floordiv(first, R), b.floordiv(last, R)
        return b.let(first, "i_first"), b.let(last, "i_last")

    def key_loop(self, b: TileBuilder, ev: Evaluator, pid_m, batch_idx, rows, row_ok, ev_cols, start, stop_of):
        """The online softmax over key blocks [start, stop); returns (m_i, l_i, acc)."""
        q, k, v = self.q, self.k, self.v
        sT, sE, sEv = b.size(self.T), b.size(self.E), b.size(self.Ev)
        BM = TExpr("arg", ("BLOCK_M",), DType.i32, ())
        BN = TExpr("arg", ("BLOCK_N",), DType.i32, ())
        e_cols = b.let(b.expand_dims(b.arange("BLOCK_E"), 0), "e")
        e_rows = b.let(b.expand_dims(b.arange("BLOCK_E"), 1), "e_t")
        b.comment("the query tile stays in registers")
        q_ctx = operand_ctx(q, batch_idx, len(self.batch), (rows, e_cols))
        qt = b.let(b.cast(ev(q, Ctx(q_ctx.idx, b.and_(row_ok, b.lt(e_cols, sE)))), q.type.dtype), "q")
        if not self.mod:
            qk_scale = b.mul(ev(self.scale, Ctx((), None)) if self.scale is not None else 1.0, LOG2E)
            qk_scale = b.let(b.cast(qk_scale, self.acc), "qk_scale")
        m_i = b.declare(b.full(("BLOCK_M", 1), float("-inf"), self.acc), "m_i")
        l_i = b.declare(b.full(("BLOCK_M", 1), 0.0, self.acc), "l_i")
        acc = b.declare(b.full(("BLOCK_M", "BLOCK_EV"), 0.0, self.acc), "acc")
        full = kept = None
        if self.causal:
            b.comment("causal: keys past the diagonal of this row block are never loaded")
            i_first, i_last = self.positions(b, pid_m)
            last, seen = b.add(i_last, 1), b.add(i_first, 1)
            if self.T != self.S:    # + T - S, as two sizes (T - S may be negative)
                last = b.sub(b.add(last, sT), b.size(self.S))
                seen = b.sub(b.add(seen, sT), b.size(self.S))
            hi = b.let(b.maximum(b.minimum(last, sT), 0), "hi")
            b.comment("keys every row of the block sees: whole tiles of them run without the mask")
            full = b.let(b.mul(b.floordiv(b.maximum(b.minimum(seen, sT), 0), BN), BN), "full")
        elif self.range is not None:
            b.comment("the mask's positions bound the keys this row block can see: tiles outside are never loaded")
            i_first, i_last = self.positions(b, pid_m)
            def read(v):     # a value per batch entry (a KV-cache length), at this program's indices
                shape, nb = v.type.shape, max(v.type.rank - 2, 0)
                idx = [None if shape[a] == 1 else batch_idx[len(self.batch) - nb + a] for a in range(nb)]
                return ev(v, Ctx(tuple(idx + [None, None])[:v.type.rank], None))
            ops = TileOps(b, self.fg.names, read)
            lo, hi = self.range.bounds(ops, i_first, i_last, sT)
            lo = b.let(b.mul(b.floordiv(lo, BN), BN), "lo")
            hi = b.let(hi, "hi")
            start = lo if isinstance(start, int) and start == 0 else b.let(b.maximum(start, lo), "kv_lo")
            if self.range.inner is not None:
                b.comment("keys every row of the block keeps: whole tiles of them run without the mask")
                klo, khi = self.range.kept_by_all(ops, i_first, i_last, sT)
                a = b.let(b.minimum(b.maximum(lo, b.mul(b.cdiv(klo, BN), BN)), hi), "kept_lo")
                kept = (a, b.let(b.maximum(a, b.minimum(b.mul(b.floordiv(khi, BN), BN), hi)), "kept_hi"))
        else:
            hi = sT

        def step(s0, masked: bool):
            """One key block: scores, mask (``masked``: this block may hold keys a row does not
            see, or keys past T), online softmax, accumulate."""
            cols = b.let(b.expand_dims(b.add(s0, b.arange("BLOCK_N")), 0), "cols")
            cols_t = b.let(b.expand_dims(b.add(s0, b.arange("BLOCK_N")), 1), "cols_t")
            col_ok = b.lt(cols, sT)
            k_ctx = operand_ctx(k, batch_idx, len(self.batch), (cols, e_rows))
            e_ok = b.lt(e_rows, sE)
            kt = ev(k, Ctx(k_ctx.idx, b.and_(e_ok, col_ok) if masked else e_ok))
            raw = b.dot(qt, b.cast(kt, k.type.dtype), b.full(("BLOCK_M", "BLOCK_N"), 0.0, self.acc))
            keep = b.and_(row_ok, col_ok)
            if self.mod:
                b.comment("the spec's scores, evaluated on this tile (in log2 units for exp2)" if masked else
                          "the spec's scores without the masks, which keep every key here")
                s_ctx = operand_ctx(self.s, batch_idx, len(self.batch), (rows, cols))
                s_ctx = Ctx(s_ctx.idx, keep if masked else row_ok)
                ev.bind(self.mm.out, s_ctx, b.let(raw, "qk_raw"))
                if self.mm.out in self.group.outputs:    # saved for the backward
                    store(ev, self.fg.buffer(self.group, self.mm.out), self.mm.out, s_ctx)
                scores = self.s if masked else self.range.inner
                qk = b.let(b.mul(b.cast(ev(scores, s_ctx), self.acc), LOG2E), "qk")
            else:
                qk = b.let(b.mul(raw, qk_scale), "qk")
            if masked:
                if self.causal:
                    if self.T == self.S:
                        keep = b.and_(keep, b.binop("le", cols, rows))
                    else:   # j + S <= i + T: no negative size
                        keep = b.and_(keep, b.binop("le", b.add(cols, b.size(self.S)), b.add(rows, sT)))
                if self.mask is not None:
                    m_ctx = operand_ctx(self.mask, batch_idx, len(self.batch), (rows, cols))
                    keep = b.and_(keep, b.binop("ne", ev(self.mask, Ctx(m_ctx.idx, b.and_(row_ok, col_ok))), 0))
                qk = b.let(b.where(keep, qk, float("-inf")), "qk_masked")
            b.comment("online softmax: new running max, rescale what came before")
            m_new = b.let(b.maximum(m_i, b.reduce(qk, 1, "max")), "m_new")
            m_safe = b.let(b.where(b.binop("eq", m_new, float("-inf")), 0.0, m_new), "m_safe")
            p = b.let(b.unary("exp2", b.sub(qk, m_safe)), "p")
            alpha = b.let(b.unary("exp2", b.sub(m_i, m_safe)), "alpha")
            b.assign(l_i, b.add(b.mul(l_i, alpha), b.reduce(p, 1, "sum")))
            v_ctx = operand_ctx(v, batch_idx, len(self.batch), (cols_t, ev_cols))
            ev_ok = b.lt(ev_cols, sEv)
            vt = ev(v, Ctx(v_ctx.idx, b.and_(b.lt(cols_t, sT), ev_ok) if masked else ev_ok))
            b.assign(acc, b.dot(b.cast(p, v.type.dtype), b.cast(vt, v.type.dtype), b.mul(acc, alpha)))
            b.assign(m_i, m_new)

        # the stages over the keys: (where each ends, masked, its comment, the name of where it
        # begins when that is not where the one before ended)
        if full is not None:
            stages = [(full, False, "stage 1: key blocks below the diagonal, unmasked (padding rows compute and are "
                                    "never stored)", None),
                      (hi, True, "stage 2: the blocks on the diagonal, masked", "kv_diag")]
        elif kept is not None:
            stages = [(kept[0], True, "stage 1: the blocks before those every row keeps, masked", None),
                      (kept[1], False, "stage 2: the blocks every row keeps, unmasked (padding rows compute and are "
                                       "never stored)", "kv_kept"),
                      (hi, True, "stage 3: the blocks after them, masked", "kv_rest")]
        else:
            stages = [(hi, True, None, None)]
        begin = start
        for n, (end, masked, comment, name) in enumerate(stages):
            if comment:
                b.comment(comment)
            if n:
                prev = stages[n - 1][0]
                begin = prev if isinstance(start, int) and start == 0 else b.let(b.maximum(start, prev), name)
            with b.loop("start_n", begin, stop_of(end), BN) as s0:
                step(s0, masked)
        return m_i, l_i, acc

    def store_out(self, b: TileBuilder, ev: Evaluator, batch_idx, rows, row_ok, ev_cols, acc, m, l) -> None:
        """The output acc / l; and the log-sum-exp of each row's scores (in natural units:
        m and l are in log2 units) where the backward reads it."""
        out_ctx = Ctx(tuple(batch_idx) + (rows, ev_cols), b.and_(row_ok, b.lt(ev_cols, b.size(self.Ev))))
        if self.out in self.group.outputs:
            ev.bind(self.out, out_ctx, b.let(b.truediv(acc, l), "o"))
            store(ev, self.fg.buffer(self.group, self.out), self.out, out_ctx)
        if self.lse in self.group.outputs:
            lse_ctx = Ctx(tuple(batch_idx) + (rows,), row_ok)
            ev.bind(self.lse, lse_ctx, b.let(b.mul(b.add(m, b.unary("log2", l)), LN2), "lse"))
            store(ev, self.fg.buffer(self.group, self.lse), self.lse, lse_ctx)

    def grid(self, split: bool = False):
        g = [GridDim.of(self.rows, "BLOCK_M")]
        if self.outer or split:
            g.append(GridDim.of(self.nb))
        if split:
            g.append(GridDim.count("SPLIT_KV"))
        return g

    def extents(self) -> tuple:
        return (("BLOCK_M", self.rows), ("BLOCK_N", self.T))

    @property
    def family(self) -> str:
        """The autotuner's rule set (runtime/autotune.fits): scores computed on the tile keep
        more live state than loaded ones."""
        return "flash_mod" if self.mod else "flash"

    def doc(self, what: str) -> str:
        return (f"{self.group.name} ({what})" + (", causal" if self.causal else "")
                + (", masked" if self.mask is not None else "")
                + (", scores from the spec" if self.mod else "")
                + (f", {self.R} query heads per key/value head share each tile" if self.fold is not None else "")
                + (f", keys bounded by {self.range.text}" if self.range is not None else ""))


def _presets():
    return tuple(((("BLOCK_M", bm), ("BLOCK_N", bn)), w, st) for bm, bn, w, st in PRESETS)


def full_kernel(fl: Flash):
    b, pid_m, pid_b, batch_idx, rows, row_ok, ev_cols = fl.begin("")
    ev = Evaluator(b, fl.fg, fl.group)
    m_i, l_i, acc = fl.key_loop(b, ev, pid_m, batch_idx, rows, row_ok, ev_cols, 0, lambda hi: hi)
    b.comment("epilogue: normalise and store")
    fl.store_out(b, ev, batch_idx, rows, row_ok, ev_cols, acc, m_i, l_i)
    return b.kernel(fl.grid(), doc=fl.doc("flash attention: online softmax over key blocks"),
                    warps=(4, 8), stages=(2, 3, 4), presets=_presets(), extents=fl.extents(), family=fl.family)


def _scratch_ptr(b: TileBuilder, name: str, idx, dtype=DType.f32) -> TExpr:
    return address(b, name, dtype, idx)


def split_kernel(fl: Flash):
    b, pid_m, pid_b, batch_idx, rows, row_ok, ev_cols = fl.begin("_splitkv")
    split = b.tunable(Tunable("SPLIT_KV", rule=fl.split_rule()))
    BN = TExpr("arg", ("BLOCK_N",), DType.i32, ())
    b.comment("third grid axis -> this program's share of the keys")
    s = b.let(b.program_id(2), "split")
    chunk = b.let(b.mul(b.cdiv(b.cdiv(b.size(fl.T), split), BN), BN), "kv_chunk")
    start = b.let(b.mul(s, chunk), "kv_start")
    ev = Evaluator(b, fl.fg, fl.group)
    m_i, l_i, acc = fl.key_loop(b, ev, pid_m, batch_idx, rows, row_ok, ev_cols, start,
                                lambda hi: b.let(b.minimum(b.add(start, chunk), hi), "kv_stop"))
    b.comment("this split's running max, sum and unnormalised output, for the combine kernel")
    live = row_ok              # the grid's third axis has exactly SPLIT_KV programs
    qr = fl.qrows
    b.store(_scratch_ptr(b, fl.m_buf, (s, pid_b, qr), fl.acc), m_i, live)
    b.store(_scratch_ptr(b, fl.l_buf, (s, pid_b, qr), fl.acc), l_i, live)
    b.store(_scratch_ptr(b, fl.o_buf, (s, pid_b, qr, ev_cols), fl.acc), acc, b.and_(live, b.lt(ev_cols, b.size(fl.Ev))))
    return b.kernel(fl.grid(split=True), doc=fl.doc("flash-decoding: one split of the keys"),
                    warps=(4, 8), stages=(2, 3), presets=_presets(), extents=fl.extents(), family=fl.family)


def combine_kernel(fl: Flash):
    b, pid_m, pid_b, batch_idx, rows, row_ok, ev_cols = fl.begin("_combine")
    split = b.tunable(Tunable("SPLIT_KV", rule=fl.split_rule()))
    ev = Evaluator(b, fl.fg, fl.group)
    ev_ok = b.let(b.and_(row_ok, b.lt(ev_cols, b.size(fl.Ev))), "ev_mask")
    m_run = b.declare(b.full(("BLOCK_M", 1), float("-inf"), fl.acc), "m_run")
    l_run = b.declare(b.full(("BLOCK_M", 1), 0.0, fl.acc), "l_run")
    o_run = b.declare(b.full(("BLOCK_M", "BLOCK_EV"), 0.0, fl.acc), "o_run")
    b.comment("merge the splits: rescale each to the common max")
    with b.loop("s", 0, split, 1) as s:
        qr = fl.qrows
        m_s = b.let(b.load(_scratch_ptr(b, fl.m_buf, (s, pid_b, qr), fl.acc), row_ok, float("-inf")), "m_s")
        l_s = b.let(b.load(_scratch_ptr(b, fl.l_buf, (s, pid_b, qr), fl.acc), row_ok), "l_s")
        o_s = b.let(b.load(_scratch_ptr(b, fl.o_buf, (s, pid_b, qr, ev_cols), fl.acc), ev_ok), "o_s")
        m_new = b.let(b.maximum(m_run, m_s), "m_new")
        m_safe = b.let(b.where(b.binop("eq", m_new, float("-inf")), 0.0, m_new), "m_safe")
        alpha = b.let(b.unary("exp2", b.sub(m_run, m_safe)), "alpha")
        beta = b.let(b.unary("exp2", b.sub(m_s, m_safe)), "beta")
        b.assign(l_run, b.add(b.mul(l_run, alpha), b.mul(l_s, beta)))
        b.assign(o_run, b.add(b.mul(o_run, alpha), b.mul(o_s, beta)))
        b.assign(m_run, m_new)
    fl.store_out(b, ev, batch_idx, rows, row_ok, ev_cols, o_run, m_run, l_run)
    return b.kernel(fl.grid(), doc=fl.doc("flash-decoding: combine the splits"), warps=(4,), stages=(1,),
                    presets=tuple(((("BLOCK_M", bm), ("BLOCK_N", 16)), 4, 1) for bm in (16, 32, 64)))


def lower_flash(fg: FusedGraph, group: Group) -> list:
    fl = Flash(fg, group)
    name, *args = fl.split_rule()
    return [Alternative((split_kernel(fl), combine_kernel(fl)), Guard(name, tuple(args)), fl.scratch()),
            Alternative((full_kernel(fl),))]
