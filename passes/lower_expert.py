"""Lowering expert_matmul directly: one program per (token, choice) pair and block of output
columns, reading the chosen expert's weight rows (a gathered matrix-vector product).

Correct for any routing, but it reads an expert's weights once per token that chose it: the
MoE dispatch rewrite (passes/moe_dispatch.py) replaces it with grouped GEMMs over tokens sorted
by expert where the whole MoE pattern is present.
"""
from __future__ import annotations

from ..ir.tile import GridDim, Tunable
from ..ir.tile_builder import TileBuilder
from ..ir.types import DType
from .fusion import FusedGraph, Group
from .lower_eval import Ctx, Evaluator
from .lower_row import kernel_name, store


def lower_expert(fg: FusedGraph, group: Group) -> list:
    (node,) = [n for n in group.nodes if n.op == "expert_matmul"]
    x, w, idx = node.inputs
    out = node.out
    T, KSEL = idx.type.shape
    _, N, K = w.type.shape
    b = TileBuilder(kernel_name(fg, group))
    BN = b.tunable(Tunable("BLOCK_N", (32, 64, 128), cpu=32))
    BK = b.tunable(Tunable("BLOCK_K", (32, 64, 128, 256), cpu=64))
    ev = Evaluator(b, fg, group)
    b.comment("program -> (token, choice) and a block of output columns")
    pair = b.let(b.program_id(0), "pair")
    t = b.let(b.floordiv(pair, b.size(KSEL)), "token")
    j = b.let(b.mod(pair, b.size(KSEL)), "choice")
    pid_n = b.let(b.program_id(1), "pid_n")
    rn = b.let(b.expand_dims(b.add(b.mul(pid_n, BN), b.arange("BLOCK_N")), 1), "rn")
    sN, sK = b.size(N), b.size(K)
    expert = b.let(b.cast(ev(idx, Ctx((t, j), None)), DType.i64), "expert")
    acc = b.declare(b.full(("BLOCK_N", "BLOCK_K"), 0.0, DType.f32), "acc")
    with b.loop("k0", 0, sK, BK) as k0:
        rk = b.let(b.expand_dims(b.add(k0, b.arange("BLOCK_K")), 0), "rk")
        kmask = b.lt(rk, sK)
        x_idx = (t, rk) if x.type.rank == 2 else (t, j, rk)
        xt = b.widen(ev(x, Ctx(x_idx, kmask)))
        wt = b.widen(ev(w, Ctx((expert, rn, rk), b.and_(b.lt(rn, sN), kmask))))
        b.assign(acc, b.add(acc, b.mul(wt, xt)))
    res = b.let(b.reduce(acc, 1, "sum"), "res")
    ctx = Ctx((t, j, rn), b.lt(rn, sN))
    ev.bind(out, ctx, res)
    store(ev, fg.buffer(group, out), out, ctx)
    kernel = b.kernel([GridDim.of(T * KSEL), GridDim.of(N, "BLOCK_N")],
                      doc=f"{group.name} (expert matmul): one (token, choice) per program", warps=(2, 4))
    return [(kernel, None, 0)]
