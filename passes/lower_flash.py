"""Lowering flash_attention: the Triton tutorial's fused attention forward, generalised.

A program per BLOCK_M query rows of one batch entry (batch axes, broadcast ones included, on
the second grid axis, so grouped-query attention is just broadcasting). The q tile stays in
registers; key/value blocks stream through with an online softmax (running max m, running sum
l, rescaled accumulator), so the S x T scores never reach memory. Causal masks stop the key
loop at the diagonal (fully masked tiles are never loaded); other masks are evaluated per tile.
Any head dim works: BLOCK_E is its next power of two, masked. Rows whose keys are all masked
give NaN, as softmax of all -inf does in torch.
"""
from __future__ import annotations

from ..ir.tile import GridDim, Tunable
from ..ir.tile_builder import TileBuilder
from ..ir.types import DType
from .fusion import FusedGraph, Group
from .lower_eval import Ctx, Evaluator
from .lower_matmul import operand_ctx
from .lower_row import kernel_name, prod, store

LOG2E = 1.4426950408889634


def lower_flash(fg: FusedGraph, group: Group) -> list:
    (node,) = group.nodes
    q, k, v = node.inputs[:3]
    rest = list(node.inputs[3:])
    scale = rest.pop(0) if node.attrs["scale"] else None
    mask = rest.pop(0) if node.attrs["mask"] == "tensor" else None
    causal = node.attrs["mask"] == "causal"
    out = node.out
    S, E = q.type.shape[-2:]
    T = k.type.shape[-2]
    Ev = v.type.shape[-1]
    batch = tuple(out.type.shape[:-2])
    b = TileBuilder(kernel_name(fg, group))
    BM = b.tunable(Tunable("BLOCK_M", (16, 32, 64, 128), cpu=16))
    BN = b.tunable(Tunable("BLOCK_N", (16, 32, 64, 128), cpu=16))
    b.tunable(Tunable("BLOCK_E", covers=E, lo=16, hi=512))
    b.tunable(Tunable("BLOCK_EV", covers=Ev, lo=16, hi=512))
    sS, sT, sE, sEv = b.size(S), b.size(T), b.size(E), b.size(Ev)
    ev = Evaluator(b, fg, group)

    b.comment("program -> a block of query rows of one batch entry")
    pid_m = b.let(b.program_id(0), "pid_m")
    batch_idx = []
    if batch:
        pid_b = b.let(b.program_id(1), "pid_b")
        inner = 1
        for a in reversed(range(len(batch))):
            d = batch[a]
            if d == 1:
                batch_idx.insert(0, None)
                continue
            qd = b.floordiv(pid_b, b.size(inner)) if inner != 1 else pid_b
            batch_idx.insert(0, b.let(b.mod(qd, b.size(d)) if a else qd, f"b{a}"))
            inner = inner * d
    rows = b.let(b.expand_dims(b.add(b.mul(pid_m, BM), b.arange("BLOCK_M")), 1), "rows")
    row_ok = b.let(b.lt(rows, sS), "row_mask")
    e_cols = b.let(b.expand_dims(b.arange("BLOCK_E"), 0), "e")
    e_rows = b.let(b.expand_dims(b.arange("BLOCK_E"), 1), "e_t")
    ev_cols = b.let(b.expand_dims(b.arange("BLOCK_EV"), 0), "ev")
    b.comment("the query tile stays in registers")
    q_ctx = operand_ctx(q, batch_idx, len(batch), (rows, e_cols))
    qt = b.let(b.cast(ev(q, Ctx(q_ctx.idx, b.and_(row_ok, b.lt(e_cols, sE)))), q.type.dtype), "q")
    qk_scale = b.mul(ev(scale, Ctx((), None)) if scale is not None else 1.0, LOG2E)
    qk_scale = b.let(b.cast(qk_scale, DType.f32), "qk_scale")
    m_i = b.declare(b.full(("BLOCK_M", 1), float("-inf"), DType.f32), "m_i")
    l_i = b.declare(b.full(("BLOCK_M", 1), 0.0, DType.f32), "l_i")
    acc = b.declare(b.full(("BLOCK_M", "BLOCK_EV"), 0.0, DType.f32), "acc")
    if causal:
        b.comment("causal: keys past the diagonal of this row block are never loaded")
        shift = T - S
        last = b.add(b.mul(b.add(pid_m, 1), BM), b.size(shift)) if shift != 0 else b.mul(b.add(pid_m, 1), BM)
        hi = b.let(b.maximum(b.minimum(last, sT), 0), "hi")
    else:
        hi = sT
    with b.loop("start_n", 0, hi, BN) as start:
        cols = b.let(b.expand_dims(b.add(start, b.arange("BLOCK_N")), 0), "cols")
        cols_t = b.let(b.expand_dims(b.add(start, b.arange("BLOCK_N")), 1), "cols_t")
        col_ok = b.lt(cols, sT)
        k_ctx = operand_ctx(k, batch_idx, len(batch), (cols, e_rows))
        kt = ev(k, Ctx(k_ctx.idx, b.and_(b.lt(e_rows, sE), col_ok)))
        qk = b.let(b.mul(b.dot(qt, b.cast(kt, k.type.dtype), b.full(("BLOCK_M", "BLOCK_N"), 0.0, DType.f32)),
                         qk_scale), "qk")
        keep = b.and_(row_ok, col_ok)
        if causal:
            keep = b.and_(keep, b.binop("le", cols, b.add(rows, b.size(T - S)) if T - S != 0 else rows))
        if mask is not None:
            m_ctx = operand_ctx(mask, batch_idx, len(batch), (rows, cols))
            keep = b.and_(keep, b.binop("ne", ev(mask, Ctx(m_ctx.idx, b.and_(row_ok, col_ok))), 0))
        qk = b.let(b.where(keep, qk, float("-inf")), "qk_masked")
        b.comment("online softmax: new running max, rescale what came before")
        m_new = b.let(b.maximum(m_i, b.reduce(qk, 1, "max")), "m_new")
        m_safe = b.let(b.where(b.binop("eq", m_new, float("-inf")), 0.0, m_new), "m_safe")
        p = b.let(b.unary("exp2", b.sub(qk, m_safe)), "p")
        alpha = b.let(b.unary("exp2", b.sub(m_i, m_safe)), "alpha")
        b.assign(l_i, b.add(b.mul(l_i, alpha), b.reduce(p, 1, "sum")))
        v_ctx = operand_ctx(v, batch_idx, len(batch), (cols_t, ev_cols))
        vt = ev(v, Ctx(v_ctx.idx, b.and_(b.lt(cols_t, sT), b.lt(ev_cols, sEv))))
        b.assign(acc, b.dot(b.cast(p, v.type.dtype), b.cast(vt, v.type.dtype), b.mul(acc, alpha)))
        b.assign(m_i, m_new)
    b.comment("epilogue: normalise and store")
    out_ctx = Ctx(tuple(batch_idx) + (rows, ev_cols), b.and_(row_ok, b.lt(ev_cols, sEv)))
    ev.bind(out, out_ctx, b.let(b.truediv(acc, l_i), "o"))
    store(ev, fg.buffer(group, out), out, out_ctx)
    grid = [GridDim.of(S, "BLOCK_M")] + ([GridDim.of(prod(batch))] if batch else [])
    presets = tuple(((("BLOCK_M", bm), ("BLOCK_N", bn)), w, st)
                    for bm, bn, w, st in ((128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4),
                                          (128, 32, 4, 3), (16, 64, 4, 3), (16, 128, 4, 2)))
    kernel = b.kernel(grid, doc=f"{group.name} (flash attention): online softmax over key blocks"
                                + (", causal" if causal else "") + (", masked" if mask is not None else ""),
                      warps=(4, 8), stages=(2, 3, 4), presets=presets)
    return [(kernel, None, 0)]
