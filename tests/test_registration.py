"""The torch.library paths: library (the default: Library define + impl), custom_op, and
triton_op (OPFORGE_REGISTRATION or registration="triton_op"), which torch.compile can see into
on a GPU. On the CPU the triton_op path runs eagerly (Triton's interpreter) and passes
opcheck's schema and fake-tensor checks; torch.compile of a triton_op reads data pointers of
fake tensors there, so it is a GPU test."""
from __future__ import annotations

import pytest
import torch

import opforge
from opforge.runtime.library import registration_mode, schema_of

SPEC = """
op f(x: f32[M, N], s: f32 = 2.0) -> f32[M, N] { return exp(x) * s }
op g(x: f32[M, N]) -> (f32[M, N], f32[M, 1]) { return x * 2.0, sum(x, axis=1, keepdim=true) }
"""


@pytest.mark.parametrize("mode", ["library", "custom_op", "triton_op"])
def test_both_registrations_run_and_pass_opcheck(mode):
    m = opforge.compile(SPEC, namespace=f"reg_{mode}", registration=mode)
    x = torch.randn(5, 7)
    torch.testing.assert_close(m.f(x), torch.exp(x) * 2)
    torch.testing.assert_close(m.f(x, s=3.0), torch.exp(x) * 3)
    torch.testing.assert_close(getattr(torch.ops, f"reg_{mode}").f(x, 0.5), torch.exp(x) * 0.5)
    a, b = m.g(x)
    torch.testing.assert_close(a, 2 * x)
    torch.testing.assert_close(b, x.sum(1, keepdim=True), rtol=1e-5, atol=1e-5)
    res = torch.library.opcheck(m.f.torch_op, (x,), test_utils=("test_schema", "test_faketensor"))
    assert set(res.values()) == {"SUCCESS"}, res


def test_schema_text():
    g = opforge.load(SPEC).graphs
    assert schema_of(g["f"]) == "(Tensor x, float s=2.0) -> Tensor"
    assert schema_of(g["g"]) == "(Tensor x) -> (Tensor, Tensor)"


def test_registration_mode_is_checked(monkeypatch):
    monkeypatch.setenv("OPFORGE_REGISTRATION", "triton_op")
    assert registration_mode() == "triton_op"
    assert registration_mode("custom_op") == "custom_op"
    with pytest.raises(ValueError, match="library, custom_op or triton_op"):
        registration_mode("eager")
