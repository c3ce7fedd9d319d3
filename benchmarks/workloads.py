"""Benchmark workloads: the spec op, its sizes, the FLOPs and the fewest bytes it must move,
and the baselines it is compared with (PyTorch eager, torch.compile of the same eager code,
and the specialist library where there is one).

Sizes are Llama-7B's (D=4096, F=11008, 32 heads of 128, sequence 2048) unless noted;
``cpu`` sizes are tiny and exist only for ``--cpu-smoke``, which checks the harness itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

SOFTMAX_SPEC = """
op softmax_rows(x: f16[R, T]) -> f16[R, T] { return softmax(x, axis=-1) }
"""
RMS_SPEC = """
op rms_norm(x: f16[M, D], w: f16[D], eps: f32 = 1e-5) -> f16[M, D] {
    xf = cast(x, f32)
    return cast(xf * rsqrt(mean(xf * xf, axis=-1, keepdim=true) + eps), f16) * w
}
"""
MLP_SPEC = """
op swiglu_mlp(x: f16[M, D], wg: f16[F, D], wu: f16[F, D], wd: f16[D, F]) -> f16[M, D] {
    return (silu(x @ wg.T) * (x @ wu.T)) @ wd.T
}
"""
ATTN_SPEC = """
op attention(q: f16[B, H, S, E], k: f16[B, H, T, E], v: f16[B, H, T, E]) -> f16[B, H, S, E] {
    s = (q @ k.T) * rsqrt(cast(E, f32))
    return softmax(where(causal(S, T), s, -inf), axis=-1) @ v
}
"""


@dataclass
class Workload:
    name: str
    spec: str
    op: str
    sizes: dict
    cpu_sizes: dict
    flops: Callable[[dict], float]
    bytes: Callable[[dict, int], float]       # (sizes, itemsize) -> minimum bytes moved
    eager: Callable
    specialist: tuple[str, Callable] | None = None
    bound: str = "memory"                      # which roofline term should dominate
    note: str = ""
    scalars: dict = field(default_factory=dict)


def _rms_eager(x, w, eps=1e-5):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def _mlp_eager(x, wg, wu, wd):
    return (F.silu(x @ wg.T) * (x @ wu.T)) @ wd.T


def _attn_eager(q, k, v):
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    S, T = s.shape[-2:]
    mask = torch.ones(S, T, dtype=torch.bool, device=q.device).tril(T - S)
    return torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ v


def _attn_sdpa(q, k, v):
    S, T = q.shape[-2], k.shape[-2]
    if S == T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    mask = torch.ones(S, T, dtype=torch.bool, device=q.device).tril(T - S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


WORKLOADS: list[Workload] = [
    Workload("rms_norm", RMS_SPEC, "rms_norm", {"M": 2048, "D": 4096}, {"M": 5, "D": 40},
             flops=lambda s: 4 * s["M"] * s["D"],
             bytes=lambda s, b: (2 * s["M"] * s["D"] + s["D"]) * b,
             eager=_rms_eager),
    Workload("softmax", SOFTMAX_SPEC, "softmax_rows", {"R": 32 * 2048, "T": 2048}, {"R": 6, "T": 33},
             flops=lambda s: 5 * s["R"] * s["T"],
             bytes=lambda s, b: 2 * s["R"] * s["T"] * b,
             eager=lambda x: torch.softmax(x, dim=-1), note="attention-score rows, 32 heads x 2048"),
    Workload("swiglu_mlp", MLP_SPEC, "swiglu_mlp", {"M": 2048, "D": 4096, "F": 11008},
             {"M": 5, "D": 32, "F": 48},
             flops=lambda s: 2 * s["M"] * s["D"] * s["F"] * 3,
             bytes=lambda s, b: (2 * s["M"] * s["D"] + 3 * s["D"] * s["F"]) * b,
             eager=_mlp_eager, specialist=("cuBLAS (torch.matmul)", _mlp_eager), bound="compute"),
    Workload("attention", ATTN_SPEC, "attention", {"B": 1, "H": 32, "S": 2048, "T": 2048, "E": 128},
             {"B": 1, "H": 2, "S": 9, "T": 9, "E": 16},
             flops=lambda s: 4 * s["B"] * s["H"] * s["S"] * s["T"] * s["E"] // 2,   # causal: half the tiles
             bytes=lambda s, b: s["B"] * s["H"] * (2 * s["S"] + 2 * s["T"]) * s["E"] * b,
             eager=_attn_eager, specialist=("SDPA (flash backend)", _attn_sdpa), bound="compute",
             note="causal prefill"),
]


def by_name(names: str | None) -> list[Workload]:
    if not names:
        return list(WORKLOADS)
    want = [n.strip() for n in names.split(",") if n.strip()]
    known = {w.name: w for w in WORKLOADS}
    missing = [n for n in want if n not in known]
    if missing:
        raise SystemExit(f"unknown workload(s) {', '.join(missing)}; known: {', '.join(known)}")
    return [known[n] for n in want]
