"""Exported programs load in a new process (opforge.save_exported / load_exported)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import opforge

from .kernel_helpers import unique_namespace

SPEC = """
op norm(x: f32[M, D], w: f32[D], eps: f32 = 1e-5) -> f32[M, D] {
    return x * rsqrt(mean(x * x, axis=-1, keepdim=true) + eps) * w
}
op lin(x: f32[M, K], w: f32[N, K] @quant(int8)) -> f32[M, N] { return x @ w.T }
"""


class Net(torch.nn.Module):
    def __init__(self, mod):
        super().__init__()
        self.mod = mod
        self.w = torch.nn.Parameter(torch.randn(33))

    def forward(self, x):
        return self.mod.norm(torch.relu(x), self.w) * 2


def _run(code: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_saved_program_loads_and_runs_in_a_new_process(tmp_path):
    ns = unique_namespace("export")
    net = Net(opforge.compile(SPEC, namespace=ns, ops=["norm"]))
    x = torch.randn(5, 33)
    ep = torch.export.export(net, (x,))
    path = tmp_path / "net.pt2"
    opforge.save_exported(ep, path)
    torch.save({"x": x, "want": net(x).detach()}, tmp_path / "io.pt")
    out = _run(f"""
        import torch, opforge
        io = torch.load({str(tmp_path / 'io.pt')!r})
        try:
            torch.export.load({str(path)!r})
            print("plain load worked")
        except Exception as e:
            print("plain load failed")
        ep = opforge.load_exported({str(path)!r})
        got = ep.module()(io["x"])
        torch.testing.assert_close(got, io["want"], rtol=1e-5, atol=1e-5)
        print("ok", tuple(got.shape))
    """, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    # a plain torch.export.load cannot know the op; load_exported compiles its spec first
    assert "plain load failed" in out.stdout and "ok (5, 33)" in out.stdout


def test_a_program_saved_without_the_specs_is_a_clear_error(tmp_path):
    net = Net(opforge.compile(SPEC, namespace=unique_namespace("export_plain"), ops=["norm"]))
    ep = torch.export.export(net, (torch.randn(5, 33),))
    torch.export.save(ep, tmp_path / "plain.pt2")
    with pytest.raises(opforge.CallError, match="holds no opforge specs; save it with opforge.save_exported"):
        opforge.load_exported(tmp_path / "plain.pt2")


def test_a_bound_layer_is_refused_by_name(tmp_path):
    mod = opforge.compile(SPEC, namespace=unique_namespace("export_bound"))
    layer = mod.lin.bind(w=torch.randn(8, 16))

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x)
    ep = torch.export.export(Wrap(), (torch.randn(3, 16),))
    with pytest.raises(opforge.CallError, match="packed variant"):
        opforge.save_exported(ep, tmp_path / "bound.pt2")
