"""Every op of every example spec against an independent, hand-written PyTorch version.

The opforge reference executor runs the canonical (inlined, canonicalised) graph on seeded
random inputs, at the sizes of the file's ``# shapes:`` line and at awkward sizes (1, 7, odd
sizes; derived sizes such as D / E kept whole). Two comparisons per case:

- the float64 run (``run_graph(..., check=True)``) against the PyTorch version computed in
  float64 from the same inputs, with a tight tolerance: both compute the same mathematics, so
  only the order of float64 roundings may differ;
- the run in the spec's dtypes against the same float64 version, within ``tolerance_for(g)``.

Layout annotations (@quant, @sparse, @lowrank) describe the dense mathematics at this level, so
the PyTorch versions below use the dense weight, exactly as written in the spec.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from opforge.frontend import load_program
from opforge.ir.dims import evaluate
from opforge.ir.torch_dtypes import to_torch
from opforge.passes.pipeline import canonical_graph
from opforge.runtime.inputs import random_inputs
from opforge.runtime.sizes import size_bindings
from opforge.runtime.reference import run_graph, run_reference
from opforge.runtime.sizes import file_shapes
from opforge.runtime.tolerances import assert_close, tolerance_for

from .conftest import EXAMPLE_FILES, EXAMPLES

F64_TOL = dict(rtol=1e-9, atol=1e-9)


# -- independent PyTorch versions (float64 in, float64 out) -------------------------------------
def t_rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * w


def t_rotary(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def t_attention(q, k, v):
    # scaled_dot_product_attention's causal mask is j <= i, the spec's causal(S, S).
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def t_swiglu_mlp(x, wg, wu, wd):
    return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


def t_split_heads(x, e):
    b, s, d = x.shape
    return x.view(b, s, d // e, e).transpose(1, 2)


def t_llama_block(x, attn_norm, wq, wk, wv, wo, cos, sin, mlp_norm, wg, wu, wd, eps=1e-5):
    b, s, d = x.shape
    e = cos.shape[-1]
    h = t_rms_norm(x, attn_norm, eps)
    q = t_rotary(t_split_heads(F.linear(h, wq), e), cos, sin)
    k = t_rotary(t_split_heads(F.linear(h, wk), e), cos, sin)
    v = t_split_heads(F.linear(h, wv), e)
    o = t_attention(q, k, v).transpose(1, 2).reshape(b, s, d)
    x1 = x + F.linear(o, wo)
    return x1 + t_swiglu_mlp(t_rms_norm(x1, mlp_norm, eps), wg, wu, wd)


def t_router(x, w_router):
    logits = x @ w_router.T
    top, experts = torch.topk(logits, k=2, dim=-1)
    return torch.softmax(top, dim=-1), experts.to(torch.int32)


def t_moe_ffn(x, w_router, w1, w3, w2):
    gates, experts = t_router(x, w_router)
    e = experts.long()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(e.shape[1]):
            w = e[t, j]
            h = F.silu(w1[w] @ x[t]) * (w3[w] @ x[t])
            out[t] += gates[t, j] * (w2[w] @ h)
    return out


def t_lora_linear(x, w, a, b, scale):
    return x @ w.T + (x @ a.T) @ b.T * scale


def t_lora_linear_gelu(x, w, bias, a, b, scale):
    return F.gelu(x @ w.T + bias + (x @ a.T) @ b.T * scale, approximate="tanh")


def t_linear_w8_explicit(x, wq, scale, bias):
    return (x @ wq.to(torch.float64).T) * scale + bias


def t_dense_linear(x, w):
    return F.linear(x, w)


def t_dense_linear_bias(x, w, bias):
    return F.linear(x, w, bias)


def _positions(s, t):
    return torch.arange(s)[:, None], torch.arange(t)[None, :]


def t_sliding_window(q, k, v, window):
    i, j = _positions(q.shape[-2], k.shape[-2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (j > i - window))


def t_softcap_gqa(q, k, v, cap):
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    s = torch.tanh(s / cap) * cap
    i, j = _positions(q.shape[-2], k.shape[-2])
    return torch.softmax(torch.where(j <= i, s, float("-inf")), dim=-1) @ v


def t_alibi(q, k, v):
    i, j = _positions(q.shape[-2], k.shape[-2])
    h = q.shape[1]
    # 2^(-8 (h+1) / H), with the spec's literal -8 ln 2 as the f32 it is
    c = torch.tensor(-8.0 * math.log(2.0), dtype=torch.float32).item()
    slopes = torch.exp(torch.arange(1, h + 1, dtype=q.dtype) * c / h)
    bias = slopes[:, None, None] * (j - i).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.where(j <= i, bias, float("-inf")))


def t_packed_docs(q, k, v, doc):
    i, j = _positions(q.shape[-2], k.shape[-2])
    same = doc[:, None, :, None] == doc[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=same & (j <= i))


def t_decode_kv(q, k, v, lens):
    j = torch.arange(k.shape[-2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=j < lens[:, None, None, None])


# recurrences (examples/recurrent.opf): naive step-by-step loops, written from the papers' forms;
# the GRU is torch.nn.GRU itself (its weights set to the spec's)
def t_gla(q, k, v, gate, h0):
    h, out = h0, []
    for t in range(q.shape[0]):
        h = torch.sigmoid(gate[t]).unsqueeze(-1) * h + torch.einsum("he,hf->hef", k[t], v[t])
        out.append(torch.einsum("he,hef->hf", q[t], h))
    return _stack(out, (0,) + tuple(v.shape[1:]), v), h


def t_selective_scan(x, dt, a, bm, cm, d):
    h = torch.zeros(x.shape[1], x.shape[2], a.shape[1], dtype=x.dtype)
    out = []
    for t in range(x.shape[0]):
        h = torch.exp(dt[t].unsqueeze(-1) * a) * h + (dt[t] * x[t]).unsqueeze(-1) * bm[t].unsqueeze(1)
        out.append(torch.einsum("bdn,bn->bd", h, cm[t]) + d * x[t])
    return _stack(out, (0,) + tuple(x.shape[1:]), x)


def t_retention(q, k, v, gamma):
    s = torch.zeros(q.shape[1], q.shape[2], v.shape[2], dtype=q.dtype)
    out = []
    for t in range(q.shape[0]):
        s = gamma[:, None, None] * s + torch.einsum("he,hf->hef", k[t], v[t])
        out.append(torch.einsum("he,hef->hf", q[t], s))
    return _stack(out, (0,) + tuple(v.shape[1:]), v)


def t_gru(x, h0, w_ih, w_hh, b_ih, b_hh):
    gru = torch.nn.GRU(x.shape[2], h0.shape[1]).to(x.dtype)
    with torch.no_grad():
        for name, w in (("weight_ih_l0", w_ih), ("weight_hh_l0", w_hh), ("bias_ih_l0", b_ih), ("bias_hh_l0", b_hh)):
            getattr(gru, name).copy_(w)
        if x.shape[0] == 0:
            return torch.empty(0, *h0.shape, dtype=x.dtype), h0
        y, h = gru(x, h0.unsqueeze(0))
    return y, h[0]


def _stack(xs, empty_shape, like):
    return torch.stack(xs) if xs else torch.empty(empty_shape, dtype=like.dtype)


IMPLS = {
    ("llama", "rms_norm"): lambda i: t_rms_norm(i["x"], i["w"], i["eps"]),
    ("llama", "rotary"): lambda i: t_rotary(i["x"], i["cos"], i["sin"]),
    ("llama", "attention"): lambda i: t_attention(i["q"], i["k"], i["v"]),
    ("llama", "swiglu_mlp"): lambda i: t_swiglu_mlp(i["x"], i["wg"], i["wu"], i["wd"]),
    ("llama", "split_heads"): lambda i: t_split_heads(i["x"], i["x"].shape[-1] // i["heads"]),
    ("llama", "llama_block"): lambda i: t_llama_block(**i),
    ("moe", "router"): lambda i: t_router(i["x"], i["w_router"]),
    ("moe", "moe_ffn"): lambda i: t_moe_ffn(**i),
    ("lora", "lora_linear"): lambda i: t_lora_linear(**i),
    ("lora", "lora_linear_gelu"): lambda i: t_lora_linear_gelu(**i),
    ("quant_linear", "linear_w8_explicit"): lambda i: t_linear_w8_explicit(**i),
    ("quant_linear", "linear_int8"): lambda i: t_dense_linear_bias(**i),
    ("quant_linear", "linear_w8a8"): lambda i: t_dense_linear(**i),
    ("quant_linear", "linear_q4"): lambda i: t_dense_linear(**i),
    ("quant_linear", "linear_fp8"): lambda i: t_dense_linear(**i),
    ("quant_linear", "linear_fp8_act"): lambda i: t_dense_linear(**i),
    ("quant_linear", "linear_auto"): lambda i: t_dense_linear(**i),
    ("sparse_linear", "linear_24"): lambda i: t_dense_linear_bias(**i),
    ("sparse_linear", "linear_block_sparse"): lambda i: t_dense_linear(**i),
    ("sparse_linear", "linear_lowrank"): lambda i: t_dense_linear(**i),
    ("attention_variants", "sliding_window"): lambda i: t_sliding_window(**i),
    ("attention_variants", "softcap_gqa"): lambda i: t_softcap_gqa(**i),
    ("attention_variants", "alibi"): lambda i: t_alibi(**i),
    ("attention_variants", "packed_docs"): lambda i: t_packed_docs(**i),
    ("attention_variants", "decode_kv"): lambda i: t_decode_kv(**i),
    ("gla", "gla"): lambda i: t_gla(**i),
    ("mamba", "selective_scan"): lambda i: t_selective_scan(**i),
    ("retnet", "retention"): lambda i: t_retention(**i),
    ("gru", "gru"): lambda i: t_gru(**i),
}

# Awkward sizes per file (beyond the '# shapes:' line), with scalar overrides per set so that a
# dropped attribute cannot hide behind its default. Derived sizes stay whole: E even (x[..., :E/2])
# and D a multiple of E and of split_heads' heads in llama; K a multiple of 64 where a layout will later pack
# groups of 64 (int4), 2:4 or 32 x 32 blocks.
AWKWARD = {
    "llama": [
        ({"B": 1, "S": 7, "D": 18, "E": 6, "H": 3, "F": 17, "heads": 3}, {"eps": 0.25}),
        ({"B": 3, "S": 1, "D": 10, "E": 2, "H": 5, "F": 1, "heads": 5}, {}),
    ],
    "moe": [
        ({"T": 7, "D": 33, "F": 17, "E": 3}, {}),
        ({"T": 1, "D": 5, "F": 1, "E": 2}, {}),
    ],
    "lora": [
        ({"M": 1, "K": 7, "N": 33, "R": 1}, {"scale": 0.5}),
        ({"M": 7, "K": 33, "N": 1, "R": 3}, {}),
    ],
    "quant_linear": [
        ({"M": 1, "K": 128, "N": 7}, {}),
        ({"M": 7, "K": 192, "N": 1}, {}),
    ],
    "sparse_linear": [
        ({"M": 1, "K": 64, "N": 7}, {}),
        ({"M": 7, "K": 96, "N": 33}, {}),
    ],
    "attention_variants": [
        ({"B": 1, "H": 3, "G": 1, "R": 3, "S": 7, "T": 9, "E": 5}, {"window": 3, "cap": 0.5}),
        ({"B": 3, "H": 1, "G": 3, "R": 1, "S": 1, "T": 1, "E": 1}, {"window": 1}),
    ],
    **{stem: [
        ({"S": 37, "B": 3, "H": 2, "E": 5, "F": 7, "D": 3, "N": 5, "I": 9}, {}),
        ({"S": 1, "B": 1, "H": 1, "E": 1, "F": 1, "D": 1, "N": 1, "I": 1}, {}),
    ] for stem in ("gla", "mamba", "retnet", "gru")},
}


@functools.lru_cache(maxsize=None)
def program(stem: str):
    return load_program(EXAMPLES / f"{stem}.opf")


@functools.lru_cache(maxsize=None)
def graph(stem: str, op: str):
    return canonical_graph(program(stem), op)


def all_ops():
    """(file, graph) for every graph: each binding of a dtype-generic op is its own case."""
    return [(f.stem, op) for f in EXAMPLE_FILES for op in program(f.stem).graphs]


def cases():
    out = []
    for stem, op in all_ops():
        sets = [(file_shapes(EXAMPLES / f"{stem}.opf"), {}, "file")]
        sets += [(s, o, f"awkward{i}") for i, (s, o) in enumerate(AWKWARD.get(stem, []))]
        for k, (sizes, overrides, tag) in enumerate(sets):
            out.append(pytest.param(stem, op, sizes, overrides, 100 + k, id=f"{stem}-{op}-{tag}"))
    return out


def to_f64(values):
    return {k: v.to(torch.float64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in values.items()}


def test_every_example_op_has_a_torch_version():
    # each binding of a dtype-generic op (rms_norm__f16, ...) is checked against its op's version
    ops = {(stem, program(stem).op_of(op)) for stem, op in all_ops()}
    assert len(ops) == 29, sorted(ops)
    assert ops == set(IMPLS), f"missing: {ops - set(IMPLS)}, stale: {set(IMPLS) - ops}"
    assert {f.stem for f in EXAMPLE_FILES} == set(AWKWARD)


@pytest.mark.parametrize("stem", [f.stem for f in EXAMPLE_FILES])
def test_shapes_lines_bind_every_symbol(stem):
    shapes = file_shapes(EXAMPLES / f"{stem}.opf")
    for op in program(stem).graphs:
        g = graph(stem, op)
        assert set(g.symbols) <= set(shapes), (op, g.symbols, shapes)
        for sizes, _ in AWKWARD[stem]:
            assert set(g.symbols) <= set(sizes), (op, g.symbols, sizes)


@pytest.mark.parametrize("stem,op,sizes,overrides,seed", cases())
def test_example_op_matches_torch(stem, op, sizes, overrides, seed):
    g = graph(stem, op)
    bindings = size_bindings(g, sizes)
    inputs = random_inputs(g, bindings, seed=seed)
    inputs.update({k: v for k, v in overrides.items() if k in inputs})  # scalars of this op only
    for p in g.tensor_params:
        x = inputs[p.name]
        if x.is_floating_point():
            assert x.abs().max() > 0, f"{p.name} is all zeros"

    expected = IMPLS[(stem, program(stem).op_of(op))](to_f64(inputs))
    expected = list(expected) if isinstance(expected, tuple) else [expected]
    assert len(expected) == len(g.result_types)
    want_shapes = [tuple(evaluate(d, bindings) for d in t.shape) for t in g.result_types]

    # float64: the same mathematics, only the order of roundings may differ.
    got64 = run_graph(g, inputs, bindings, check=True)
    assert len(got64) == len(expected)
    for i, (o, r, t, shape) in enumerate(zip(got64, expected, g.result_types, want_shapes)):
        assert tuple(o.shape) == shape == tuple(r.shape), (i, o.shape, r.shape, shape)
        if t.dtype.is_float:
            assert o.dtype == torch.float64
            torch.testing.assert_close(o, r, **F64_TOL, msg=lambda m: f"{op} result {i} (float64): {m}")
        else:
            assert o.dtype == to_torch(t.dtype) == r.dtype
            assert torch.equal(o, r), f"{op} result {i}: {o} vs {r}"

    # the spec's dtypes, called like the op (binds sizes from the tensors' shapes)
    out = run_reference(g, **inputs)
    out = list(out) if isinstance(out, tuple) else [out]
    assert len(out) == len(expected)
    for i, (o, r, t, shape) in enumerate(zip(out, expected, g.result_types, want_shapes)):
        assert o.dtype == to_torch(t.dtype), (i, o.dtype, t)
        assert tuple(o.shape) == shape
        if o.is_floating_point():
            assert torch.isfinite(o).all(), f"{op} result {i} has non-finite values"
        assert_close(o, r, tolerance_for(g), what=f"{op} result {i} in {t.dtype}")


def test_router_experts_are_the_top_two_logits():
    """The router's expert choices are exactly torch.topk's on float64 logits, and each token's
    two gates sum to one, at a size where ties are impossible to miss (many tokens)."""
    g = graph("moe", "router")
    bindings = {"T": 257, "D": 64, "E": 8}
    inputs = random_inputs(g, bindings, seed=7)
    gates, experts = run_graph(g, inputs, bindings, check=True)
    logits = inputs["x"].double() @ inputs["w_router"].double().T
    top, idx = torch.topk(logits, 2, dim=-1)
    assert torch.equal(experts, idx.to(torch.int32))
    assert (experts[:, 0] != experts[:, 1]).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(257, dtype=torch.float64), **F64_TOL)
    assert (gates[:, 0] >= gates[:, 1]).all()
    torch.testing.assert_close(gates[:, 0], torch.sigmoid(top[:, 0] - top[:, 1]), **F64_TOL)


def test_rms_norm_eps_matters():
    """The eps scalar reaches the arithmetic (a dropped or mistyped attribute would not)."""
    g = graph("llama", "rms_norm")
    b = {"B": 1, "S": 3, "D": 8}
    inputs = random_inputs(g, b, seed=3)
    x, w = inputs["x"].double(), inputs["w"].double()
    ms = x.pow(2).mean(-1, keepdim=True)
    for eps in (1e-6, 0.5, 100.0):
        out = run_graph(g, {**inputs, "eps": eps}, b, check=True)[0]
        torch.testing.assert_close(out, x / torch.sqrt(ms + eps) * w, **F64_TOL)
    assert inputs["eps"] == 1e-5  # the spec's default is what random_inputs passes
