"""Recurrences against flash-linear-attention's naive references (the ``fla-core`` package, a
test dependency: its naive functions are plain torch loops and run on the CPU). The compiled
ops run their scans as one kernel (passes/lower_recurrence.py) through the interpreter: GLA
with an initial and a final state, in fla's [B, T, H, K] layout and at log-gates down to -20 per
step; HGRN; retention against fla's quadratic form. Lengths 1, 37 and 200 (not multiples of any
block), f32 and f16.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from opforge.runtime.scan import ScanPiece

from .kernel_helpers import compiled


def fla_naive(family: str):
    """fla's ``ops/<family>/naive.py``, loaded as a file of its own: importing the ``fla``
    package itself changes Triton's state (it probes the platform, imports its kernels) in a
    way that breaks the interpreter's later kernels; the naive files import only torch."""
    spec = importlib.util.find_spec("fla")          # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("flash-linear-attention's fla-core is a test dependency: pip install -e '.[dev]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "ops" / family / "naive.py"
    mod_spec = importlib.util.spec_from_file_location(f"fla_naive_{family}", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


naive_recurrent_gla = fla_naive("gla").naive_recurrent_gla
naive_recurrent_hgrn = fla_naive("hgrn").naive_recurrent_hgrn
naive_retention = fla_naive("retention").naive_retention

GLA = """
op gla(q: {T}[B, S, H, E], k: {T}[B, S, H, E], v: {T}[B, S, H, F], g: {T}[B, S, H, E], h0: f32[B, H, E, F], scale: f32) -> ({T}[S, B, H, F], f32[B, H, E, F]) {{
    o, h_last = scan t in S with h = h0 {{
        h_next = exp(cast(g[:, t], f32))[:, :, :, None] * h + cast(k[:, t][:, :, :, None] * v[:, t][:, :, None, :], f32)
        return h_next, cast(sum(cast(q[:, t], f32)[:, :, :, None] * h_next, axis=2) * scale, {T})
    }}
    return o, h_last
}}"""

HGRN = """
op hgrn(x: f32[B, S, D], g: f32[B, S, D], h0: f32[B, D]) -> (f32[S, B, D], f32[B, D]) {
    o, h_last = scan t in S with h = h0 {
        h_next = exp(g[:, t]) * h + x[:, t]
        return h_next, h_next
    }
    return o, h_last
}"""

RETENTION = """
op retention(q: f32[S, H, E], k: f32[S, H, E], v: f32[S, H, F], gamma: f32[H]) -> f32[S, H, F] {
    o = scan t in S with s: f32[H, E, F] = 0.0 {
        s_next = gamma[:, None, None] * s + k[t][:, :, None] * v[t][:, None, :]
        return s_next, sum(q[t][:, :, None] * s_next, axis=1)
    }
    return o
}"""


def one_kernel(op) -> bool:
    return all(p.fused is not None for p in op.pieces if isinstance(p, ScanPiece))


@pytest.mark.parametrize("S", [1, 37, 200])
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_gla_matches_fla_naive_recurrent_gla(S, dtype):
    torch_dt = torch.float32 if dtype == "f32" else torch.float16
    op = compiled(GLA.format(T=dtype), f"fla_gla_{dtype}").gla
    assert one_kernel(op)
    gen = torch.Generator().manual_seed(S)
    B, H, E, F = 2, 2, 5, 3
    q, k = (torch.randn(B, S, H, E, generator=gen).to(torch_dt) for _ in range(2))
    v = torch.randn(B, S, H, F, generator=gen).to(torch_dt)
    g = (-20.0 * torch.rand(B, S, H, E, generator=gen)).to(torch_dt)      # log-gates in [-20, 0]
    h0 = torch.randn(B, H, E, F, generator=gen)
    o, h_last = op(q, k, v, g, h0, E ** -0.5)
    want_o, want_h = naive_recurrent_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(h_last).all()
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == "f32" else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(o.transpose(0, 1).float(), want_o.float(), **tol)
    torch.testing.assert_close(h_last, want_h, **tol)


@pytest.mark.parametrize("S", [1, 37, 200])
def test_hgrn_matches_fla_naive_recurrent_hgrn(S):
    op = compiled(HGRN, "fla_hgrn").hgrn
    assert one_kernel(op)
    gen = torch.Generator().manual_seed(S)
    B, D = 3, 37
    x = torch.randn(B, S, D, generator=gen)
    g = torch.nn.functional.logsigmoid(torch.randn(B, S, D, generator=gen))
    h0 = torch.randn(B, D, generator=gen)
    o, h_last = op(x, g, h0)
    want_o, want_h = naive_recurrent_hgrn(x, g, initial_state=h0, output_final_state=True)
    torch.testing.assert_close(o.transpose(0, 1), want_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_last, want_h, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("S", [1, 37])
def test_retention_matches_fla_naive_retention(S):
    """fla's quadratic form with its fixed decays gamma_h = 1 - 2^(-5 - h) and q scaled by
    E^-0.5, against the recurrent form run as one kernel."""
    op = compiled(RETENTION, "fla_retention").retention
    assert one_kernel(op)
    gen = torch.Generator().manual_seed(S)
    H, E, F = 3, 4, 5
    q, k = (torch.randn(1, H, S, E, generator=gen) for _ in range(2))
    v = torch.randn(1, H, S, F, generator=gen)
    gamma = 1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float32))
    want = naive_retention(q, k, v)[0].permute(1, 0, 2)
    mine = op(*(x[0].permute(1, 0, 2).contiguous() for x in (q * E ** -0.5, k, v)), gamma)
    torch.testing.assert_close(mine, want, rtol=1e-4, atol=1e-4)
