"""Bound modules for checkpoints (issue 13, item 7): every weight with a layout must be bound,
and meta tensors give an empty module that load_state_dict fills, for loading a quantized
checkpoint without its dense weights."""
from __future__ import annotations

import pytest
import torch

import opforge
from opforge.runtime.binding import CallError

from .kernel_helpers import unique_namespace

SPEC = """
op q4(x: f32[M, K], w: f32[N, K] @quant(int4, group=32)) -> f32[M, N] { return x @ w.T }
op int8_bias(x: f32[M, K], w: f32[N, K] @quant(int8), bias: f32[N]) -> f32[M, N] { return x @ w.T + bias }
op fp8(x: f32[M, K], w: f32[N, K] @quant(fp8)) -> f32[M, N] { return x @ w.T }
op w8a8(x: f32[M, K], w: f32[N, K] @quant(int8, act=int8)) -> f32[M, N] { return x @ w.T }
op s24(x: f32[M, K], w: f32[N, K] @sparse(2:4)) -> f32[M, N] { return x @ w.T }
op lowrank(x: f32[M, K], w: f32[N, K] @lowrank(rank=4)) -> f32[M, N] { return x @ w.T }
op two(x: f32[M, K], a: f32[N, K] @quant(int8), b: f32[N, K] @quant(int4, group=32)) -> f32[M, N] {
    return x @ a.T + x @ b.T
}
op block(x: f32[M, K], w: f32[N, K] @sparse(block=16)) -> f32[M, N] { return x @ w.T }
op lowrank_tol(x: f32[M, K], w: f32[N, K] @lowrank(tol=0.1)) -> f32[M, N] { return x @ w.T }
op auto(x: f32[M, K], w: f32[N, K] @auto(tol=0.05)) -> f32[M, N] { return x @ w.T }
"""


@pytest.fixture(scope="module")
def mod():
    return opforge.compile(SPEC, namespace=unique_namespace("empty"))


def _weights(op, gen):
    out = {}
    for p in op.graph.params:
        if p.name == "x":
            continue
        shape = (19, 64) if p.value.type.rank == 2 else (19,)
        out[p.name] = torch.randn(*shape, generator=gen)
    return out


@pytest.mark.parametrize("name", ["q4", "int8_bias", "fp8", "w8a8", "s24", "lowrank", "two"])
def test_an_empty_module_loaded_from_a_state_dict_is_the_bound_one(mod, name):
    op = getattr(mod, name)
    gen = torch.Generator().manual_seed(7)
    weights = _weights(op, gen)
    bound = op.bind(**weights)
    empty = op.bind(**{k: torch.empty(v.shape, device="meta") for k, v in weights.items()})
    # same buffers and parameters, same shapes and dtypes, none of them on the meta device
    want = {k: (tuple(v.shape), v.dtype) for k, v in bound.state_dict().items()}
    assert {k: (tuple(v.shape), v.dtype) for k, v in empty.state_dict().items()} == want
    assert all(v.device.type != "meta" for v in empty.state_dict().values())
    x = torch.randn(5, 64, generator=gen)
    with pytest.raises(CallError, match="made from meta tensors.*load_state_dict"):
        empty(x)
    empty.load_state_dict(bound.state_dict())
    assert torch.equal(empty(x), bound(x))


def test_an_empty_module_inside_a_model_loads_with_it(mod):
    class Model(torch.nn.Module):
        def __init__(self, w):
            super().__init__()
            self.proj = mod.q4.bind(w=w)

        def forward(self, x):
            return self.proj(x)

    trained = Model(torch.randn(19, 64))
    fresh = Model(torch.empty(19, 64, device="meta"))
    fresh.load_state_dict(trained.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), trained(x))


@pytest.mark.parametrize("name,why", [
    ("block", "how many blocks it stores depends on the weight's values"),
    ("lowrank_tol", r"the rank depends on the weight's values.*@lowrank\(rank=R\)"),
    ("auto", "chooses its layout from the weight's values"),
])
def test_layouts_whose_sizes_depend_on_the_values_cannot_be_bound_empty(mod, name, why):
    with pytest.raises(CallError, match=why):
        getattr(mod, name).bind(w=torch.empty(19, 64, device="meta"))


def test_every_weight_with_a_layout_must_be_bound(mod):
    with pytest.raises(CallError, match=r"int8_bias.bind\(\): 'w' @quant\(int8\) not given"):
        mod.int8_bias.bind(bias=torch.randn(19))
    with pytest.raises(CallError, match=r"'b' @quant\(int4, group=32\) not given"):
        mod.two.bind(a=torch.randn(19, 64))
    # a dense weight may still be left to the call
    layer = mod.int8_bias.bind(w=torch.randn(19, 64))
    assert layer.free == ["x", "bias"]
