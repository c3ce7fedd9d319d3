"""Calls with bad arguments raise opforge.CallError before any kernel is launched (nothing is
allocated, no plan step runs), naming the parameter, the expected type, the actual shape and
the symbol bindings; and the reference executor rejects the same calls in the same words."""
from __future__ import annotations

import re

import pytest
import torch

import opforge
from opforge.runtime import executor
from opforge.runtime.reference import run_reference

from .kernel_helpers import compiled

SPEC = """
op f(x: f32[M, D], w: f32[D], eps: f32 = 1e-5) -> f32[M, D] { return x * w + eps }
op heads(x: f32[S, D], e: f32[E]) -> f32[S, D / E, E] {
    return reshape(x, [S, -1, E]) * e
}
op window(x: f32[M, N]) -> f32[M, 3] { return x[:, 1:4] * 2 }
op tail(x: f32[M, N]) -> f32[M, N - 2] { return x[:, 2:] + 1 }
op evens(x: f32[M, N]) -> f32[M, N / 2] { return x[:, ::2] }
op fixed(x: f32[M, 4], y: i32[M]) -> f32[M, 4] { return x * cast(y, f32)[:, None] }
op mm(a: f16[M, K], b: f16[K, N]) -> f16[M, N] { return a @ b }
op kinds(x: f32[M], n: i32 = 2, flag: bool = false, s: f32 = 1.0) -> f32[M] {
    return where(flag, x, x * s) + cast(n, f32)
}
"""
LINE = {name: i + 1 for i, line in enumerate(SPEC.split("\n")) for name in re.findall(r"^op (\w+)", line)}


@pytest.fixture
def mod():
    return compiled(SPEC, "call_errors")


@pytest.fixture
def no_launch(monkeypatch):
    """Fails the test if a plan runs or a buffer is allocated."""
    calls = []

    def spy_call(self, *a, **k):
        calls.append("run")
        raise AssertionError("a plan ran despite bad arguments")

    def spy_alloc(*a, **k):
        calls.append("alloc")
        raise AssertionError("a buffer was allocated despite bad arguments")

    monkeypatch.setattr(executor.PlanRunner, "__call__", spy_call)
    monkeypatch.setattr(executor, "allocate", spy_alloc)
    yield calls
    assert calls == []


def raises_call_error(fn, *args, **kwargs) -> str:
    with pytest.raises(opforge.CallError) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, ValueError)
    return str(info.value)


X = torch.randn(3, 8)
W = torch.randn(8)


# -- dtype, rank, sizes ---------------------------------------------------------------------------
def test_wrong_dtype(mod, no_launch):
    msg = raises_call_error(mod.f, X.half(), W)
    assert msg == "f(): 'x' expects dtype f32 (f32[M, D]), got f16; convert it with .to(torch.float32)"
    msg = raises_call_error(mod.f, X, W.to(torch.int32))
    assert "'w' expects dtype f32 (f32[D]), got i32" in msg
    msg = raises_call_error(mod.fixed, torch.randn(3, 4), torch.ones(3, dtype=torch.int64))
    assert "'y' expects dtype i32 (i32[M]), got i64" in msg and ".to(torch.int32)" in msg
    msg = raises_call_error(mod.mm, torch.randn(2, 3), torch.randn(3, 2).half())
    assert "'a' expects dtype f16 (f16[M, K]), got f32" in msg


def test_wrong_rank(mod, no_launch):
    msg = raises_call_error(mod.f, X, W[None])
    assert msg == "f(): 'w' expects rank 1 f32[D], got shape [1, 8]"
    msg = raises_call_error(mod.f, X[0], W)
    assert "'x' expects rank 2 f32[M, D], got shape [8]" in msg


def test_size_disagreeing_with_a_symbol_bound_by_another_parameter(mod, no_launch):
    msg = raises_call_error(mod.f, X, torch.randn(5))
    # the parameter, the expected type, the actual shape, and the bindings that disagree
    assert msg == ("f(): 'w' expects f32[D], got shape [5]: D = 5 here, but D = 8 from 'x' "
                   "(bindings so far: M=3, D=8)")
    msg = raises_call_error(mod.mm, torch.randn(2, 3).half(), torch.randn(4, 5).half())
    assert "'b' expects f16[K, N], got shape [4, 5]: K = 4 here, but K = 3 from 'a'" in msg
    assert "M=2, K=3" in msg


def test_size_disagreeing_with_a_fixed_size(mod, no_launch):
    msg = raises_call_error(mod.fixed, torch.randn(3, 5), torch.ones(3, dtype=torch.int32))
    assert msg == "fixed(): 'x' expects f32[M, 4], got shape [3, 5]: axis 1 must be 4"
    msg = raises_call_error(mod.fixed, torch.randn(3, 4), torch.ones(2, dtype=torch.int32))
    assert "'y' expects i32[M], got shape [2]: M = 2 here, but M = 3 from 'x'" in msg


# -- derived sizes --------------------------------------------------------------------------------
def test_reshape_to_a_size_that_is_not_whole(mod, no_launch):
    msg = raises_call_error(mod.heads, torch.randn(3, 10), torch.randn(4))
    assert msg.startswith(f"heads(): sizes D=10, E=4, S=3 do not fit the spec (<string>:{LINE['heads'] + 1}:")
    assert msg.endswith("size D/E = 5/2 is not a whole number")


def test_strided_slice_of_an_odd_axis(mod, no_launch):
    msg = raises_call_error(mod.evens, torch.randn(3, 7))
    assert f"(<string>:{LINE['evens']}:" in msg and "N/2 = 7/2 is not a whole number" in msg


def test_slice_bound_beyond_the_axis(mod, no_launch):
    msg = raises_call_error(mod.window, torch.randn(3, 3))
    assert msg.startswith(f"window(): sizes M=3, N=3 do not fit the spec (<string>:{LINE['window']}:")
    assert msg.endswith("slice 1:4 of axis 1 with size 3")
    msg = raises_call_error(mod.tail, torch.randn(3, 1))
    assert f"(<string>:{LINE['tail']}:" in msg and "size N - 2 = -1 is negative" in msg


def test_good_calls_of_the_same_ops_still_work(mod):
    """The rejected calls above differ from working ones only in the sizes they give."""
    assert mod.heads(torch.randn(3, 12), torch.randn(4)).shape == (3, 3, 4)
    assert mod.window(torch.randn(2, 4)).shape == (2, 3)
    assert mod.tail(torch.randn(2, 2)).shape == (2, 0)
    assert mod.evens(torch.randn(2, 8)).shape == (2, 4)
    torch.testing.assert_close(mod.f(X, W, 0.5), X * W + 0.5)


# -- argument count and kinds ---------------------------------------------------------------------
@pytest.mark.parametrize("args, kwargs, message", [
    ((X, W, 1.0, 2.0), {}, "f() takes 3 arguments (x, w, eps), got 4"),
    ((X,), {}, "f() is missing the argument 'w' (f32[D])"),
    ((X, W, torch.tensor([1.0, 2.0])), {}, "f(): 'eps' is a scalar f32, got a tensor of shape [2]"),
    ((X, 3.0), {}, "f(): 'w' expects a tensor f32[D], got float 3.0; pass a torch.Tensor, e.g. torch.tensor(...)"),
])
def test_wrong_arguments_through_run(mod, no_launch, args, kwargs, message):
    """CompiledOp.run, the implementation behind the registered op, binds positionally."""
    assert raises_call_error(mod.f.run, *args, **kwargs) == message


@pytest.mark.parametrize("args, kwargs, message", [
    ((X, W, 1.0, 2.0), {}, "f() takes 3 arguments (x, w, eps), got 4"),
    ((X,), {}, "f() is missing the argument 'w' (f32[D])"),
    ((X, W), {"foo": 1}, "f() has no parameter 'foo'; its parameters are x, w, eps"),
    ((X, W), {"x": X}, "f() got 'x' twice"),
])
def test_wrong_arguments_through_the_op(mod, no_launch, args, kwargs, message):
    """mod.f(...) checks the arguments before the torch dispatcher sees them, so a mistake is
    an opforge.CallError, not a schema error."""
    assert raises_call_error(mod.f, *args, **kwargs) == message


V = torch.randn(4)


@pytest.mark.parametrize("args, kwargs, message", [
    # Python values for a tensor: an opforge message, not torch's schema RuntimeError
    ((1.5, W), {}, "f(): 'x' expects a tensor f32[M, D], got float 1.5; pass a torch.Tensor, e.g. torch.tensor(...)"),
    (([[1.0, 2.0]], W), {}, "f(): 'x' expects a tensor f32[M, D], got list [[1.0, 2.0]]; pass a torch.Tensor, "
                             "e.g. torch.tensor(...)"),
    ((X, None), {}, "f(): 'w' expects a tensor f32[D], got None"),
    ((X, "w"), {}, "f(): 'w' expects a tensor f32[D], got str 'w'"),
    ((X.to_sparse(), W), {}, "f(): 'x' is a sparse_coo tensor; opforge ops take dense (strided) tensors: "
                             "convert it with .to_dense()"),
    # scalars: a float parameter takes an int or a float; an integer one an int that fits; a bool one a bool
    ((X, W, "0.5"), {}, "f(): 'eps' is a scalar f32, got str '0.5'; pass a Python float (or int)"),
    ((X, W, None), {}, "f(): 'eps' is a scalar f32, got None; pass a Python float (or int)"),
    ((X, W, True), {}, "f(): 'eps' is a scalar f32, got bool True; pass a Python float (or int)"),
    ((V,), {"n": 2.0}, "kinds(): 'n' is a scalar i32, got float 2.0; pass a Python int"),
    ((V,), {"n": True}, "kinds(): 'n' is a scalar i32, got bool True; pass a Python int"),
    ((V,), {"n": 2 ** 31}, "kinds(): 'n' is a scalar i32, got 2147483648, which does not fit: "
                           "i32 holds -2**31 to 2**31 - 1"),
    ((V,), {"flag": 1}, "kinds(): 'flag' is a scalar bool, got int 1; pass True or False"),
    ((V,), {"flag": "yes"}, "kinds(): 'flag' is a scalar bool, got str 'yes'; pass True or False"),
    ((V,), {"s": torch.ones(2)}, "kinds(): 's' is a scalar f32, got a tensor of shape [2]"),
])
def test_wrong_kinds_of_arguments_through_the_op(mod, no_launch, args, kwargs, message):
    assert raises_call_error(getattr(mod, message.split("(")[0]), *args, **kwargs) == message


def test_scalars_of_the_accepted_kinds(mod):
    """int for a float parameter, NumPy numbers and 0-d tensors of the parameter's kind."""
    import numpy as np
    for n, flag, s in [(3, True, 2), (np.int32(3), np.bool_(True), np.float32(2.0)),
                       (torch.tensor(3), torch.tensor(True), torch.tensor(2.0)), (-(2 ** 31), False, 0.5)]:
        want = (V if bool(flag) else V * float(s)) + float(n)
        torch.testing.assert_close(mod.kinds(V, n=n, flag=flag, s=s), want)


def test_keyword_arguments_through_the_op(mod):
    torch.testing.assert_close(mod.f(w=W, x=X, eps=0.5), X * W + 0.5)
    torch.testing.assert_close(mod.f(X, W, eps=0.25), X * W + 0.25)


def test_errors_come_through_torch_ops_unchanged(mod, no_launch):
    op = getattr(getattr(torch.ops, mod.namespace), "f")
    msg = raises_call_error(op, X.half(), W)
    assert msg.startswith("f(): 'x' expects dtype f32")


# -- the reference executor says the same -------------------------------------------------------
@pytest.mark.parametrize("name, args", [
    ("f", (X.half(), W)),
    ("f", (X, W[None])),
    ("f", (X, torch.randn(5))),
    ("heads", (torch.randn(3, 10), torch.randn(4))),
    ("window", (torch.randn(3, 3),)),
])
def test_reference_executor_rejects_the_same_calls_in_the_same_words(mod, name, args):
    op = getattr(mod, name)
    compiled_msg = raises_call_error(op, *args)
    reference_msg = raises_call_error(run_reference, op.graph, *args)
    assert compiled_msg == reference_msg



# -- reductions over an axis of size 0 ----------------------------------------------------------
EMPTY = """
op mx(x: f32[M, N]) -> f32[M] { return max(x, axis=-1) }
op mn(x: f32[M, N]) -> f32[1, N] { return min(exp(x), axis=0, keepdim=true) }
op inner(x: f32[A, B]) -> f32[B] { return max(x, axis=(0,)) }
op outer(x: f32[M, N]) -> f32[N] { return inner(x * 2) + 1 }
op sm(x: f32[M, N]) -> (f32[M], f32[M], f32[M, N]) { return sum(x, axis=-1), mean(x, axis=-1), softmax(x, axis=-1) }
"""


@pytest.mark.parametrize("name, shape, message", [
    ("mx", (3, 0), "mx(): max over axis 1 (<string>:2:40), of size N = 0 (sizes M=3, N=0): the maximum of no "
                   "elements has no value (torch raises too; sum gives 0 and mean NaN)"),
    ("mx", (0, 0), "mx(): max over axis 1 (<string>:2:40), of size N = 0 (sizes M=0, N=0)"),
    ("mn", (0, 4), "mn(): min over axis 0 (<string>:3:43), of size M = 0 (sizes M=0, N=4): the minimum"),
    ("outer", (0, 2), "outer(): max over axis 0 (<string>:4:43), of size M = 0 (sizes M=0, N=2)"),
])
def test_max_and_min_over_an_empty_axis_are_call_errors(name, shape, message, no_launch):
    """docs/language.md: as torch raises, so do the compiled op and the reference executor, in
    the same words, naming the op, the axis and where the reduction is (a compiled kernel
    would have returned -inf)."""
    op = getattr(compiled(EMPTY, "empty_axis"), name)
    x = torch.randn(shape)
    msg = raises_call_error(op, x)
    assert msg.startswith(message)
    assert raises_call_error(run_reference, op.graph, x) == msg
    with pytest.raises((IndexError, RuntimeError)):
        torch.amax(x, dim=-1 if name == "mx" else 0)


def test_sum_mean_and_softmax_over_an_empty_axis_are_torchs():
    mod = compiled(EMPTY, "empty_axis")
    x = torch.randn(3, 0)
    s, m, p = mod.sm(x)
    torch.testing.assert_close(s, torch.zeros(3))
    assert torch.isnan(m).all() and m.shape == (3,)
    assert p.shape == (3, 0)
    # an empty axis that is not reduced is no error
    assert mod.mx(torch.randn(0, 5)).shape == (0,)
