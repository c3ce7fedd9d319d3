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
from opforge.runtime.tolerances import assert_close, gradient_tolerance_for

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
    tol = gradient_tolerance_for(op.graph)
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


# -- the examples -------------------------------------------------------------------------------
from pathlib import Path  # noqa: E402

from opforge.frontend import load_program  # noqa: E402

from .test_kernels_examples import AWKWARD, FILES  # noqa: E402

EXAMPLE_OPS = [(f, name) for f in FILES for prog in [load_program(f)] for name in prog.op_names
               if any(p.is_tensor and p.value.type.dtype.is_float for p in prog[prog.graph_of(name)].params)]


def _example(path: Path, dtype):
    key = (str(path), str(dtype))
    if key not in _MODULES:
        _MODULES[key] = opforge.compile(path, namespace=unique_namespace(f"gx_{path.stem}"), dtype=dtype)
    return _MODULES[key]


@pytest.mark.parametrize("path, name", EXAMPLE_OPS, ids=[f"{f.stem}-{n}" for f, n in EXAMPLE_OPS])
def test_example_gradcheck_float64(path, name):
    op = getattr(_example(path, DType.f64), name)
    if float_dtypes(op.graph) != {DType.f64}:
        # an explicit f32 (or f16) inside: finite differences through its roundings mean
        # nothing; the f32 and f16 test below compares this op's gradients with the reference
        return _check_against_reference(getattr(_example(path, "f32"), name), AWKWARD[path.stem], seed=1)
    _, args = grad_inputs(op, AWKWARD[path.stem], seed=1)
    assert torch.autograd.gradcheck(lambda *a: op(*a), tuple(args), eps=1e-6, atol=1e-5, rtol=1e-3,
                                    fast_mode=True, check_undefined_grad=False)


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("path, name", EXAMPLE_OPS, ids=[f"{f.stem}-{n}" for f, n in EXAMPLE_OPS])
def test_example_gradients_against_the_reference(path, name, dtype):
    op = getattr(_example(path, dtype), name)
    _check_against_reference(op, AWKWARD[path.stem], seed=2)


# -- registration ---------------------------------------------------------------------------------
SPEC = """
op norm(x: f32[M, D], w: f32[D], eps: f32 = 1e-5) -> f32[M, D] {
    return x * rsqrt(mean(x * x, axis=-1, keepdim=true) + eps) * w
}
op two(x: f32[M, D]) -> (f32[M, D], f32[M]) { return exp(x) * 0.5, sum(x * x, axis=-1) }
"""


@pytest.mark.parametrize("mode", ["custom_op", "triton_op"])
def test_opcheck_with_inputs_that_require_grad(mode):
    mod = opforge.compile(SPEC, namespace=unique_namespace(f"gop_{mode}"), registration=mode)
    x = torch.randn(5, 33, requires_grad=True)
    w = torch.randn(33, requires_grad=True)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor") + \
        (("test_aot_dispatch_dynamic",) if mode == "custom_op" else ())
    res = torch.library.opcheck(mod.norm.torch_op, (x, w), test_utils=tests)
    assert set(res.values()) == {"SUCCESS"}, res
    res = torch.library.opcheck(mod.two.torch_op, (x,), test_utils=tests)
    assert set(res.values()) == {"SUCCESS"}, res


def test_torch_compile_of_forward_and_backward_matches_eager():
    mod = opforge.compile(SPEC, namespace=unique_namespace("gcomp"))
    torch._dynamo.reset()

    def loss(x, w):
        y = mod.norm(x, w)
        a, s = mod.two(y)
        return (a * y).sum() + s.mean()

    gen = torch.Generator().manual_seed(0)
    x0, w0 = torch.randn(7, 33, generator=gen), torch.randn(33, generator=gen)
    grads = []
    for fn in (loss, torch.compile(loss, fullgraph=True)):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        fn(x, w).backward()
        grads.append((x.grad, w.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch._dynamo.reset()


def test_only_the_gradients_asked_for_are_computed():
    mod = opforge.compile(SPEC, namespace=unique_namespace("gmask"))
    x = torch.randn(5, 33, requires_grad=True)
    w = torch.randn(33)                              # frozen: no gradient wanted
    mod.norm(x, w).sum().backward()
    assert x.grad is not None and w.grad is None
    (variant,) = mod.norm.gradients._variants.values()
    assert variant.wrt == ("x",) and len(variant.backward.graph.outputs) == 1
    with torch.no_grad():                             # no graph: the plain forward
        mod.norm(x, w)
    assert len(mod.norm.gradients._variants) == 1


def test_double_backward_is_a_clear_error():
    mod = opforge.compile(SPEC, namespace=unique_namespace("gdouble"))
    x = torch.randn(5, 33, requires_grad=True)
    y = mod.norm(x, torch.randn(33))
    with pytest.raises(opforge.CallError, match=r"norm\(\).*double backward"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


def test_backward_kernel_counts():
    """Attention's backward is 3 kernels (delta, dK/dV, dQ); RMSNorm's 2: dx (a row kernel that
    recomputes rstd from the saved mean square) and dw (each program reduces its columns over
    every row, in order: deterministic, no atomics), with no copy kernel after it."""
    mod = _example(FILES[[f.stem for f in FILES].index("llama")], None)
    q, k, v = (torch.randn(1, 2, 9, 8, dtype=torch.float16, requires_grad=True) for _ in range(3))
    mod.attention(q, k, v).sum().backward()
    (var,) = mod.attention.gradients._variants.values()
    assert var.forward.kernel_count == 1
    assert sum(len(lnch.kernels) for step in var.backward.plan.steps for lnch in step[-1:]) == 3
    x, w = torch.randn(2, 5, 33, dtype=torch.float16, requires_grad=True), torch.randn(33, dtype=torch.float16,
                                                                                      requires_grad=True)
    mod.rms_norm(x, w).sum().backward()
    (var,) = mod.rms_norm.gradients._variants.values()
    assert var.forward.kernel_count == 1
    steps = var.backward.plan.steps
    assert len(steps) == 2 and all(len(lnch.kernels) == 1 for step in steps for lnch in step)
    assert all("atomic_add=True" not in str(lnch.kernel.body) for step in steps for lnch in step)


def test_call_errors_name_the_users_op_when_a_gradient_is_wanted():
    """With an input that requires grad the call goes to the forward that saves for the backward
    (``norm__fwd_1``); a wrong argument is still reported as the user's op."""
    mod = opforge.compile(SPEC, namespace=unique_namespace("gerrname"))
    x = torch.randn(5, 33, dtype=torch.float64, requires_grad=True)
    with pytest.raises(opforge.CallError) as info:
        mod.norm(x, torch.randn(33))
    assert str(info.value).startswith("norm(): 'x' expects dtype f32"), str(info.value)


def test_explain_shows_the_backward_what_is_saved_and_recomputed():
    mod = _example(FILES[[f.stem for f in FILES].index("llama")], "f32")
    text = mod.rms_norm.explain(sizes={"B": 1, "S": 128, "D": 4096})
    grad = text.split("== gradient ==\n", 1)[1]
    assert grad.startswith("with respect to x, w\n")
    # the mean square, f32[B, S, 1]: 128 rows * 4 B
    assert "(512 B at B=1, S=128, D=4096): ms: f32[B, S, 1]" in grad
    # rms_norm's f32 binding: its cast(..., T) to f32 is no cast at all
    assert "recomputed in the backward's kernels: add, rsqrt, mul" in grad
    assert "forward that saves: 1 kernel(s); backward: 2 kernel(s) launched" in grad
    plain = opforge.compile("op ids(x: i32[N]) -> i32[N] { return x + 1 }", namespace=unique_namespace("gexp"))
    assert "== gradient ==\nno gradient: no float tensor input" in str(plain.ids.explain())


@pytest.mark.parametrize("weight, use", [("w: f32[N, K]", "x @ w.T"), ("w: f32[K, N]", "x @ w")])
def test_a_weights_gradient_is_one_product_over_every_batch_row(weight, use):
    """x[B, S, K] against a matrix shared by every batch: the weight's gradient contracts the
    batch axes and rows in one matmul (no per-batch product summed afterwards, no transposing
    copy): the backward is two matmul kernels, and its gradients are the reference's."""
    mod = opforge.compile(f"op f(x: f32[B, S, K], {weight}) -> f32[B, S, N] {{\n    return {use}\n}}\n",
                          namespace=unique_namespace("gweight"))
    w_shape = (7, 33) if use.endswith(".T") else (33, 7)
    x = torch.randn(3, 5, 33, dtype=torch.float32, requires_grad=True)
    w = torch.randn(*w_shape, requires_grad=True)
    gy = torch.randn(3, 5, 7)
    (mod.f(x, w) * gy).sum().backward()
    (var,) = mod.f.gradients._variants.values()
    assert [grp.kind for grp in var.backward.fused.groups] == ["matmul", "matmul"]
    assert not any(n.op == "sum" for n in var.backward.graph.nodes)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ((xr @ (wr.T if use.endswith(".T") else wr)) * gy.double()).sum().backward()
    tol = gradient_tolerance_for(mod.f.graph)
    assert_close(x.grad, xr.grad, tol, "d/dx")
    assert_close(w.grad, wr.grad, tol, "d/dw")


SIZE_ONLY = """
op f(w: f32[3 * F, I], x: f32[B, I], F: i64) -> f32[B, 3 * F] {
    return x @ w.T
}"""


def test_a_size_only_a_parameter_gives_reaches_the_backward():
    """F appears in no tensor's shape by itself (only as 3*F): the backward gets the parameter F
    too, as the forward did (a scan's segment before its body looks like this)."""
    op = opforge.compile(SIZE_ONLY, namespace=unique_namespace("size_only"), dtype=DType.f64).f
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: op(a, b, 2), (w, x), eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=True)
