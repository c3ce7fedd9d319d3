"""float8 e4m3 in the kernels (ir/fp8.py): ``@quant(fp8)`` and ``@quant(fp8, act=fp8)``.

Both ways of generating e4m3 code are run here, through the interpreter: *native* (Triton's
tl.float8e4nv: hardware conversions and the fp8 tensor-core dot, for sm_89 and newer GPUs)
and *emulated* (integer bit arithmetic and an f16 dot, for older GPUs that reject the type).

- Encoding is exact: activations quantized by the act=fp8 kernel are torch's own e4m3 rounding
  (to nearest, ties to even), including the values whose rounding carries into the exponent
  (which Triton's interpreter gets wrong through a plain conversion), ties, subnormals, zeros
  and the largest value. Read through an identity weight, the layer's output is
  e4m3(x) * 448, exactly.
- The emulated kernels' text holds no e4m3 type; native and emulated results agree. The native
  fp8 dot adds each K block's products to the f32 accumulator in full precision
  (max_num_imprecise_acc=BLOCK_K; Hopper otherwise keeps ~14 bits of the running sum).
- act=fp8 against an emulation of its arithmetic (tight), and against the reference on the
  unpacked weight (within ACTIVATION_FP8), at awkward sizes; an all-zero row stays zero.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from opforge.ir import fp8
from opforge.ir.types import DType
from opforge.runtime.reference import run_graph
from opforge.runtime.tolerances import ACTIVATION_FP8, TOLERANCES, assert_close, tolerance_for

from .filecheck import filecheck
from .kernel_helpers import compile_spec

F16, F32 = torch.float16, torch.float32
MODES = ("native", "emulate")


@contextlib.contextmanager
def fp8_mode(monkeypatch, mode: str):
    monkeypatch.setenv("OPFORGE_FP8", mode)
    fp8.native.cache_clear()
    try:
        assert fp8.native() == (mode == "native")
        yield
    finally:
        monkeypatch.delenv("OPFORGE_FP8")
        fp8.native.cache_clear()


def linear(annotation: str, dtype: str = "f16", tag: str = "fp8"):
    src = (f"op f(x: {dtype}[M, K], w: {dtype}[N, K] {annotation}) -> {dtype}[M, N] {{\n"
           f"    return x @ w.T\n}}\n")
    return compile_spec(src, tag)


def encoding_cases() -> torch.Tensor:
    """Rows of K = 40 values, each row's largest magnitude 448 (so the activation scale is 1
    and the kernel quantizes the values themselves)."""
    special = [
        1.9385, -1.977, 0.4846, -0.4914, 0.4998, 3.99, 7.9, 15.5, 255.9, 447.9, -447.0,  # carries
        1.0625, 1.1875, -1.0625, 2.0 ** -10, 3 * 2.0 ** -10, -5 * 2.0 ** -10, 432.0, 208.0,  # ties
        2.0 ** -6, 2.0 ** -6 * (1 - 2 ** -5), -2.0 ** -7, 2.0 ** -9, 2.0 ** -11, 1e-30,       # small
        0.0, -0.0, 448.0, -448.0, 1.0, -3.0, 0.1, 1e-3, 17.3, 100.0, 300.0, 0.0037, -0.0036,
        240.0, 2.0 ** -8,
    ]
    g = torch.Generator().manual_seed(0)
    mag = torch.exp2(torch.empty(4, 40).uniform_(-12, 8.8, generator=g))
    sign = torch.where(torch.rand(4, 40, generator=g) < 0.5, -1.0, 1.0)
    rows = torch.cat([torch.tensor([special]), mag.clamp(max=448.0) * sign])
    rows[:, 1:].clamp_(-448.0, 448.0)
    rows[1:, 0] = 448.0
    return rows.to(F32)


@pytest.mark.parametrize("mode", MODES)
def test_activation_encoding_is_torchs_e4m3_rounding(monkeypatch, mode):
    with fp8_mode(monkeypatch, mode):
        mod = linear("@quant(fp8, act=fp8)", "f32", f"fp8_encode_{mode}")
        k = 40
        layer = mod.f.bind(w=torch.eye(k) * 448.0)     # bits 448, scale 1: y = e4m3(x) * 448
        assert torch.equal(layer.w_scale, torch.ones(k))
        x = encoding_cases()
        y = layer(x)
    want = x.to(torch.float8_e4m3fn).to(F32) * 448.0
    bad = (y != want).nonzero()
    assert not len(bad), [(float(x[i, j]), float(y[i, j]) / 448, float(want[i, j]) / 448) for i, j in bad[:8]]


@pytest.mark.parametrize("mode", MODES)
def test_weight_decoding_reads_every_e4m3_value(monkeypatch, mode):
    """All 254 finite e4m3 patterns (scale 1) through @quant(fp8): a weight row per pattern
    read against one-hot activations returns the pattern's value."""
    finite = torch.tensor([b for b in range(256) if b not in (0x7F, 0xFF)], dtype=torch.uint8)
    values = finite.view(torch.float8_e4m3fn).to(F32)             # [254]
    k = 23
    w = torch.zeros(254, k)
    w[:, 3] = values
    w[:, 0] = 448.0                                                # each row's scale is 1
    with fp8_mode(monkeypatch, mode):
        mod = linear("@quant(fp8)", "f32", f"fp8_decode_{mode}")
        layer = mod.f.bind(w=w)
        assert torch.equal(layer.w_scale, torch.ones(254))
        x = torch.zeros(2, k)
        x[0, 3] = 1.0
        x[1, 0] = 1.0
        y = layer(x)
    assert torch.equal(y[0], values)
    assert torch.equal(y[1], torch.full((254,), 448.0))


def kernels_text(layer) -> str:
    return layer._packed.stage_text("triton")


@pytest.mark.parametrize("annotation", ["@quant(fp8)", "@quant(fp8, act=fp8)"])
def test_native_and_emulated_kernels(monkeypatch, annotation):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(37, 45, generator=g).to(F16)
    x = torch.randn(33, 45, generator=g).to(F16)
    out = {}
    for mode in MODES:
        with fp8_mode(monkeypatch, mode):
            layer = linear(annotation, tag=f"fp8_{mode}").f.bind(w=w)
            out[mode] = layer(x)
            text = kernels_text(layer)
        if mode == "native":
            if "act" in annotation:   # both operands e4m3: the fp8 tensor-core dot
                filecheck(text, "CHECK: a = act_q_tile.to(tl.float8e4nv, bitcast=True)\n"
                                "CHECK: acc = tl.dot(a, w_bits_tile.to(tl.float8e4nv, bitcast=True), acc, "
                                "max_num_imprecise_acc=BLOCK_K)")
            else:
                filecheck(text, "CHECK: w_bits_tile.to(tl.float8e4nv, bitcast=True).to(tl.float32)\n"
                                "CHECK: tl.dot(")
        else:
            assert "float8" not in text, "emulated kernels never name the e4m3 type"
            assert "max_num_imprecise_acc" not in text, "f16 dots accumulate in f32 anyway"
            filecheck(text, "CHECK: e4m3_exp = \nCHECK: e4m3_abs = tl.where(e4m3_exp == 0\nCHECK: tl.dot(")
            if "act" in annotation:
                filecheck(text, "CHECK: f32_exp = \nCHECK: act_q = \nCHECK: .to(tl.float16)\nCHECK: tl.dot(a, ")
    assert_close(out["emulate"], out["native"].double(), TOLERANCES[DType.f16], f"{annotation}: emulated vs native")


def act_fp8_emulation(x: torch.Tensor, bits: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W8A8 in e4m3 as the layout describes it, in float64 after the quantization."""
    xf = x.float()
    sx = (xf.abs().amax(dim=-1, keepdim=True) / 448.0).clamp_min(1e-30)
    xq = (xf / sx).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).double()
    wq = bits.view(torch.float8_e4m3fn).double()
    return (xq @ wq.T) * sx.double() * scale.double()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", ["f16", "f32"])
def test_act_fp8_quantizes_activations_per_row(monkeypatch, mode, dtype):
    torch_dt = {"f16": F16, "f32": F32}[dtype]
    g = torch.Generator().manual_seed(2)
    n, k = 21, 70
    w = torch.randn(n, k, generator=g).to(torch_dt)
    with fp8_mode(monkeypatch, mode):
        mod = linear("@quant(fp8, act=fp8)", dtype, f"fp8_act_{mode}_{dtype}")
        layer = mod.f.bind(w=w)
        assert str(layer.layouts["w"]) == "@quant(fp8, act=fp8)"
        assert {name for name, _ in layer.named_buffers()} == {"w_bits", "w_scale"}
        for m in (1, 7, 33):
            x = torch.randn(m, k, generator=g).to(torch_dt)
            if m > 1:
                x[1] = 0                                  # an all-zero row quantizes to 0, not NaN
            y = layer(x)
            assert y.dtype == torch_dt and y.shape == (m, n)
            want = act_fp8_emulation(x, layer.w_bits, layer.w_scale)
            assert_close(y, want, TOLERANCES[DType.f16 if dtype == "f16" else DType.f32], f"act=fp8 M={m}")
            if m > 1:
                assert not y[1].any()
            ref = run_graph(mod.f.graph, {"x": x, **layer.unpacked()}, {"M": m, "K": k, "N": n}, check=True)[0]
            assert_close(y, ref, tolerance_for(mod.f.graph), f"act=fp8 M={m} against the reference")
    assert tolerance_for(mod.f.graph).norm >= ACTIVATION_FP8.norm


def test_act_fp8_is_two_kernels_and_reads_the_weight_as_bytes():
    mod = linear("@quant(fp8, act=fp8)", tag="fp8_plan")
    layer = mod.f.bind(w=torch.randn(37, 45).to(F16))
    plan = layer._packed.plan
    assert len(plan.steps) == 2
    assert [g.kind for g in layer._packed.fused.groups] == ["row", "matmul"]
    assert any(nd.op == "matmul_f8" for nd in layer._packed.fused.groups[1].nodes)
    for launch in plan.steps[-1]:
        assert {"w_bits", "w_scale", "act_q", "act_scale"} <= set(launch.reads)
    assert plan.buffers["act_q"].dtype == DType.u8
