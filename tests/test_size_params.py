"""Sizes as parameters (issue 13, item 3): size arithmetic in a parameter's shape
(``w: f32[3 * D, D]``) when every symbol in it is bound by a plain axis, and integer scalar
parameters used as sizes (``reshape(x, [B, S, heads, -1])``), bound at the call from their
value; calls between ops pass them as integers or sizes."""
from __future__ import annotations

import pytest
import torch

import opforge
from opforge.frontend import load_program
from opforge.frontend.diagnostics import SpecError
from opforge.runtime.binding import CallError

from .kernel_helpers import run_case, unique_namespace

SPEC = """
op qkv(x: f32[M, D], w: f32[3 * D, D], b: f32[3 * D]) -> f32[M, 3 * D] { return x @ w.T + b }
op glu(x: f32[M, D], w: f32[2 * F, D], b: f32[F]) -> f32[M, F] { h = x @ w.T; return h[:, :F] * sigmoid(h[:, F:]) + b }
op split_heads(x: f32[B, S, D], heads: i64 = 4) -> f32[B, heads, S, D / heads] {
    return permute(reshape(x, [B, S, heads, -1]), [0, 2, 1, 3])
}
op window(x: f32[S, S], w: i64) -> f32[S, S] {
    i = arange(S)[:, None]
    j = arange(S)[None, :]
    return where(j <= i & j > i - w, x, 0.0) + cast(w, f32)
}
op two_heads(x: f32[B, S, D]) -> f32[B, 2, S, D / 2] { return split_heads(x, 2) }
op by_size(x: f32[B, S, D], e: f32[E]) -> f32[B, D / E, S, E] { return split_heads(x, D / E) }
op passed(x: f32[B, S, D], n: i64) -> f32[B, n, S, D / n] { return split_heads(x, n) }
"""


@pytest.fixture(scope="module")
def mod():
    return opforge.compile(SPEC, namespace=unique_namespace("sizes"))


def test_size_arithmetic_in_parameter_shapes(mod):
    assert str(mod.qkv.graph.params[1].value.type) == "f32[3*D, D]"
    run_case(mod.qkv, {"M": 5, "D": 7}, seed=1)
    run_case(mod.glu, {"M": 3, "D": 9, "F": 5}, seed=2)
    with pytest.raises(CallError, match=r"'w' expects f32\[3\*D, D\], got shape \[20, 7\]: axis 0 must be 3\*D = 21"):
        mod.qkv(torch.randn(5, 7), torch.randn(20, 7), torch.randn(21))


def test_an_integer_scalar_as_a_size(mod):
    x = torch.randn(2, 3, 12)
    for h in (1, 3, 4, 12):
        y = mod.split_heads(x, h)
        torch.testing.assert_close(y, x.reshape(2, 3, h, 12 // h).permute(0, 2, 1, 3), rtol=0, atol=0)
    torch.testing.assert_close(mod.split_heads(x), x.reshape(2, 3, 4, 3).permute(0, 2, 1, 3), rtol=0, atol=0)
    with pytest.raises(CallError, match="D/heads = 12/5 is not a whole number"):
        mod.split_heads(x, 5)
    with pytest.raises(CallError, match="'heads' is used as a size, so it must be a whole number >= 0"):
        mod.split_heads(x, -2)
    s = torch.randn(6, 6)
    i, j = torch.arange(6)[:, None], torch.arange(6)[None, :]
    for w in (1, 2, 6):
        want = torch.where((j <= i) & (j > i - w), s, torch.zeros(())) + w
        torch.testing.assert_close(mod.window(s, w), want)


def test_calls_pass_sizes(mod):
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(mod.two_heads(x), x.reshape(2, 3, 2, 4).permute(0, 2, 1, 3), rtol=0, atol=0)
    torch.testing.assert_close(mod.by_size(x, torch.randn(2)), x.reshape(2, 3, 4, 2).permute(0, 2, 1, 3),
                               rtol=0, atol=0)
    torch.testing.assert_close(mod.passed(x, 8), x.reshape(2, 3, 8, 1).permute(0, 2, 1, 3), rtol=0, atol=0)


@pytest.mark.parametrize("src,message", [
    ("op f(x: f32[M, 3 * Q]) -> f32[M, 3 * Q] { return x }", "the size 'Q' in 3 \\* Q is not bound by any parameter"),
    ("op f(x: f32[M, K], h: f32 = 1.0) -> f32[M, K] { return reshape(x, [M, h, -1]) }", "'h' is a value, not a size"),
    # a symbol only inside arithmetic is not solved for (2 * K = 18 does not bind K)
    ("op f(x: f32[M, 2 * K]) -> f32[M, K] { return x[:, :K] }", "the size 'K' in 2 \\* K is not bound"),
    ("op f(x: f32[M, 2 * K - 3 * K]) -> f32[M] { return x[:, 0] }", "negative|not bound"),
])
def test_spec_errors(src, message):
    with pytest.raises(SpecError, match=message):
        load_program(src)
