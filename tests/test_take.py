"""take(x, idx, axis): per-row gathers (torch.take_along_dim), fused as index arithmetic."""
from __future__ import annotations

import pytest
import torch

import opforge
from opforge.runtime.tolerances import assert_close, tolerance_for

from .kernel_helpers import unique_namespace

SPEC = """
op ce(logits: f32[N, V], target: i64[N]) -> f32[N] {
    lse = log_softmax(logits, axis=-1)
    return -take(lse, target[:, None], axis=1)[:, 0]
}
op pick(x: f16[B, S, D], idx: i32[B, K, D]) -> f16[B, K, D] { return take(x, idx, axis=-2) * 2.0 }
op top(x: f32[N, V]) -> f32[N, 3] {
    v, i = topk(x, 3, axis=-1)
    return take(exp(x), i, axis=1) - exp(v)
}
"""


@pytest.fixture(scope="module")
def mod():
    return opforge.compile(SPEC, namespace=unique_namespace("take"))


def test_cross_entropy_matches_torch(mod):
    x, t = torch.randn(7, 37), torch.randint(0, 37, (7,))
    assert_close(mod.ce(x, t), torch.nn.functional.cross_entropy(x, t, reduction="none"),
                 tolerance_for(mod.ce.graph))


def test_gather_along_a_middle_axis_in_f16(mod):
    x = torch.randn(3, 9, 5, dtype=torch.float16)
    idx = torch.randint(0, 9, (3, 4, 5), dtype=torch.int32)
    # a gather and a doubling: exact in f16
    torch.testing.assert_close(mod.pick(x, idx), torch.take_along_dim(x, idx.long(), 1) * 2, atol=0, rtol=0)


def test_computed_indices_regather_topk(mod):
    """Re-gathering with topk's indices gives back the values topk chose."""
    x = torch.randn(6, 33)
    torch.testing.assert_close(mod.top(x), torch.zeros(6, 3), atol=1e-5, rtol=0)


def test_gradient_scatters_back_float64():
    from opforge.ir.types import DType
    m = opforge.compile(SPEC.replace("f16", "f32"), namespace=unique_namespace("take64"), dtype=DType.f64)
    x, t = torch.randn(5, 11, dtype=torch.float64, requires_grad=True), torch.randint(0, 11, (5,))
    assert torch.autograd.gradcheck(lambda a: m.ce(a, t), (x,))
    m2 = opforge.compile("op pick(x: f32[B, S, D], idx: i32[B, 4, D]) -> f32[B, 4, D] { return take(x, idx, axis=1) }",
                         namespace=unique_namespace("take64b"), dtype=DType.f64)
    x3 = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 7, (2, 4, 3), dtype=torch.int32)   # repeated indices: the gradient adds up
    assert torch.autograd.gradcheck(lambda a: m2.pick(a, idx), (x3,))
    # a symbolic count along the axis: no gradient, said plainly
    with pytest.raises(opforge.CallError, match=r"take\(..., axis=1\) takes K entries per position"):
        m.pick(x3, torch.randint(0, 7, (2, 5, 3), dtype=torch.int32)).sum().backward()


def test_indices_out_of_range_are_a_call_error(mod):
    with pytest.raises(opforge.CallError, match=r"ce\(\): 'target' holds indices in \[0, 37\); found 37"):
        mod.ce(torch.randn(7, 37), torch.full((7,), 37))
    with pytest.raises(opforge.CallError, match="found -1"):
        mod.pick(torch.randn(3, 9, 5, dtype=torch.float16), torch.full((3, 4, 5), -1, dtype=torch.int32))


@pytest.mark.parametrize("body, message", [
    ("take(x, f, axis=1)", "'take' needs integer indices"),
    ("take(x, i1, axis=1)", "'take' needs indices of the same rank as the tensor"),
    ("take(x, i3, axis=1)", "must match f32[N, V] on every axis but axis 1; axis 0 is M, not N"),
    ("take(x, i2, axis=2)", "axis 2 is out of range for a tensor of rank 2 in 'take'"),
])
def test_bad_uses_are_spec_errors(body, message):
    spec = (f"op f(x: f32[N, V], f: f32[N, 2], i1: i32[N], i2: i32[N, 2], i3: i32[M, 2]) -> f32[N, 2] "
            f"{{ return {body} }}")
    with pytest.raises(opforge.SpecError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        opforge.compile(spec, namespace=unique_namespace("takebad"))
