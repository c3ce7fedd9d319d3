"""docs/cookbook.md: every ```opf block compiles, and each op matches the same math in torch
(or torch's own module) at sizes that are not multiples of any tile."""
from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import opforge

from .kernel_helpers import unique_namespace

PAGE = Path(__file__).resolve().parent.parent / "docs" / "cookbook.md"
BLOCKS = re.findall(r"```opf\n(.*?)```", PAGE.read_text(), re.S)


@functools.lru_cache(maxsize=None)
def mod():
    return opforge.compile("\n".join(BLOCKS), namespace=unique_namespace("cookbook"))


def r(*shape, scale=1.0, seed=[0]):
    seed[0] += 1
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed[0])) * scale


def close(a, b, tol=2e-4):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_the_page_has_its_blocks():
    names = set(re.findall(r"^op (\w+)", "\n".join(BLOCKS), re.M))
    assert names == set(CHECKS), names ^ set(CHECKS)


def check_layer_norm(m):
    x, w, b = r(2, 5, 37), r(37), r(37)
    close(m.layer_norm(x, w, b), F.layer_norm(x, (37,), w, b, eps=1e-5))


def check_gpt2_attention(m):
    B, S, D, H = 2, 7, 24, 4
    x, wqkv, bqkv, wo, bo = r(B, S, D), r(3 * D, D, scale=0.2), r(3 * D), r(D, D, scale=0.2), r(D)
    qkv = F.linear(x, wqkv, bqkv)
    q, k, v = (t.reshape(B, S, H, D // H).transpose(1, 2) for t in qkv.split(D, dim=-1))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, S, D)
    close(m.gpt2_attention(x, wqkv, bqkv, wo, bo, H), F.linear(o, wo, bo))
    # another head count, same weights
    q, k, v = (t.reshape(B, S, 3, D // 3).transpose(1, 2) for t in qkv.split(D, dim=-1))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, S, D)
    close(m.gpt2_attention(x, wqkv, bqkv, wo, bo, 3), F.linear(o, wo, bo))


def check_gpt2_mlp(m):
    x, w1, b1, w2, b2 = r(2, 5, 24), r(33, 24, scale=0.2), r(33), r(24, 33, scale=0.2), r(24)
    close(m.gpt2_mlp(x, w1, b1, w2, b2), F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2))


def check_rms_norm(m):
    x, w = r(2, 5, 37), r(37)
    for dtype, tol in ((torch.float32, 2e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)):
        xd, wd = x.to(dtype), w.to(dtype)
        want = (x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5)).to(dtype) * wd
        got = m.rms_norm(xd, wd)
        assert got.dtype == dtype
        close(got.float(), want.float(), tol)


def check_swiglu(m):
    x, wg, wu, wd = r(2, 3, 24), r(33, 24, scale=0.2), r(33, 24, scale=0.2), r(24, 33, scale=0.2)
    want = F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)
    close(m.swiglu(x, wg, wu, wd), want)
    got = m.swiglu(*(t.half() for t in (x, wg, wu, wd)))
    assert got.dtype == torch.float16
    close(got.float(), want, 2e-2)


def check_gemma_norm(m):
    x, w = r(2, 5, 37), r(37)
    close(m.gemma_norm(x, w), x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6) * (1 + w))


def check_geglu(m):
    x, wg, wu, wd = r(2, 3, 24), r(33, 24, scale=0.2), r(33, 24, scale=0.2), r(24, 33, scale=0.2)
    close(m.geglu(x, wg, wu, wd), F.linear(F.gelu(F.linear(x, wg), approximate="tanh") * F.linear(x, wu), wd))


def check_softcap_logits(m):
    h, e = r(2, 3, 24), r(41, 24)
    close(m.softcap_logits(h, e, 5.0), torch.tanh(F.linear(h, e) / 5.0) * 5.0)


def check_gqa(m):
    B, G, R, S, E = 2, 2, 3, 9, 8
    q, k, v = r(B, G, R, S, E), r(B, G, 1, S, E), r(B, G, 1, S, E)
    want = F.scaled_dot_product_attention(q.reshape(B, G * R, S, E), k.expand(B, G, R, S, E).reshape(B, G * R, S, E),
                                          v.expand(B, G, R, S, E).reshape(B, G * R, S, E), is_causal=True)
    close(m.gqa(q, k, v), want.reshape(B, G, R, S, E))


def check_t5_attention(m):
    q, k, v, bias = r(2, 3, 9, 8), r(2, 3, 9, 8), r(2, 3, 9, 8), r(3, 9, 9)
    close(m.t5_attention(q, k, v, bias), torch.softmax(q @ k.transpose(-1, -2) + bias, -1) @ v)


def check_cross_entropy(m):
    z, t = r(7, 37), torch.randint(0, 37, (7,))
    close(m.cross_entropy(z, t), F.cross_entropy(z, t))


def check_int4_linear(m):
    w, b, x = r(19, 64, scale=0.2), r(19), r(5, 64)
    layer = m.int4_linear.bind(w=w)
    dense = layer.unpacked()["w"]                 # the int4 weight the kernels compute with
    close(layer(x, b), F.linear(x, dense, b))
    assert (dense - w).abs().max() < 0.1          # and it is w, quantized in groups of 32


def check_gla_layer(m):
    S, B, H, E, F_ = 7, 2, 3, 5, 4
    q, k, v = r(S, B, H, E), r(S, B, H, E), r(S, B, H, F_)
    g = F.logsigmoid(r(S, B, H, E))                   # log-space gates, as fla's chunk_gla takes them
    h = torch.zeros(B, H, E, F_)
    outs = []
    for t in range(S):                                # the recurrence, one step at a time
        h = g[t].exp()[..., None] * h + k[t][..., None] * v[t][..., None, :]
        outs.append(torch.einsum("bhe,bhef->bhf", q[t], h) * 0.5)
    o, h_last = m.gla_layer(q, k, v, g, 0.5)
    close(o, torch.stack(outs))
    close(h_last, h)


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_cookbook_op_matches_torch(name):
    CHECKS[name](mod())
