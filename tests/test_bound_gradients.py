"""Bound modules and gradients (issue 12): ``mod.op.bind(...)`` holds its dense weights (no
layout, or ``@auto`` chose dense) as trainable ``torch.nn.Parameter``s, and its packed weights
(int8, int4, fp8, 2:4, block-sparse, low-rank) as frozen buffers.

Gradients of the Parameters (and of the inputs) after ``loss.backward()`` are compared with
PyTorch's autograd of the same formula written in plain PyTorch, in f32 at sizes that are not
multiples of the kernels' blocks, within ``gradient_tolerance_for`` of the op
(runtime/tolerances.py); for packed layers the plain formula uses the dense weight the kernels
compute with (``layer.unpacked()``).
"""
from __future__ import annotations

import io
import re

import pytest
import torch

from opforge import CallError
from opforge.runtime.tolerances import assert_close, gradient_tolerance_for

from .conftest import EXAMPLES
from .kernel_helpers import compiled

F32 = torch.float32
LLAMA = (EXAMPLES / "llama.opf").read_text()


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F32)


def llama():
    return compiled(LLAMA, "bound_grad_llama", dtype="f32")


def swiglu(x, wg, wu, wd):
    return (torch.nn.functional.silu(x @ wg.T) * (x @ wu.T)) @ wd.T


def rms_norm(x, w, eps=1e-5):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w


def plain_grads(fn, inputs: dict, cotangent):
    """Plain PyTorch's gradients of ``(fn(**inputs) * cotangent).sum()`` for every input."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    (fn(**leaves) * cotangent).sum().backward()
    return {k: v.grad for k, v in leaves.items()}


# -- dense weights: Parameters with gradients -------------------------------------------------
def test_dense_weights_are_parameters_and_their_gradients_match_plain_pytorch():
    op = llama().swiglu_mlp
    B, S, D, F = 2, 5, 37, 53
    weights = {"wg": randn(F, D, seed=1) / D ** 0.5, "wu": randn(F, D, seed=2) / D ** 0.5,
               "wd": randn(D, F, seed=3) / F ** 0.5}
    layer = op.bind(**weights)
    params = dict(layer.named_parameters())
    assert set(params) == {"wg", "wu", "wd"}
    assert not dict(layer.named_buffers())
    for name, p in params.items():
        assert isinstance(p, torch.nn.Parameter) and p.requires_grad and p.dtype == F32, name
        assert p.grad is None
    x = randn(B, S, D, seed=4).requires_grad_()
    gy = randn(B, S, D, seed=5)
    y = layer(x)
    assert y.requires_grad
    (y * gy).sum().backward()
    want = plain_grads(swiglu, {"x": x, **weights}, gy)
    tol = gradient_tolerance_for(op.graph)
    assert_close(x.grad, want["x"], tol, "d/dx")
    for name in weights:
        assert params[name].grad is not None, name
        assert_close(params[name].grad, want[name], tol, f"d/d{name}")
    # the forward matches too
    assert_close(y.detach(), swiglu(x.detach(), **weights), gradient_tolerance_for(op.graph), "forward")


def test_a_bound_norm_weight_trains_with_only_its_parameter_requiring_grad():
    """Only the Parameter needs a gradient (the input does not): the backward for just it."""
    op = llama().rms_norm
    w = 1.0 + 0.1 * randn(45, seed=6)
    layer = op.bind(w=w)
    x = randn(3, 7, 45, seed=7)
    gy = randn(3, 7, 45, seed=8)
    (layer(x) * gy).sum().backward()
    want = plain_grads(lambda x, w: rms_norm(x, w), {"x": x, "w": w}, gy)
    assert x.grad is None
    assert_close(layer.w.grad, want["w"], gradient_tolerance_for(op.graph), "d/dw")


def test_an_optimizer_step_changes_the_bound_module_and_not_the_callers_tensor():
    op = llama().rms_norm
    w = 1.0 + 0.1 * randn(33, seed=9)
    w_before = w.clone()
    layer = op.bind(w=w)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = randn(2, 4, 33, seed=10)
    y0 = layer(x).detach()
    layer(x).square().mean().backward()
    opt.step()
    assert torch.equal(w, w_before), "bind copies the dense weight: training leaves the caller's alone"
    assert not torch.equal(layer.w.detach(), w_before)
    y1 = layer(x).detach()
    assert not torch.equal(y1, y0)
    assert_close(y1, rms_norm(x, layer.w.detach()), gradient_tolerance_for(op.graph), "after the step")


def test_no_grad_calls_need_no_gradient_and_to_keeps_the_parameter():
    op = llama().rms_norm
    layer = op.bind(w=randn(20, seed=11))
    p = layer.w
    x = randn(2, 3, 20, seed=12)
    with torch.no_grad():
        y = layer(x)
    assert not y.requires_grad
    assert layer.to("cpu") is layer and layer.w is p
    assert torch.equal(layer(x).detach(), y)
    # llama.opf's rms_norm is dtype-generic: .half() rebinds it (T = f16), the same Parameter converted
    assert layer.half().w is p and p.dtype == torch.float16
    assert layer(x.half()).dtype == torch.float16
    fixed = compiled("op n(x: f32[M, D], w: f32[D]) -> f32[M, D] { return x * w }", "bound_grad_fixed").n
    layer = fixed.bind(w=randn(20, seed=13))
    p = layer.w
    assert layer.half().w is p and p.dtype == F32, "the spec fixes the dtype: .half() keeps f32"


def test_auto_choosing_dense_gives_a_parameter():
    src = ("op f(x: f32[M, K], w: f32[N, K] @auto(tol=1e-9), b: f32[N]) -> f32[M, N] {\n"
           "    return x @ w.T + b\n}\n")
    mod = compiled(src, "bound_grad_auto")
    w, b = randn(19, 40, seed=13), randn(19, seed=14)
    layer = mod.f.bind(w=w, b=b)
    assert layer.layouts["w"] is None
    assert set(dict(layer.named_parameters())) == {"w", "b"}
    x, gy = randn(7, 40, seed=15), randn(7, 19, seed=16)
    (layer(x) * gy).sum().backward()
    want = plain_grads(lambda x, w, b: x @ w.T + b, {"x": x, "w": w, "b": b}, gy)
    tol = gradient_tolerance_for(mod.f.graph)
    assert_close(layer.w.grad, want["w"], tol, "d/dw")
    assert_close(layer.b.grad, want["b"], tol, "d/db")


def test_a_dense_weight_without_a_gradient_is_a_parameter_that_does_not_require_grad():
    src = "op f(x: f32[M], w: f32[M]) -> bool[M] {\n    return x > w\n}\n"
    mod = compiled(src, "bound_grad_bool")
    layer = mod.f.bind(w=randn(9, seed=17))
    assert isinstance(layer.w, torch.nn.Parameter) and not layer.w.requires_grad
    assert "w" in layer.no_gradient
    assert layer(randn(9, seed=18)).dtype == torch.bool      # runs in grad mode


# -- packed weights: frozen buffers --------------------------------------------------------------
# W8A8 (act=) is differentiated straight through its activation quantization: d/dx is that of
# x @ w'.T with w' the dequantised weight, as the plain formula below computes it
PACKED = [("int8", "@quant(int8)", 45), ("int4", "@quant(int4, group=32)", 96), ("fp8", "@quant(fp8)", 45),
          ("s24", "@sparse(2:4)", 52), ("lowrank", "@lowrank(rank=6)", 45),
          ("w8a8", "@quant(int8, act=int8)", 45), ("w8a8fp8", "@quant(fp8, act=fp8)", 45)]


def packed_module(annotation: str):
    src = (f"op f(x: f32[M, K], w: f32[N, K] {annotation}, b: f32[N]) -> f32[M, N] {{\n"
           f"    return x @ w.T + b\n}}\n")
    return compiled(src, "bound_grad_packed")


@pytest.mark.parametrize("annotation,k", [(a, k) for _, a, k in PACKED], ids=[i for i, _, _ in PACKED])
def test_packed_weights_are_frozen_buffers_and_gradients_flow_to_the_rest(annotation, k):
    mod = packed_module(annotation)
    n = 37
    w, b = randn(n, k, seed=20), randn(n, seed=21)
    layer = mod.f.bind(w=w, b=b)
    params, buffers = dict(layer.named_parameters()), dict(layer.named_buffers())
    assert set(params) == {"b"}
    assert buffers and all(name.startswith("w_") for name in buffers), buffers
    assert not any(t.requires_grad for t in buffers.values())
    x, gy = randn(7, k, seed=22).requires_grad_(), randn(7, n, seed=23)
    (layer(x) * gy).sum().backward()
    want = plain_grads(lambda x, w, b: x @ w.T + b, {"x": x, "w": layer.unpacked()["w"], "b": b}, gy)
    tol = gradient_tolerance_for(mod.f.graph, layouts=layer.layouts)
    assert_close(x.grad, want["x"], tol, "d/dx")
    assert_close(layer.b.grad, want["b"], tol, "d/db")
    # a gradient asked of a packed tensor is a CallError naming the user's op
    name = next(n for n, t in buffers.items() if t.dtype.is_floating_point) if \
        any(t.dtype.is_floating_point for t in buffers.values()) else None
    if name is not None:
        buffers[name].requires_grad_()
        with pytest.raises(CallError, match=rf"f\(\): '{name}' is a packed weight, frozen once bound"):
            layer(x)
        buffers[name].requires_grad_(False)


@pytest.mark.parametrize("act", ["int8", "fp8"])
def test_w8a8_forward_never_computes_the_straight_through_shadow(act):
    """The shadow GEMM a straight-through estimate differentiates (x @ w'.T) is dropped before
    fusion (passes/straight_through.py): the forward is the quantize kernel and the quantized
    GEMM, as without gradients; the backward is one GEMM dequantising the weight in its loads."""
    mod = packed_module(f"@quant({act}, act={act})")
    layer = mod.f.bind(w=randn(37, 45, seed=40), b=randn(37, seed=41))
    fwd = layer._packed
    names = [lnch.kernels[0].name for step in fwd.plan.steps for lnch in step[:1]]
    assert len(names) == 2 and not any(n.endswith("_matmul") for n in names), names
    assert "straight_through" not in {n.op for n in fwd.fused.graph.nodes}
    assert "straight_through" in {n.op for n in fwd.fused.differentiated.nodes}
    text = str(fwd.explain(sizes=dict(M=7, K=45, N=37)))
    bwd = text[text.index("== gradient =="):]
    # the bias gradient (a column sum) and dX (one GEMM over the incoming gradient)
    assert re.search(r"__bwd_\d+: 2 kernel\(s\)", bwd) and re.search(r"= matmul\(%grad_0, %\d+\)", bwd), bwd


def test_block_sparse_trains_its_bias_and_says_the_input_has_no_gradient():
    mod = packed_module("@sparse(block=16)")
    w = randn(37, 40, seed=24)
    w[:16, 16:32] = 0
    layer = mod.f.bind(w=w, b=randn(37, seed=25))
    x, gy = randn(7, 40, seed=26), randn(7, 37, seed=27)
    (layer(x) * gy).sum().backward()
    assert_close(layer.b.grad, gy.sum(0), gradient_tolerance_for(mod.f.graph), "d/db")
    with pytest.raises(CallError, match=r"f\(\): no gradient with respect to x.*block-sparse"):
        layer(x.requires_grad_())


# -- state_dict ----------------------------------------------------------------------------------
def test_state_dict_round_trips_parameters_and_buffers():
    mod = packed_module("@quant(int8)")
    first = mod.f.bind(w=randn(37, 45, seed=30), b=randn(37, seed=31))
    second = mod.f.bind(w=randn(37, 45, seed=32), b=randn(37, seed=33))
    state = first.state_dict()
    assert set(state) == {"w_q", "w_scale", "b"}
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    result = second.load_state_dict(torch.load(buf))
    assert not result.missing_keys and not result.unexpected_keys
    assert isinstance(second.b, torch.nn.Parameter) and second.b.requires_grad
    for name, t in first.state_dict().items():
        assert torch.equal(second.state_dict()[name], t), name
    x, gy = randn(7, 45, seed=34), randn(7, 37, seed=35)
    assert torch.equal(second(x).detach(), first(x).detach())
    # and it trains after the load: its gradient is the one of the loaded weights
    x1 = x.clone().requires_grad_()
    (second(x1) * gy).sum().backward()
    want = plain_grads(lambda x, w, b: x @ w.T + b, {"x": x, "w": first.unpacked()["w"], "b": first.b}, gy)
    tol = gradient_tolerance_for(mod.f.graph)
    assert_close(x1.grad, want["x"], tol, "d/dx after load")
    assert_close(second.b.grad, want["b"], tol, "d/db after load")
