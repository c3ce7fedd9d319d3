"""Gradients (issue 12): generated backward kernels, registered with torch autograd.

- every built-in (tests/test_kernels_builtins.CASES) and every example op, compiled in float64,
  through ``torch.autograd.gradcheck`` (the backward kernels against finite differences of the
  forward kernels, through the interpreter);
- in f32 and f16, the compiled gradients against the float64 reference executor's own
  (torch autograd through the reference), within the op's tolerance (runtime/tolerances.py);
- the registration: opcheck with inputs that require grad, torch.compile of forward + backward,
  gradients only for the inputs that need them, and the clear errors (double backward, packed
  weights).
"""
from __future__ import annotations

import pytest
import torch

import opforge
from opforge.ir.types import DType
from opforge.runtime.inputs import random_inputs
from opforge.runtime.reference import run_graph
from opforge.runtime.tolerances import assert_close, tolerance_for

from .kernel_helpers import as_list, call_args, typed, unique_namespace
from .test_kernels_builtins import CASES

_MODULES: dict = {}


def compiled64(template: str, tag: str):
    """The spec in float64 (f32 written as $T, retyped): what gradcheck needs."""
    key = (template, "f64")
    if key not in _MODULES:
        _MODULES[key] = opforge.compile(typed(template, "f32"), namespace=unique_namespace(tag), dtype=DType.f64)
    return _MODULES[key]


def compiled_in(template: str, dtype: str, tag: str):
    key = (template, dtype)
    if key not in _MODULES:
        _MODULES[key] = opforge.compile(typed(template, dtype), namespace=unique_namespace(tag))
    return _MODULES[key]


def float_dtypes(g) -> set:
    from opforge.runtime.tolerances import graph_dtypes
    return {d for d in graph_dtypes(g) if d.is_float}


def grad_inputs(op, sizes, seed=0, prepare=None):
    ins = random_inputs(op.graph, sizes, seed=seed)
    if prepare is not None:
        ins = prepare(ins)
    args = call_args(op.graph, ins)
    diff = set(op.gradients.params)
    args = [a.detach().clone().requires_grad_(p.name in diff) if isinstance(a, torch.Tensor) else a
            for p, a in zip(op.graph.params, args)]
    return ins, args


def differentiable_cases():
    """The ops of the built-in cases with a float tensor input and a float result (read from
    the spec, no kernels compiled)."""
    out = []
    for case in CASES:
        if "f32" not in case.dtypes:
            continue
        graphs = opforge.load(typed(case.template, "f32")).graphs
        for name in case.ops:
            g = graphs[name]
            if any(p.is_tensor and p.value.type.dtype.is_float for p in g.params) and \
                    any(t.dtype.is_float for t in g.result_types):
                out.append(pytest.param(case, name, id=f"{case.name}-{name}"))
    return out


# cases whose inputs are made to tie (top-k ties, equal comparison operands, zeros for casts):
# a gradient is not defined at a tie, so their gradients are checked on distinct random inputs
TIED_INPUTS = {"compare", "cast", "topk", "results_topk"}


def prepare_of(case):
    return None if case.name in TIED_INPUTS else case.prepare


def small(sizes: list[dict]) -> dict:
    """An awkward but small size set of a case (gradcheck runs the forward a few times)."""
    cands = [s for s in sizes if max(s.values()) <= 40] or sizes
    return max(cands, key=lambda s: sum(v > 1 for v in s.values()))


@pytest.mark.parametrize("case, name", differentiable_cases())
def test_builtin_gradcheck_float64(case, name):
    mod = compiled64(case.template, f"g64_{case.name}")
    op = getattr(mod, name)
    assert op.gradients.differentiable
    if float_dtypes(op.graph) != {DType.f64}:
        return _compare_to_reference(case, name)    # narrow casts inside: finite differences mean nothing
    _, args = grad_inputs(op, small(case.sizes), prepare=prepare_of(case))
    assert torch.autograd.gradcheck(lambda *a: op(*a), tuple(args), eps=1e-6, atol=1e-5, rtol=1e-3,
                                    fast_mode=True, check_undefined_grad=False)


def _compare_to_reference(case, name):
    op = getattr(compiled_in(case.template, "f32", f"gref_{case.name}"), name)
    _check_against_reference(op, small(case.sizes), prepare_of(case))


def _check_against_reference(op, sizes, prepare=None, seed=0):
    ins, args = grad_inputs(op, sizes, seed=seed, prepare=prepare)
    outs = as_list(op(*args))
    diff = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    float_outs = [o for o in outs if o.is_floating_point()]
    gen = torch.Generator().manual_seed(seed + 1)
    cots = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in float_outs]
    got = torch.autograd.grad([o for o in float_outs], diff, [c.to(o.dtype) for c, o in zip(cots, float_outs)],
                              allow_unused=True)
    # the float64 reference, differentiated by torch autograd
    values = {p.name: (a.detach().double().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor)
                       and a.is_floating_point() else a) for p, a in zip(op.graph.params, args)}
    refs = [r for r in run_graph(op.graph, values, sizes, check=True) if r.is_floating_point()]
    want = torch.autograd.grad(refs, [values[p.name] for p in op.graph.params
                                      if isinstance(values[p.name], torch.Tensor) and values[p.name].requires_grad],
                               cots, allow_unused=True)
    tol = tolerance_for(op.graph)
    for p, g, w in zip([p for p in op.graph.params if p.name in op.gradients.params], got, want):
        if w is None:
            assert g is None or not g.any(), p.name
            continue
        assert g is not None, f"no gradient for {p.name}"
        assert g.dtype == values[p.name].dtype or g.dtype == to_dtype(op, p.name), (p.name, g.dtype)
        assert_close(g, w, tol, f"{op.name} d/d{p.name}")


def to_dtype(op, name):
    from opforge.ir.torch_dtypes import to_torch
    return to_torch(next(p for p in op.graph.params if p.name == name).value.type.dtype)


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("case, name", differentiable_cases())
def test_builtin_gradients_against_the_reference(case, name, dtype):
    op = getattr(compiled_in(case.template, dtype, f"gr_{case.name}"), name)
    assert op.gradients.differentiable
    _check_against_reference(op, small(case.sizes), prepare_of(case))
