"""The reference executor on small specs, each against plain PyTorch: broadcasting, scalars
adopting dtypes, indexing, gathers, topk ties, causal masks, inlining, and the call-time errors
of bind_sizes."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from opforge import CallError
from opforge.runtime.binding import bind_args, bind_sizes, output_shapes
from opforge.runtime.reference import run_graph, run_reference


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def both(g, *args, **kwargs):
    """(spec-dtype result, float64 result) of run_reference."""
    return run_reference(g, *args, **kwargs), run_reference(g, *args, check=True, **kwargs)


def test_verifier_runs_after_every_pass_in_tests():
    from opforge.passes.context import PassContext
    assert PassContext().verify  # conftest sets OPFORGE_CHECKS=1


# -- arithmetic and dtypes ------------------------------------------------------------------------
def test_broadcasting(compile_op):
    g = compile_op("op f(x: f32[M, 1, D], y: f32[N, 1], b: f32[D]) -> f32[M, N, D] { return x * y + b }")
    x, y, b = randn(3, 1, 5, seed=1), randn(4, 1, seed=2), randn(5, seed=3)
    out, out64 = both(g, x, y, b)
    assert out.shape == (3, 4, 5) and out.dtype == torch.float32
    torch.testing.assert_close(out, x * y + b, rtol=0, atol=0)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, x.double() * y.double() + b.double(), rtol=0, atol=0)


def test_scalar_parameter_adopts_the_tensor_dtype(compile_op):
    g = compile_op("op f(x: f16[N], s: f32 = 0.1) -> f16[N] { return x * s }")
    x = randn(9, dtype=torch.float16)
    out = run_reference(g, x)
    assert out.dtype == torch.float16
    # computed in f32 with the f32 scalar, rounded once to f16 (PyTorch's rule for 0-d values)
    torch.testing.assert_close(out, (x.float() * 0.1).half(), rtol=0, atol=0)
    torch.testing.assert_close(run_reference(g, x, s=3.0), (x.float() * 3.0).half(), rtol=0, atol=0)
    torch.testing.assert_close(run_reference(g, x, torch.tensor(-2.0)), x * -2, rtol=0, atol=0)
    torch.testing.assert_close(run_reference(g, x, check=True), x.double() * 0.1, rtol=1e-15, atol=0)


def test_int_literals_with_float_tensors(compile_op):
    g = compile_op("op f(x: bf16[N]) -> bf16[N] { return 2 * x - 1 + x ** 2 }")
    x = randn(7, dtype=torch.bfloat16)
    out = run_reference(g, x)
    assert out.dtype == torch.bfloat16
    # one rounding per primitive, arithmetic in f32 (four primitives: mul, sub, pow, add)
    xf = x.float()
    want = ((2 * xf).bfloat16().float() - 1).bfloat16().float() + (xf ** 2).bfloat16().float()
    torch.testing.assert_close(out, want.bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(run_reference(g, x, check=True), 2 * x.double() - 1 + x.double() ** 2)


def test_integer_arithmetic(compile_op):
    g = compile_op("op f(i: i32[N], j: i32[N]) -> (i32[N], f32[N], bool[N]) { return i * 3 + 1, i / j, i >= j }")
    i = torch.tensor([-7, 0, 5, 9], dtype=torch.int32)
    j = torch.tensor([2, 3, -2, 9], dtype=torch.int32)
    a, q, c = run_reference(g, i, j)
    assert a.dtype == torch.int32 and torch.equal(a, i * 3 + 1)
    assert q.dtype == torch.float32 and torch.equal(q, torch.tensor([-3.5, 0.0, -2.5, 1.0]))  # true division
    assert c.dtype == torch.bool and torch.equal(c, torch.tensor([False, False, True, True]))
    a64, q64, c64 = run_reference(g, i, j, check=True)
    assert a64.dtype == torch.int32 and q64.dtype == torch.float64 and torch.equal(c64, c)


def test_symbolic_size_as_a_value(compile_op):
    g = compile_op("op f(x: f32[N, E]) -> f32[N, E] { return x * rsqrt(cast(E, f32)) + N }")
    x = randn(3, 16)
    torch.testing.assert_close(run_reference(g, x), x * 0.25 + 3, rtol=0, atol=0)
    x = randn(2, 9)
    torch.testing.assert_close(run_reference(g, x, check=True), x.double() / 3 + 2, rtol=1e-15, atol=0)


def test_cast_truncates_toward_zero_and_rounds_only_outside_check_mode(compile_op):
    g = compile_op("op f(x: f32[N]) -> (i32[N], f32[N]) { return cast(x, i32), cast(cast(x, f16), f32) }")
    x = torch.tensor([-1.5, -0.5, 0.5, 1.7, 1 + 2 ** -12])
    ints, rounded = run_reference(g, x)
    assert torch.equal(ints, torch.tensor([-1, 0, 0, 1, 1], dtype=torch.int32))
    assert rounded[-1].item() == 1.0  # through f16
    ints64, exact = run_reference(g, x, check=True)
    assert torch.equal(ints64, ints)
    assert exact[-1].item() == 1 + 2 ** -12  # the float64 oracle does not round
    with pytest.raises(AssertionError):
        torch.testing.assert_close(rounded.double(), exact, rtol=0, atol=0)


def test_where_with_scalar_branch_and_comparison(compile_op):
    g = compile_op("op f(x: f16[M, N]) -> f16[M, N] { return where(x > 0, x, 0.5 * x) }")
    x = randn(4, 6, dtype=torch.float16)
    torch.testing.assert_close(run_reference(g, x), F.leaky_relu(x.float(), 0.5).half(), rtol=0, atol=0)


def test_reductions_and_scans(compile_op):
    g = compile_op("""
op f(x: f16[A, B, C], i: i32[A, B]) -> (f16[A, 1, C], f16[B], i32[A], f16[A, B, C], f16[A, B, C]) {
    return mean(x, axis=1, keepdim=true), max(x, axis=(0, 2)), sum(i, axis=-1), cumsum(x, axis=2), log_softmax(x, axis=0)
}""")
    x = randn(3, 4, 5, dtype=torch.float16)
    i = torch.randint(-100, 100, (3, 4), dtype=torch.int32)
    m, mx, s, cs, ls = run_reference(g, x, i)
    xf = x.float()
    torch.testing.assert_close(m, xf.mean(1, keepdim=True).half())
    assert torch.equal(mx, x.amax(dim=(0, 2)))
    assert s.dtype == torch.int32 and torch.equal(s, i.sum(-1).int())
    torch.testing.assert_close(cs, torch.cumsum(xf, 2).half(), rtol=0, atol=0)
    torch.testing.assert_close(ls, torch.log_softmax(xf, 0).half(), rtol=0, atol=0)


# -- shapes and indexing --------------------------------------------------------------------------
def test_symbolic_reshape_with_hole(compile_op):
    g = compile_op("op f(x: f32[B, D]) -> f32[B, D/2, 2] { return reshape(x, [B, -1, 2]) }")
    x = randn(3, 8)
    assert torch.equal(run_reference(g, x), x.reshape(3, 4, 2))
    with pytest.raises(CallError, match=r"D/2 = 7/2 is not a whole number"):
        run_reference(g, randn(3, 7))


def test_reshape_permute_roundtrip(compile_op):
    g = compile_op("""op f(x: f32[B, S, D], c: f32[E]) -> f32[B, S, D] {
    h = permute(reshape(x, [B, S, -1, E]), [0, 2, 1, 3])
    return reshape(transpose(h, 1, 2), [B, S, D])
}""")
    x = randn(2, 3, 12)
    assert torch.equal(run_reference(g, x, randn(4)), x)
    assert torch.equal(run_reference(g, x, randn(3)), x)


def test_slicing_negative_indices_and_steps(compile_op):
    g = compile_op("""op f(x: f32[M, N]) -> (f32[3, N - 2], f32[M], f32[N], f32[M/2, N/2], f32[0], f32[N/3 - 1]) {
    return x[-3:, 1:-1], x[:, -1], x[1], x[::2, 1::2], x[5:2, 0], x[0, 4::3]
}""")
    x = torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6)
    outs = run_reference(g, x)
    want = (x[-3:, 1:-1], x[:, -1], x[1], x[::2, 1::2], x[5:2, 0], x[0, 4::3])
    assert len(outs) == len(want)
    for o, w in zip(outs, want):
        assert o.shape == w.shape and torch.equal(o, w)
    # a stepped slice of a symbolic axis needs the axis to divide by the step
    with pytest.raises(CallError, match="M/2 = 7/2 is not a whole number"):
        run_reference(g, torch.zeros(7, 6))


def test_even_and_odd_halves_of_an_even_axis(compile_op):
    """The interleaved rotary form: x[..., ::2] and x[..., 1::2] both have E/2 elements."""
    g = compile_op("""op f(x: f32[S, E]) -> f32[S, E] {
    a = x[..., ::2]
    b = x[..., 1::2]
    return reshape(concat(a[..., None], b[..., None], axis=-1), [S, E])
}""")
    for e in (2, 8, 14):
        x = randn(3, e)
        assert torch.equal(run_reference(g, x), x)


def test_none_and_ellipsis(compile_op):
    g = compile_op("op f(x: f32[A, B, C]) -> (f32[1, A, B], f32[A, B, C, 1], f32[B, 1]) "
                   "{ return x[None, ..., 0], x[..., None], x[0, :, None, -1] }")
    x = randn(2, 3, 4)
    a, b, c = run_reference(g, x)
    assert torch.equal(a, x[None, ..., 0]) and torch.equal(b, x[..., None]) and torch.equal(c, x[0, :, None, -1])


def test_gather_rows(compile_op):
    g = compile_op("op f(emb: f32[V, D], ids: i32[B, S]) -> (f32[B, S, D], f32[B, S, 2]) "
                   "{ return emb[ids], emb[ids, :2] }")
    emb = randn(10, 4)
    ids = torch.tensor([[0, 9, 3], [3, 3, 1]], dtype=torch.int32)
    rows, part = run_reference(g, emb, ids)
    assert torch.equal(rows, F.embedding(ids.long(), emb))
    assert torch.equal(part, F.embedding(ids.long(), emb)[..., :2])
    rows64, _ = run_reference(g, emb, ids, check=True)
    assert rows64.dtype == torch.float64 and torch.equal(rows64, rows.double())


def test_concat_of_symbolic_sizes(compile_op):
    g = compile_op("op f(a: f16[M, D], b: f16[N, D]) -> f16[M + N, D] { return concat(a, -b, axis=0) }")
    a, b = randn(2, 3, dtype=torch.float16), randn(5, 3, dtype=torch.float16, seed=4)
    assert torch.equal(run_reference(g, a, b), torch.cat([a, -b]))
    assert output_shapes(g, {"M": 2, "N": 5, "D": 3}) == [(7, 3)]


# -- selection ------------------------------------------------------------------------------------
def test_topk_ties_pick_the_lower_index(compile_op):
    g = compile_op("op f(x: f32[R, N]) -> (f32[R, 2], i32[R, 2]) { v, i = topk(x, k=2); return v, i }")
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0],
                      [5.0, 5.0, 5.0, 5.0, 5.0],
                      [0.0, 1.0, 2.0, 2.0, -1.0],
                      [-4.0, 7.0, 0.0, 7.0, 9.0]])
    for check in (False, True):
        v, i = run_reference(g, x, check=check)
        assert i.dtype == torch.int32
        assert torch.equal(i, torch.tensor([[1, 2], [0, 1], [2, 3], [4, 1]], dtype=torch.int32))
        assert torch.equal(v.float(), torch.tensor([[3.0, 3.0], [5.0, 5.0], [2.0, 2.0], [9.0, 7.0]]))


def test_topk_along_axis0_matches_torch(compile_op):
    g = compile_op("op f(x: f16[N, C]) -> (f16[3, C], i32[3, C]) { v, i = topk(x, k=3, axis=0); return v, i }")
    x = randn(9, 4, dtype=torch.float32).half()
    v, i = run_reference(g, x)
    tv, ti = torch.topk(x.float(), 3, dim=0)
    assert torch.equal(v, tv.half()) and torch.equal(i, ti.int())


@pytest.mark.parametrize("s,t", [(3, 5), (5, 3), (4, 4), (1, 6)])
def test_causal_with_different_query_and_key_lengths(compile_op, s, t):
    g = compile_op("""op f(q: f32[S, E], k: f32[T, E]) -> (bool[S, T], f32[S, T]) {
    m = causal(S, T)
    return m, softmax(where(m, q @ k.T, -inf), axis=-1)
}""")
    q, k = randn(s, 4, seed=5), randn(t, 4, seed=6)
    mask, p = run_reference(g, q, k)
    i, j = torch.arange(s)[:, None], torch.arange(t)[None, :]
    want = j <= i + (t - s)  # queries aligned to the end of the keys
    assert torch.equal(mask, want)
    assert torch.equal(mask, torch.ones(s, t, dtype=torch.bool).tril(t - s))
    if want.any(-1).all():
        torch.testing.assert_close(p, torch.softmax((q @ k.T).masked_fill(~want, -math.inf), -1))
    if s <= t:  # every query sees at least one key; SDPA's bottom-right causal mask is the same
        ref = F.scaled_dot_product_attention(q[None], k[None], torch.eye(t)[None],
                                             attn_mask=want[None], scale=1.0)[0]
        torch.testing.assert_close(p, ref)


# -- inlining -------------------------------------------------------------------------------------
def test_inlined_calls_with_renamed_sizes_and_defaults(compile_op):
    g = compile_op("""
op norm(v: f32[R, C], eps: f32 = 0.5) -> f32[R, C] { return v * rsqrt(mean(v * v, axis=-1, keepdim=true) + eps) }
op heads(x: f32[B, D], e: f32[E]) -> f32[B, D / E, E] { return reshape(x, [B, -1, E]) }
op f(x: f32[M, N], e: f32[H]) -> f32[M, N / H, H] { return heads(norm(x), e) * 2 + heads(norm(x, eps=2.0), e) }
""")
    assert not any(n.op == "call" for n in g.nodes)
    x, e = randn(3, 8), randn(2)

    def norm(v, eps):
        return v * torch.rsqrt((v * v).mean(-1, keepdim=True) + eps)

    want = norm(x.double(), 0.5).reshape(3, 4, 2) * 2 + norm(x.double(), 2.0).reshape(3, 4, 2)
    torch.testing.assert_close(run_reference(g, x, e, check=True), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(run_reference(g, x, e), want.float())


def test_nested_calls_compose_their_sizes(compile_op):
    """Sizes substituted through three levels of calls (each renaming and dividing them), and a
    callee called twice at different sizes: inlining composes the mappings."""
    g = compile_op("""
op split(v: f32[R, C], k: f32[K]) -> f32[R, C / K, K] { return reshape(v, [R, -1, K]) * k }
op mid(u: f32[A, B], k: f32[G]) -> f32[A, B / G, G] { return split(exp(u), k) + 1 }
op top(x: f32[M, N], e: f32[H], d: f32[2]) -> f32[M, N / H, H] {
    y = mid(x, e)
    z = split(x[:, :2], d)
    return y + sum(z, axis=-1, keepdim=true)[:, :1, :]
}
""")
    assert not any(n.op == "call" for n in g.nodes)
    assert str(g.result_types[0]) == "f32[M, N/H, H]"
    x, e, d = randn(3, 8), randn(4, seed=1), randn(2, seed=2)
    xd = x.double()
    y = (xd.exp().reshape(3, 2, 4) * e.double()) + 1
    z = (xd[:, :2].reshape(3, 1, 2) * d.double()).sum(-1, keepdim=True)
    torch.testing.assert_close(run_reference(g, x, e, d, check=True), y + z, rtol=1e-12, atol=1e-12)


def test_returning_calls_with_several_results_returns_all_of_them(compile_op):
    """docs/language.md: `return f(...)` of a built-in or op with several results returns all
    of them, alone or among other values."""
    g = compile_op("""
op pair(x: f32[M, N]) -> (f32[M, N], f32[M, N]) { return x + 1, x - 1 }
op f(x: f32[M, N]) -> (f32[M, N], f32[M, N], f32[M, 2], i32[M, 2], f32[M, N]) {
    return pair(x), topk(x, k=2), exp(x)
}
""")
    x = randn(4, 6)
    a, b, v, i, c = run_reference(g, x)
    torch.testing.assert_close(a, x + 1)
    torch.testing.assert_close(b, x - 1)
    want = torch.topk(x, 2)
    torch.testing.assert_close(v, want.values)
    assert i.dtype == torch.int32 and torch.equal(i.long(), want.indices)
    torch.testing.assert_close(c, x.exp())


def test_run_graph_takes_bound_values_and_checks_shapes(compile_op):
    g = compile_op("op f(x: f32[M, K], w: f32[N, K]) -> f32[M, N] { return x @ w.T }")
    x, w = randn(3, 4), randn(5, 4, seed=9)
    (out,) = run_graph(g, {"x": x, "w": w}, {"M": 3, "K": 4, "N": 5})
    torch.testing.assert_close(out, x @ w.T)
    with pytest.raises(AssertionError, match="shape"):
        run_graph(g, {"x": x, "w": w}, {"M": 3, "K": 4, "N": 6})  # wrong bindings are caught


# -- call-time errors -----------------------------------------------------------------------------
@pytest.fixture
def linear(compile_op):
    return compile_op("op lin(x: f16[M, K], w: f16[N, K], b: f16[N], s: f32 = 1.0) -> f16[M, N] "
                      "{ return (x @ w.T + b) * s }")


def test_call_with_a_symbol_bound_twice_names_both_parameters(linear):
    x, w, b = randn(3, 4).half(), randn(5, 6).half(), randn(5).half()
    with pytest.raises(CallError) as e:
        run_reference(linear, x, w, b)
    msg = str(e.value)
    assert "lin()" in msg and "'w'" in msg and "f16[N, K]" in msg and "[5, 6]" in msg
    assert "K = 6 here, but K = 4 from 'x'" in msg and "M=3, K=4" in msg


@pytest.mark.parametrize("args,kwargs,match", [
    ((torch.zeros(3, 4), torch.zeros(5, 4).half(), torch.zeros(5).half()), {},
     r"'x' expects dtype f16 \(f16\[M, K\]\), got f32; convert it with .to\(torch.float16\)"),
    ((torch.zeros(3, 4, 1).half(), torch.zeros(5, 4).half(), torch.zeros(5).half()), {},
     r"'x' expects rank 2 f16\[M, K\], got shape \[3, 4, 1\]"),
    ((torch.zeros(3, 4).half(), torch.zeros(5, 4).half(), torch.zeros(6).half()), {},
     r"'b' expects f16\[N\], got shape \[6\]: N = 6 here, but N = 5 from 'w'"),
    ((torch.zeros(3, 4).half(), torch.zeros(5, 4).half()), {}, r"missing the argument 'b' \(f16\[N\]\)"),
    ((torch.zeros(3, 4).half(),) * 5, {}, r"takes 4 arguments \(x, w, b, s\), got 5"),
    ((torch.zeros(3, 4).half(), torch.zeros(5, 4).half(), torch.zeros(5).half()), {"bias": 1},
     r"has no parameter 'bias'; its parameters are x, w, b, s"),
    ((torch.zeros(3, 4).half(), torch.zeros(5, 4).half(), torch.zeros(5).half()), {"x": 1}, r"got 'x' twice"),
    ((torch.zeros(3, 4).half(), torch.zeros(5, 4).half(), torch.zeros(5).half(), torch.ones(2)), {},
     r"'s' is a scalar f32, got a tensor of shape \[2\]"),
    (([[1.0]], torch.zeros(5, 4).half(), torch.zeros(5).half()), {}, r"'x' expects a tensor f16\[M, K\], got list"),
])
def test_call_errors(linear, args, kwargs, match):
    with pytest.raises(CallError, match=match):
        run_reference(linear, *args, **kwargs)


def test_call_errors_for_fixed_and_derived_sizes(compile_op):
    g = compile_op("op f(x: f32[M, 4], c: f32[E]) -> f32[M, 4 / E, E] { return reshape(x, [M, -1, E]) }")
    with pytest.raises(CallError, match=r"'x' expects f32\[M, 4\], got shape \[2, 5\]: axis 1 must be 4"):
        run_reference(g, torch.zeros(2, 5), torch.zeros(2))
    with pytest.raises(CallError, match=r"sizes E=3, M=2 do not fit the spec \(<string>:1:\d+\): size 4/E = 4/3"):
        run_reference(g, torch.zeros(2, 4), torch.zeros(3))
    assert run_reference(g, torch.zeros(2, 4), torch.zeros(2)).shape == (2, 2, 2)


def test_call_error_for_a_zero_divisor_size(compile_op):
    g = compile_op("op f(x: f32[M, D], c: f32[E]) -> f32[M, D / E, E] { return reshape(x, [M, -1, E]) }")
    with pytest.raises(CallError, match=r"sizes D=4, E=0, M=2 do not fit the spec .*E is 0"):
        run_reference(g, torch.zeros(2, 4), torch.zeros(0))


def test_run_graph_checks_derived_sizes(compile_op):
    g = compile_op("op f(x: f32[M, D], c: f32[E]) -> f32[M, D / E, E] { return reshape(x, [M, -1, E]) }")
    with pytest.raises(CallError, match="D/E = 5/2 is not a whole number"):
        run_graph(g, {"x": torch.zeros(2, 5), "c": torch.zeros(2)}, {"M": 2, "D": 5, "E": 2})


def test_call_error_for_a_slice_outside_its_axis(compile_op):
    g = compile_op("op f(x: f32[N]) -> f32[2] { return x[3:5] }")
    assert torch.equal(run_reference(g, torch.arange(6.0)), torch.tensor([3.0, 4.0]))
    with pytest.raises(CallError, match="slice 3:5 of axis 0 with size 4"):
        run_reference(g, torch.arange(4.0))


def test_bind_sizes_and_bind_args(linear):
    values = bind_args(linear, (torch.zeros(3, 4).half(), torch.zeros(5, 4).half()), {"b": torch.zeros(5).half()})
    assert values["s"] == 1.0  # the default
    assert bind_sizes(linear, values) == {"M": 3, "K": 4, "N": 5}
    # the float64 oracle accepts any dtype; the spec-dtype run does not
    values64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in values.items()}
    assert bind_sizes(linear, values64, check_dtype=False) == {"M": 3, "K": 4, "N": 5}
    with pytest.raises(CallError, match="expects dtype f16"):
        bind_sizes(linear, values64)
    with pytest.raises(CallError, match="is on"):
        bind_sizes(linear, values, device=torch.device("meta"))
