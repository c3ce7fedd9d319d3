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
    weights: tuple[str, ...] = ()              # bound once with .bind() (packed), not timed
    specialist_packs: bool = False             # the specialist prunes/quantizes the weight as the layout does
    group: str = "kernels"                     # which table: kernels, fusion, layouts, attention
    more: tuple = ()                           # further (name, function) baselines
    fills: dict = field(default_factory=dict)  # integer input -> fill value from the sizes (lengths)
    compiles: bool = True                      # False: torch.compile of the eager code is not timed (a
                                               # Python loop over thousands of steps, which dynamo unrolls)


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


MOE_SPEC = open(EXAMPLES / "moe.opf").read()


def _moe_eager(x, w_router, w1, w3, w2, k=2):
    """The usual PyTorch MoE layer: route, then a loop over experts with per-expert matmuls."""
    logits = (x @ w_router.T).float()
    top, experts = torch.topk(logits, k, dim=-1)
    gates = torch.softmax(top, dim=-1).to(x.dtype)
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        tok, slot = torch.nonzero(experts == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        h = F.silu(x[tok] @ w1[e].T) * (x[tok] @ w3[e].T)
        out.index_add_(0, tok, (h @ w2[e].T) * gates[tok, slot, None])
    return out


DECODE_ATTN_SPEC = """
op decode_attention(q: f16[B, H, S, E], k: f16[B, H, T, E], v: f16[B, H, T, E]) -> f16[B, H, S, E] {
    return softmax((q @ k.T) * rsqrt(cast(E, f32)), axis=-1) @ v
}
"""


def _sdpa_plain(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def _linear_spec(layout: str) -> str:
    ann = f" {layout}" if layout else ""
    return f"op linear(x: f16[M, K], w: f16[N, K]{ann}) -> f16[M, N] {{ return x @ w.T }}"


def _dense_linear(x, w):
    return x @ w.T


def _semi_structured(x, w):
    from torch.sparse import to_sparse_semi_structured
    cache = _semi_structured.__dict__.setdefault("cache", {})
    key = (w.data_ptr(), tuple(w.shape))
    if key not in cache:
        # prune 2:4 by magnitude as opforge does, then torch's sparse format
        g = w.reshape(w.shape[0], -1, 4)
        keep = torch.sort(torch.sort(-g.abs(), dim=2, stable=True).indices[..., :2], dim=2).values
        mask = torch.zeros_like(g, dtype=torch.bool).scatter_(2, keep, True)
        cache[key] = to_sparse_semi_structured((g * mask).reshape(w.shape))
    return x @ cache[key].t()


def _scaled_mm_fp8(x, w):
    """torch's fp8 GEMM (cuBLASLt) with per-row scales, activations quantized per call as
    opforge's @quant(fp8, act=fp8) does; the weight once."""
    cache = _scaled_mm_fp8.__dict__.setdefault("cache", {})
    key = (w.data_ptr(), tuple(w.shape))
    if key not in cache:     # the weight opforge's @quant(fp8) packs: same bits, same scales
        from ..ir.graph import Layout
        from ..runtime.packing import pack
        packed = pack(Layout("quant", ("fp8",)), w)
        cache[key] = (packed["bits"].view(torch.float8_e4m3fn), packed["scale"][None, :].contiguous())
    wq, sw = cache[key]
    sx = (x.float().abs().amax(dim=1, keepdim=True) / 448.0).clamp_min(1e-30)
    xq = (x.float() / sx).to(torch.float8_e4m3fn)
    # row-wise scales take a bf16 output in cuBLASLt
    return torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16)


LAYOUTS = {"int4": "@quant(int4, group=128)", "int8": "@quant(int8)", "fp8": "@quant(fp8)", "2:4": "@sparse(2:4)",
           "w8a8": "@quant(int8, act=int8)", "fp8act": "@quant(fp8, act=fp8)", "dense": ""}
SPECIALISTS = {"2:4": ("torch semi-structured 2:4", _semi_structured),
               "fp8act": ("torch._scaled_mm fp8 row-wise", _scaled_mm_fp8)}


def _layout_workloads() -> list[Workload]:
    out = []
    shapes = [(m, 4096, 4096) for m in (1, 4, 16)] + [(m, 11008, 4096) for m in (1, 4, 16)] + [(4096, 4096, 4096)]
    for m, n, k in shapes:
        for tag, ann in LAYOUTS.items():
            def nbytes(s, b, tag=tag):
                wbytes = {"int4": s["N"] * s["K"] // 2 + s["N"] * s["K"] // 128 * 3, "int8": s["N"] * s["K"] + 4 * s["N"],
                          "fp8": s["N"] * s["K"] + 4 * s["N"], "2:4": s["N"] * s["K"] + s["N"] * s["K"] // 8,
                          "w8a8": s["N"] * s["K"] + 4 * s["N"], "fp8act": s["N"] * s["K"] + 4 * s["N"],
                          "dense": 2 * s["N"] * s["K"]}[tag]
                # W8A8 also writes and reads back its quantized activations (a byte each, and a scale per row)
                act = 2 * (s["M"] * s["K"] + 4 * s["M"]) if tag in ("w8a8", "fp8act") else 0
                return wbytes + 2 * s["M"] * (s["K"] + s["N"]) + act
            out.append(Workload(
                f"linear_{tag.replace(':', '')}_M{m}_N{n}", _linear_spec(ann), "linear", {"M": m, "N": n, "K": k},
                {"M": min(m, 3), "N": 40, "K": 256},
                flops=lambda s: 2 * s["M"] * s["N"] * s["K"], bytes=nbytes, eager=_dense_linear,
                specialist=SPECIALISTS.get(tag, ("cuBLAS dense f16 (torch.matmul)", _dense_linear)),
                specialist_packs=tag in SPECIALISTS,
                bound="memory" if m <= 16 else "compute", weights=("w",), group="layouts",
                note=f"{ann or 'dense'}; eager and torch.compile run the dense f16 weight"))
    return out


WORKLOADS += [
    Workload("swiglu_mlp_fused", MLP_SPEC, "swiglu_mlp", {"M": 4096, "D": 4096, "F": 11008},
             {"M": 5, "D": 32, "F": 48},
             flops=lambda s: 2 * s["M"] * s["D"] * s["F"] * 3,
             bytes=lambda s, b: (2 * s["M"] * s["D"] + 3 * s["D"] * s["F"]) * b,
             eager=_mlp_eager, specialist=("cuBLAS (torch.matmul)", _mlp_eager), bound="compute", group="fusion",
             note="gate and up GEMMs share x in one kernel with silu*mul; 4096 tokens"),
    Workload("attention_decode", DECODE_ATTN_SPEC, "decode_attention",
             {"B": 1, "H": 32, "S": 1, "T": 4096, "E": 128}, {"B": 1, "H": 2, "S": 1, "T": 600, "E": 16},
             flops=lambda s: 4 * s["B"] * s["H"] * s["S"] * s["T"] * s["E"],
             bytes=lambda s, b: s["B"] * s["H"] * (2 * s["S"] + 2 * s["T"]) * s["E"] * b,
             eager=lambda q, k, v: torch.softmax((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5, -1) @ v,
             specialist=("SDPA", _sdpa_plain), bound="memory", group="fusion",
             note="one query token, 4096 cached keys (split-KV)"),
    Workload("moe_ffn", MOE_SPEC, "moe_ffn", {"T": 4096, "D": 4096, "F": 14336, "E": 8},
             {"T": 37, "D": 64, "F": 96, "E": 8},
             flops=lambda s: 2 * s["T"] * 2 * s["D"] * s["F"] * 3 + 2 * s["T"] * s["D"] * s["E"],
             bytes=lambda s, b: (2 * s["T"] * s["D"] + 3 * s["E"] * s["D"] * s["F"] + s["E"] * s["D"]) * b,
             eager=_moe_eager, specialist=("per-expert torch.matmul loop", _moe_eager), bound="compute",
             group="fusion", note="Mixtral shapes: 8 experts, top-2, 4096 tokens"),
]
WORKLOADS += _layout_workloads()


# -- attention as users write it (issue 14): one flash kernel per variant, against FlexAttention
# (compiled, with its block mask) and SDPA with the equivalent explicit mask or bias
VARIANTS_SPEC = open(EXAMPLES / "attention_variants.opf").read()
GQA_DECODE_SPEC = """
op gqa_decode(q: f16[B, G, R, 1, E], k: f16[B, G, 1, T, E], v: f16[B, G, 1, T, E], lens: i64[B]) -> f16[B, G, R, 1, E] {
    j = arange(T)[None, :]
    s = (q @ k.T) * rsqrt(cast(E, f32))
    return softmax(where(j < lens[:, None, None, None, None], s, -inf), axis=-1) @ v
}
"""


def _positions(S, T, device):
    return torch.arange(S, device=device)[:, None], torch.arange(T, device=device)[None, :]


def _window_eager(q, k, v, window):
    i, j = _positions(q.shape[-2], k.shape[-2], q.device)
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return torch.softmax(s.masked_fill(~((j <= i) & (j > i - window)), float("-inf")), -1) @ v


def _window_sdpa(q, k, v, window):
    i, j = _positions(q.shape[-2], k.shape[-2], q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (j > i - window))


def _softcap_eager(q, k, v, cap):
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    s = torch.tanh(s / cap) * cap
    i, j = _positions(q.shape[-2], k.shape[-2], q.device)
    return torch.softmax(s.masked_fill(j > i, float("-inf")), -1) @ v


def _alibi_bias(q):
    H, S = q.shape[1], q.shape[-2]
    i, j = _positions(S, S, q.device)
    slopes = torch.exp2(-8.0 * torch.arange(1, H + 1, device=q.device, dtype=torch.float32) / H)
    return slopes[:, None, None], i, j


def _alibi_eager(q, k, v):
    slopes, i, j = _alibi_bias(q)
    bias = torch.where(j <= i, slopes * (j - i), float("-inf")).to(q.dtype)
    return torch.softmax((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5 + bias, -1) @ v


def _alibi_sdpa(q, k, v):
    slopes, i, j = _alibi_bias(q)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.where(j <= i, slopes * (j - i), float("-inf")).to(q.dtype))


_FLEX: dict = {}


def _flex(name, q, k, v, score_mod=None, mask_mod=None, gqa=False):
    """FlexAttention (torch.compile'd, as its docs ask) with a block mask built once per shape."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention)
    key = (name, tuple(q.shape), tuple(k.shape))
    if key not in _FLEX and mask_mod is not None:
        _FLEX[key] = create_block_mask(mask_mod, None, None, q.shape[-2], k.shape[-2], device=q.device)
    return _FLEX["fn"](q, k, v, score_mod=score_mod, block_mask=_FLEX.get(key), enable_gqa=gqa)


def _window_flex(q, k, v, window):
    return _flex(f"window{window}", q, k, v, mask_mod=lambda b, h, i, j: (j <= i) & (j > i - window))


def _softcap_flex(q, k, v, cap):
    B, G, R, S, E = q.shape
    def score(s, b, h, i, j):
        return torch.tanh(s / cap) * cap
    out = _flex("softcap", q.reshape(B, G * R, S, E), k.reshape(B, G, S, E), v.reshape(B, G, S, E),
                score_mod=score, mask_mod=lambda b, h, i, j: j <= i, gqa=True)
    return out.reshape(B, G, R, S, E)


def _alibi_flex(q, k, v):
    H = q.shape[1]
    def score(s, b, h, i, j):
        return s + torch.exp2(-8.0 * (h + 1) / H) * (j - i)
    return _flex("alibi", q, k, v, score_mod=score, mask_mod=lambda b, h, i, j: j <= i)


def _gqa_decode_eager(q, k, v, lens):
    j = torch.arange(k.shape[-2], device=q.device)
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return torch.softmax(s.masked_fill(~(j < lens[:, None, None, None, None]), float("-inf")), -1) @ v


def _gqa_decode_sdpa(q, k, v, lens):
    B, G, R, _, E = q.shape
    j = torch.arange(k.shape[-2], device=q.device)
    mask = (j < lens[:, None, None, None])
    out = F.scaled_dot_product_attention(q.reshape(B, G * R, 1, E), k.reshape(B, G, -1, E), v.reshape(B, G, -1, E),
                                         attn_mask=mask, enable_gqa=True)
    return out.reshape(B, G, R, 1, E)


def _attn_bytes(s, b, kv_heads=None):
    h = s.get("H", s.get("G", 1) * s.get("R", 1))
    hk = kv_heads(s) if kv_heads else h
    return s["B"] * (2 * h * s["S"] + 2 * hk * s["T"]) * s["E"] * b


WORKLOADS += [
    Workload("attn_sliding_window", VARIANTS_SPEC, "sliding_window",
             {"B": 1, "H": 32, "S": 8192, "T": 8192, "E": 128}, {"B": 1, "H": 2, "S": 40, "T": 40, "E": 16},
             flops=lambda s: 4 * s["B"] * s["H"] * s["S"] * min(512, s["S"]) * s["E"],
             bytes=lambda s, b: _attn_bytes(s, b), eager=_window_eager,
             specialist=("FlexAttention", _window_flex), more=(("SDPA (mask)", _window_sdpa),),
             scalars={"window": 512}, bound="compute", group="attention",
             note="Mistral sliding window 512 at 8K: about 1/16 of the causal tiles"),
    Workload("attn_softcap_gqa", VARIANTS_SPEC, "softcap_gqa",
             {"B": 1, "G": 8, "R": 4, "S": 4096, "T": 4096, "E": 128}, {"B": 1, "G": 2, "R": 2, "S": 33, "T": 33, "E": 16},
             flops=lambda s: 4 * s["B"] * s["G"] * s["R"] * s["S"] * s["S"] * s["E"] // 2,
             bytes=lambda s, b: _attn_bytes(s, b, kv_heads=lambda s: s["G"]), eager=_softcap_eager,
             specialist=("FlexAttention", _softcap_flex), scalars={"cap": 50.0}, bound="compute", group="attention",
             note="Gemma 2: soft-capped causal GQA at 4K (32 query heads, 8 KV heads); SDPA has no soft-capping"),
    Workload("attn_alibi", VARIANTS_SPEC, "alibi",
             {"B": 1, "H": 32, "S": 4096, "T": 4096, "E": 128}, {"B": 1, "H": 2, "S": 33, "T": 33, "E": 16},
             flops=lambda s: 4 * s["B"] * s["H"] * s["S"] * s["S"] * s["E"] // 2,
             bytes=lambda s, b: _attn_bytes(s, b), eager=_alibi_eager,
             specialist=("FlexAttention", _alibi_flex), more=(("SDPA (bias)", _alibi_sdpa),),
             bound="compute", group="attention", note="ALiBi causal at 4K"),
    Workload("attn_gqa_decode", GQA_DECODE_SPEC, "gqa_decode",
             {"B": 8, "G": 8, "R": 8, "T": 8192, "E": 128, "S": 1}, {"B": 2, "G": 2, "R": 4, "T": 300, "E": 16, "S": 1},
             flops=lambda s: 4 * s["B"] * s["G"] * s["R"] * s["T"] * s["E"],
             bytes=lambda s, b: s["B"] * s["G"] * (2 * s["R"] + 2 * s["T"]) * s["E"] * b,
             eager=_gqa_decode_eager, specialist=("SDPA (enable_gqa)", _gqa_decode_sdpa),
             fills={"lens": lambda s: s["T"]}, bound="memory", group="attention",
             note="decode over an 8K KV cache (every entry filled), 8 query heads per KV head"),
]


# -- recurrences (issue 15): GLA against flash-linear-attention, a GRU against cuDNN ---------------
GLA_SPEC = """
op gla(q: f32[B, S, H, E], k: f32[B, S, H, E], v: f32[B, S, H, F], g: f32[B, S, H, E]) -> f32[S, B, H, F] {
    o = scan t in S with h: f32[B, H, E, F] = 0.0 {
        h_next = exp(g[:, t])[:, :, :, None] * h + k[:, t][:, :, :, None] * v[:, t][:, :, None, :]
        return h_next, sum(q[:, t][:, :, :, None] * h_next, axis=2)
    }
    return o
}"""

GRU_SPEC = """
op gru(x: f32[S, B, I], h0: f32[B, F], w_ih: f32[3 * F, I], w_hh: f32[3 * F, F], b_ih: f32[3 * F], b_hh: f32[3 * F]) -> f32[S, B, F] {
    y = scan t in S with h = h0 {
        gi = x[t] @ w_ih.T + b_ih
        gh = h @ w_hh.T + b_hh
        r = sigmoid(gi[:, :F] + gh[:, :F])
        z = sigmoid(gi[:, F:2 * F] + gh[:, F:2 * F])
        n = tanh(gi[:, 2 * F:] + r * gh[:, 2 * F:])
        h_next = (1.0 - z) * n + z * h
        return h_next, h_next
    }
    return y
}"""


def _gla_eager(q, k, v, g):
    """The recurrence as PyTorch code: a loop over the steps, the state in f32."""
    B, S, H, E = q.shape
    h = q.new_zeros(B, H, E, v.shape[-1], dtype=torch.float32)
    out = []
    for t in range(S):
        h = g[:, t].float().exp().unsqueeze(-1) * h + k[:, t].float().unsqueeze(-1) * v[:, t].float().unsqueeze(-2)
        out.append((q[:, t].float().unsqueeze(-1) * h).sum(-2))
    return torch.stack(out).to(q.dtype)


def _gla_fla(q, k, v, g):
    """flash-linear-attention's chunk_gla (its chunked Triton kernels), scale 1 as the spec."""
    from fla.ops.gla import chunk_gla
    o, _ = chunk_gla(q, k, v, g, scale=1.0)
    return o.transpose(0, 1)


def _gru_eager(x, h0, w_ih, w_hh, b_ih, b_hh):
    F = h0.shape[-1]
    gi = x @ w_ih.T + b_ih
    h, out = h0, []
    for t in range(x.shape[0]):
        gh = h @ w_hh.T + b_hh
        r = torch.sigmoid(gi[t, :, :F] + gh[:, :F])
        z = torch.sigmoid(gi[t, :, F:2 * F] + gh[:, F:2 * F])
        n = torch.tanh(gi[t, :, 2 * F:] + r * gh[:, 2 * F:])
        h = (1 - z) * n + z * h
        out.append(h)
    return torch.stack(out)


def _gru_cudnn(x, h0, w_ih, w_hh, b_ih, b_hh):
    """torch.nn.GRU's own call (cuDNN on a GPU), with these weights."""
    y, _ = torch._VF.gru(x, h0.unsqueeze(0), [w_ih, w_hh, b_ih, b_hh], True, 1, 0.0, False, False, False)
    return y


def _gla_workload(S: int) -> Workload:
    return Workload(f"gla_{S // 1024}k", GLA_SPEC, "gla", {"B": 1, "S": S, "H": 16, "E": 128, "F": 128},
                    {"B": 1, "S": 9, "H": 2, "E": 8, "F": 4},
                    flops=lambda s: 5 * s["B"] * s["S"] * s["H"] * s["E"] * s["F"],
                    bytes=lambda s, b: s["B"] * s["S"] * s["H"] * (3 * s["E"] + 2 * s["F"]) * b,
                    eager=_gla_eager, specialist=("fla chunk_gla", _gla_fla), group="recurrences", compiles=False,
                    note=f"gated linear attention, {S} steps, 16 heads, E = F = 128 (the state kept in the spec's dtype)")


WORKLOADS += [_gla_workload(2048), _gla_workload(8192), _gla_workload(32768),
              Workload("gru", GRU_SPEC, "gru", {"S": 1024, "B": 64, "I": 256, "F": 256},
                       {"S": 7, "B": 3, "I": 5, "F": 6},
                       flops=lambda s: 2 * s["S"] * s["B"] * 3 * s["F"] * (s["I"] + s["F"]),
                       bytes=lambda s, b: (s["S"] * s["B"] * (s["I"] + s["F"]) + 3 * s["F"] * (s["I"] + s["F"])) * b,
                       eager=_gru_eager, specialist=("cuDNN (torch.nn.GRU)", _gru_cudnn), group="recurrences",
                       compiles=False,
                       note="GRU layer, 1024 steps, batch 64, hidden 256 (past the one kernel's F <= 128: steps)")]


def by_name(names: str | None) -> list[Workload]:
    if not names:
        return [w for w in WORKLOADS if w.group != "layouts"]
    groups = {w.group for w in WORKLOADS}
    if names in groups:
        return [w for w in WORKLOADS if w.group == names]
    want = [n.strip() for n in names.split(",") if n.strip()]
    known = {w.name: w for w in WORKLOADS}
    missing = [n for n in want if n not in known]
    if missing:
        raise SystemExit(f"unknown workload(s) {', '.join(missing)}; known: {', '.join(known)}")
    return [known[n] for n in want]
