"""Compiled ops as PyTorch operators: under torch.compile(fullgraph=True), with non-contiguous
inputs (transposed, permuted, sliced, expanded views and views with a storage offset), and
re-registration of a changed spec under the same namespace."""
from __future__ import annotations

import pytest
import torch

import opforge
from opforge.runtime.inputs import random_inputs
from opforge.runtime.library import RegistrationError
from opforge.runtime.reference import run_graph

from .kernel_helpers import as_list, call_args, check_outputs, compiled, unique_namespace

SPEC = """
op norm(x: f32[M, D], w: f32[D], eps: f32 = 1e-5) -> f32[M, D] {
    return x * rsqrt(mean(x * x, axis=-1, keepdim=true) + eps) * w
}
op proj(x: f32[M, D], w: f32[N, D], b: f32[N]) -> f32[M, N] { return silu(x @ w.T + b) }
op batched(a: f16[B, M, K], b: f16[B, K, N]) -> f16[B, M, N] { return a @ b }
op split(x: f32[M, D]) -> (f32[M, D], f32[M]) {
    s = sum(exp(x), axis=-1)
    return exp(x) / s[:, None], s
}
op heads(x: f16[B, S, D], c: f16[S, E]) -> f16[B, D / E, S, E] {
    return permute(reshape(x, [B, S, -1, E]), [0, 2, 1, 3]) * c
}
"""


def mod():
    return compiled(SPEC, "torch_int")


def reference(op, args):
    g = op.graph
    values = {p.name: a for p, a in zip(g.params, args)}
    for p in g.params:
        if p.name not in values:
            values[p.name] = p.default
    bindings = {}
    for p, a in zip(g.params, args):
        if isinstance(a, torch.Tensor):
            for d, n in zip(p.value.type.shape, a.shape):
                if not isinstance(d, int) and d.is_symbol():
                    (s,) = d.symbols
                    bindings[s] = int(n)
    return run_graph(g, values, bindings, check=True)


# -- torch.compile ------------------------------------------------------------------------------
def test_torch_compile_fullgraph_gives_the_same_results():
    m = mod()
    torch._dynamo.reset()

    def block(x, w_norm, w, b):
        h = m.norm(x, w_norm)
        y = m.proj(h, w, b)
        probs, s = m.split(y)
        return probs * 2 + 1, s, s.sum()

    gen = torch.Generator().manual_seed(0)
    compiled_block = torch.compile(block, fullgraph=True)
    for M, D, N in ((5, 16, 7), (9, 33, 130)):
        x, w_norm = torch.randn(M, D, generator=gen), torch.randn(D, generator=gen)
        w, b = torch.randn(N, D, generator=gen) / D ** 0.5, torch.randn(N, generator=gen)
        eager = block(x, w_norm, w, b)
        got = compiled_block(x, w_norm, w, b)
        for e, c in zip(eager, got):
            assert e.dtype == c.dtype and e.shape == c.shape
        # opforge's results are bit-identical under torch.compile; the sum after them is torch's
        # own (inductor may sum in another order than eager: an ulp apart on some CPUs)
        for e, c in zip(eager[:2], got[:2]):
            torch.testing.assert_close(c, e, rtol=0, atol=0)
        torch.testing.assert_close(got[2], eager[2], rtol=1e-6, atol=0)
    torch._dynamo.reset()


def test_torch_compile_sees_the_fake_shapes_and_dtypes():
    m = mod()
    torch._dynamo.reset()
    seen = {}

    def backend(gm, example_inputs):
        seen["graph"] = str(gm.graph)
        return gm.forward

    def fn(x, c):
        return m.heads(x, c) + 1

    x = torch.randn(2, 3, 12).half()
    c = torch.randn(3, 4).half()
    out = torch.compile(fn, fullgraph=True, backend=backend)(x, c)
    # one node calling the registered op: no graph break, no decomposition
    assert seen["graph"].count(f"target=torch.ops.{m.namespace}.heads") == 1
    assert out.shape == (2, 3, 3, 4) and out.dtype == torch.float16
    torch.testing.assert_close(out, fn(x, c), rtol=0, atol=0)
    torch._dynamo.reset()


# -- non-contiguous inputs ----------------------------------------------------------------------
def _same(op, views, *, exact=True):
    """The op on views and on contiguous copies of them: identical results, and both match the
    reference."""
    assert any(isinstance(v, torch.Tensor) and not v.is_contiguous() for v in views)
    dense = [v.contiguous() if isinstance(v, torch.Tensor) else v for v in views]
    got = as_list(op(*views))
    want = as_list(op(*dense))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    check_outputs(op.graph, got, reference(op, dense), " (views)")


def test_transposed_and_sliced_inputs():
    m = mod()
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(40, 21, generator=gen)
    x = base.T[1:8]                           # [7, 40]: transposed, offset, strided
    w = torch.randn(80, generator=gen)[::2]   # [40], stride 2
    assert not x.is_contiguous() and x.storage_offset() > 0
    _same(m.norm, [x, w])
    _same(m.norm, [x, w, 0.5])


def test_expanded_inputs():
    m = mod()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 33, generator=gen).expand(6, 33)      # stride 0 along M
    w = torch.randn(1, generator=gen).expand(33)               # every element the same
    _same(m.norm, [x, w])
    wp = torch.randn(5, 1, generator=gen).expand(5, 33)
    b = torch.randn(5, generator=gen)
    _same(m.proj, [torch.randn(6, 33, generator=gen), wp, b])


def test_matmul_operands_as_views():
    m = mod()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(33, 7, generator=gen).T                     # [7, 33] transposed
    w = torch.randn(40, 33, generator=gen)[::3]                 # [14, 33] every third row
    b = torch.randn(28, generator=gen)[::2]
    _same(m.proj, [x, w, b])
    a = torch.randn(2, 33, 5, generator=gen).half().permute(0, 2, 1)           # [2, 5, 33]
    bb = torch.randn(17, 33, 2, generator=gen).half().permute(2, 1, 0)         # [2, 33, 17]
    _same(m.batched, [a, bb])
    a2 = torch.randn(1, 5, 33, generator=gen).half().expand(3, 5, 33)          # broadcast batch
    bb2 = torch.randn(3, 33, 40, generator=gen).half()[:, :, 3:20]
    _same(m.batched, [a2, bb2])


def test_permuted_input_of_a_reshaping_op():
    m = mod()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(12, 2, 5, generator=gen).half().permute(1, 2, 0)   # [2, 5, 12]
    c = torch.randn(4, 5, generator=gen).half().T                      # [5, 4]
    _same(m.heads, [x, c])


def test_multi_output_op_with_views_and_aliased_arguments():
    m = mod()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(130, 9, generator=gen).T[:, ::2]
    _same(m.split, [x])
    # the same tensor for two parameters
    v = torch.randn(33, generator=gen)
    y = torch.randn(33, 33, generator=gen)[::3]          # [11, 33] rows of stride 3*33
    _same(m.norm, [y, v])
    sq = torch.randn(33, 33, generator=gen)
    _same(m.proj, [sq.T, sq, v])                           # x and w alias one storage


def test_outputs_are_fresh_contiguous_tensors():
    m = mod()
    x = torch.randn(8, 5).T
    out = m.norm(x, torch.randn(8))
    assert out.is_contiguous()
    assert out.data_ptr() != x.data_ptr()


# -- re-registration ----------------------------------------------------------------------------
def test_a_changed_spec_under_the_same_namespace_repoints_the_op():
    ns = unique_namespace("repoint")
    first = opforge.compile("op keep(x: f32[M, N]) -> f32[M, N] { return x + 1 }", namespace=ns)
    x = torch.randn(2, 9)
    torch.testing.assert_close(first.keep(x), x + 1, rtol=0, atol=0)
    second = opforge.compile("op keep(x: f32[M, N]) -> f32[M, N] { return x * 3 - 1 }", namespace=ns)
    # the registered operator now runs the new spec, through either module and torch.ops
    torch.testing.assert_close(getattr(torch.ops, ns).keep(x), x * 3 - 1, rtol=0, atol=0)
    torch.testing.assert_close(second.keep(x), x * 3 - 1, rtol=0, atol=0)
    torch.testing.assert_close(first.keep(x), x * 3 - 1, rtol=0, atol=0)
    assert second.keep.torch_op is getattr(torch.ops, ns).keep
    # and under torch.compile too
    torch._dynamo.reset()
    fn = torch.compile(lambda t: getattr(torch.ops, ns).keep(t) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(x), (x * 3 - 1) * 2, rtol=0, atol=0)
    torch._dynamo.reset()


def test_a_changed_signature_under_the_same_namespace_is_a_clear_error():
    ns = unique_namespace("resig")
    first = opforge.compile("op g(x: f32[M, N]) -> f32[M, N] { return x + 1 }", namespace=ns)
    with pytest.raises(RegistrationError) as info:
        opforge.compile("op g(x: f32[M, N], y: f32[N]) -> f32[M, N] { return x + y }", namespace=ns)
    msg = str(info.value)
    assert f"torch.ops.{ns}.g is already registered as (Tensor x) -> Tensor" in msg
    assert "(Tensor x, Tensor y) -> Tensor" in msg
    assert "namespace=" in msg
    with pytest.raises(RegistrationError, match="float s=0.5"):
        opforge.compile("op g(x: f32[M, N], s: f32 = 0.5) -> f32[M, N] { return x * s }", namespace=ns)
    with pytest.raises(RegistrationError, match=r"-> \(Tensor, Tensor\)"):
        opforge.compile("op g(x: f32[M, N]) -> (f32[M, N], f32[M, N]) { return x, x }", namespace=ns)
    # the operator still runs the first spec
    x = torch.randn(3, 4)
    torch.testing.assert_close(first.g(x), x + 1, rtol=0, atol=0)
    torch.testing.assert_close(getattr(torch.ops, ns).g(x), x + 1, rtol=0, atol=0)


def test_registered_ops_take_keyword_arguments_and_defaults():
    m = mod()
    x, w = torch.randn(4, 16), torch.randn(16)
    a = m.norm(x, w)
    b = m.norm(x, w, eps=1e-5)
    c = m.norm(x, w=w, eps=0.25)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    check_outputs(m.norm.graph, [c], reference(m.norm, [x, w, 0.25]))
    ins = random_inputs(m.norm.graph, {"M": 3, "D": 5}, seed=0)
    assert torch.equal(m.norm(*call_args(m.norm.graph, ins)), m.norm.torch_op(*call_args(m.norm.graph, ins)))
