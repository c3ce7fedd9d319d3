"""The host path of a call (issue 11, item 1): launch records keyed by the call's sizes, strides
and dtypes (runtime/records.py), buffers only for the chosen alternative, no size arithmetic on
a repeated call, the launch step that ``bench --host`` stubs, and a registration that takes
``torch.library.register_autograd``. No timing here: the speed targets live in the benchmark
(``opforge bench --host``)."""
from __future__ import annotations

import json
import sys

import pytest
import torch

import opforge
from opforge.ir import dims
from opforge.runtime import executor
from opforge.runtime.inputs import random_inputs

from .conftest import EXAMPLES
from .kernel_helpers import call_args, check_outputs, compiled, unique_namespace
from opforge.runtime.reference import run_graph

LINEAR = "op lin(x: f32[M, K], w: f32[N, K]) -> f32[M, N] { return x @ w.T }"
NORM = """
op norm(x: f32[M, D], w: f32[D], eps: f32 = 1e-5) -> f32[M, D] {
    return x * rsqrt(mean(x * x, axis=-1, keepdim=true) + eps) * w
}"""


@pytest.fixture
def allocations(monkeypatch):
    """Every buffer a call allocates, as (shape, dtype, zeroed)."""
    seen = []
    alloc, zeros = executor.allocate, executor.zeros

    def counting_alloc(shape, dtype, device):
        seen.append((tuple(shape), dtype, False))
        return alloc(shape, dtype, device)

    def counting_zeros(shape, dtype, device):
        seen.append((tuple(shape), dtype, True))
        return zeros(shape, dtype, device)
    monkeypatch.setattr(executor, "allocate", counting_alloc)
    monkeypatch.setattr(executor, "zeros", counting_zeros)
    return seen


@pytest.fixture
def size_evaluations(monkeypatch):
    """How many times a symbolic size is evaluated: ir.dims.evaluate wherever a module imported
    it, and Sym.value (what evaluate and every other evaluation of a Sym go through)."""
    count = [0]
    evaluate, value = dims.evaluate, dims.Sym.value

    def counting_evaluate(d, bindings):
        count[0] += 1
        return evaluate(d, bindings)

    def counting_value(self, bindings):
        count[0] += 1
        return value(self, bindings)
    for name, module in list(sys.modules.items()):
        if name.startswith("opforge") and getattr(module, "evaluate", None) is evaluate:
            monkeypatch.setattr(module, "evaluate", counting_evaluate)
    monkeypatch.setattr(dims.Sym, "value", counting_value)
    return count


def reference(op, args, sizes):
    return run_graph(op.graph, dict(zip([p.name for p in op.graph.params], args)), sizes, check=True)


# -- buffers only for the chosen alternative -------------------------------------------------------
def test_a_call_allocates_only_the_chosen_alternatives_buffers(allocations):
    op = compiled(LINEAR, "host_alloc").lin
    kinds = {name: b.kind for name, b in op.plan.buffers.items()}
    assert sorted(kinds.values()) == ["input", "input", "output", "scratch"]   # split-K's partials
    # M=33: the plain GEMM; the split-K partials are not allocated (they were, before)
    x, w = torch.randn(33, 70), torch.randn(40, 70)
    torch.testing.assert_close(op(x, w), x @ w.T, rtol=1e-4, atol=1e-4)
    assert allocations == [((33, 40), torch.float32, False)]
    # M=3, K=1030: split-K; its partials and the output
    allocations.clear()
    x, w = torch.randn(3, 1030), torch.randn(40, 1030)
    torch.testing.assert_close(op(x, w), x @ w.T, rtol=1e-4, atol=1e-4)
    assert sorted(allocations) == sorted([((1, 16, 3, 40), torch.float32, False), ((3, 40), torch.float32, False)])
    # and a repeated call allocates the same, nothing more
    allocations.clear()
    op(x, w)
    assert len(allocations) == 2


def test_the_record_allocates_the_chosen_buffers_of_llama_block_at_full_size():
    """B=2, S=2048 of Llama-7B: what one call allocates, counted from its record (built from
    meta tensors, so nothing is allocated or run), against all of the plan's buffers."""
    op = compiled(str(EXAMPLES / "llama.opf"), "host_llama", ops=["llama_block"]).llama_block
    sizes = dict(B=2, S=2048, D=4096, H=32, E=128, F=11008)
    shapes = {"x": (2, 2048, 4096), "attn_norm": (4096,), "mlp_norm": (4096,), "cos": (2048, 128),
              "sin": (2048, 128), "wg": (11008, 4096), "wu": (11008, 4096), "wd": (4096, 11008)}
    values = {p.name: torch.empty(shapes.get(p.name, (4096, 4096)), dtype=torch.float16, device="meta")
              for p in op.graph.params}
    rec = op.runner.record(values, sizes, torch.device("meta"))

    def nbytes(shape, dtype):
        n = dtype.itemsize
        for d in shape:
            n *= d
        return n
    allocated = sum(nbytes(shape, dtype) for shape, dtype, _, _ in rec.allocs)
    every = sum(nbytes([dims.evaluate(d, sizes) for d in b.shape], torch.float16 if str(b.dtype) == "f16"
                       else torch.float32) for b in op.plan.buffers.values() if b.kind != "input")
    assert allocated < every
    print(f"llama_block B=2 S=2048: a call allocates {allocated / 1e9:.2f} GB; all plan buffers {every / 1e9:.2f} GB")
    # every allocated buffer is one a chosen kernel reads or writes, or an output
    used = {p.buffer for c in rec.calls for k in op.plan.kernels if k.name == c.name for p in k.params
            if p.kind == "ptr"}
    assert len(rec.allocs) <= len(used | set(op.plan.outputs))


# -- the launch record cache ------------------------------------------------------------------------
def test_a_second_call_with_the_same_sizes_evaluates_no_size(size_evaluations):
    op = compiled(NORM, "host_cache").norm
    runner = op.runner
    a = random_inputs(op.graph, {"M": 5, "D": 33}, seed=0)
    b = random_inputs(op.graph, {"M": 7, "D": 33}, seed=1)
    runner.records.clear()
    first = op(*call_args(op.graph, a))
    assert size_evaluations[0] > 0 and len(runner.records) == 1
    size_evaluations[0] = 0
    again = op(*call_args(op.graph, a))
    assert size_evaluations[0] == 0, "a repeated call evaluated symbolic sizes"
    torch.testing.assert_close(first, again)
    check_outputs(op.graph, again, reference(op, call_args(op.graph, a), {"M": 5, "D": 33}))
    # other sizes: a new record, built with evaluation, and right
    out = op(*call_args(op.graph, b))
    assert size_evaluations[0] > 0 and len(runner.records) == 2
    check_outputs(op.graph, out, reference(op, call_args(op.graph, b), {"M": 7, "D": 33}))
    # back to the first sizes: its record again
    size_evaluations[0] = 0
    op(*call_args(op.graph, a))
    assert size_evaluations[0] == 0 and len(runner.records) == 2


def test_records_are_keyed_by_strides_dtypes_and_scalars(size_evaluations):
    op = compiled(NORM, "host_keys").norm
    op.runner.records.clear()
    x, w = torch.randn(6, 9), torch.randn(9)
    op(x, w)
    # a transposed view of the same shape: other strides, another record, right results
    xt = torch.randn(9, 6).T
    size_evaluations[0] = 0
    out = op(xt, w)
    assert size_evaluations[0] > 0 and len(op.runner.records) == 2
    check_outputs(op.graph, out, reference(op, [xt, w, 1e-5], {"M": 6, "D": 9}))
    # another eps: another record (host scalars are part of it)
    out = op(x, w, 0.5)
    assert len(op.runner.records) == 3
    check_outputs(op.graph, out, reference(op, [x, w, 0.5], {"M": 6, "D": 9}))
    # a wrong dtype is still an error at the first call of that key, and after it
    with pytest.raises(opforge.CallError, match="expects dtype f32"):
        op(x.double(), w)
    with pytest.raises(opforge.CallError, match="expects dtype f32"):
        op(x.double(), w)


def test_the_index64_switch_is_part_of_the_key(monkeypatch):
    op = compiled(NORM, "host_i64").norm
    op.runner.records.clear()
    x, w = torch.randn(4, 8), torch.randn(8)
    op(x, w)
    monkeypatch.setenv("OPFORGE_INDEX64", "1")
    out = op(x, w)
    recs = list(op.runner.records.values())
    assert [r.wide for r in recs] == [False, True]
    assert all(c.name.endswith("_i64") for c in recs[1].calls)
    check_outputs(op.graph, out, reference(op, [x, w, 1e-5], {"M": 4, "D": 8}))


def test_index_tensors_are_checked_on_every_call(monkeypatch):
    op = compiled("op emb(tab: f32[V, D], ids: i64[T]) -> f32[T, D] { return tab[ids] }", "host_ids").emb
    tab = torch.randn(10, 4)
    good, bad = torch.tensor([0, 9, 3]), torch.tensor([0, 10, 3])
    torch.testing.assert_close(op(tab, good), tab[good])
    with pytest.raises(opforge.CallError, match=r"'ids' holds row ids in \[0, 10\); found 10"):
        op(tab, bad)                                 # same key as the good call: checked again
    monkeypatch.setenv("OPFORGE_CHECK_INDICES", "0")
    op(tab, torch.tensor([0, 1, 2]))                  # skipped (no host synchronisation)


def test_the_replay_is_straight_line_code_after_the_first_call():
    op = compiled(NORM, "host_replay").norm
    op.runner.records.clear()
    x, w = torch.randn(3, 5), torch.randn(5)
    op(x, w)
    (rec,) = op.runner.records.values()
    assert rec.source == ""                           # the first call ran the generic loop
    op(x, w)
    assert "def replay(args):" in rec.source and "launch(call0, [" in rec.source
    assert "evaluate" not in rec.source and "for " not in rec.source
    torch.testing.assert_close(op(x, w), op.run(x, w))


def test_the_launch_stub_receives_each_kernels_grid_and_arguments():
    from opforge.benchmarks.host import StubLauncher
    op = compiled(LINEAR, "host_stub").lin
    x, w = torch.randn(3, 1030), torch.randn(40, 1030)
    seen = []
    real = op.runner.launcher

    def spy(call, args):
        seen.append((call.name, call.grid, list(args)))
        real(call, args)
    op.runner.launcher = spy
    try:
        op(x, w)
        stub = StubLauncher()
        op.runner.launcher = stub
        op(x, w)
    finally:
        op.runner.launcher = real
    assert [name for name, _, _ in seen] == ["lin_k0_matmul_splitk", "lin_k0_matmul_splitk_reduce"]
    assert stub.launches == 2 and stub.last[0] == seen[-1][1]
    assert [a for a in stub.last[1] if not isinstance(a, torch.Tensor)] == \
        [a for a in seen[-1][2] if not isinstance(a, torch.Tensor)]


# -- the registration ---------------------------------------------------------------------------------
# opcheck backpropagates through the op: torch warns that it has no autograd kernel (yet)
@pytest.mark.filterwarnings("ignore:.*an autograd kernel was not registered")
def test_the_default_registration_is_a_library_op_that_passes_opcheck():
    from opforge.runtime.library import registration_mode
    assert registration_mode() == "library"
    op = compiled(NORM, "host_opcheck").norm
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(op.torch_op.default.name(), "Autograd")
    x = torch.randn(5, 7, requires_grad=True)
    res = torch.library.opcheck(op.torch_op, (x, torch.randn(7)))
    assert set(res.values()) == {"SUCCESS"}, res


def test_registration_carries_the_derived_backward():
    """The op's gradient (runtime/autograd.py) rides on the library registration: the forward
    that saves for the backward is a library op with torch.library.register_autograd, and the
    gradient it gives is torch's own for the same formula."""
    ns = unique_namespace("host_autograd")
    mod = opforge.compile(NORM, namespace=ns)
    x, w = torch.randn(4, 6, requires_grad=True), torch.randn(6, requires_grad=True)
    y = mod.norm(x, w)
    assert y.requires_grad
    torch.testing.assert_close(y.detach(), mod.norm(x.detach(), w.detach()))
    g = torch.randn(4, 6)
    y.backward(g)
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    (xr * torch.rsqrt((xr * xr).mean(-1, keepdim=True) + 1e-5) * wr).backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-4, atol=1e-5)


# -- bench --host -------------------------------------------------------------------------------------
def test_bench_host_writes_its_json(tmp_path):
    from opforge.benchmarks.host import measure
    res = measure(files=[EXAMPLES / "llama.opf"], calls=3, rounds=1)
    ops = res["ops"]
    assert {"llama.opf:rms_norm", "llama.opf:llama_block"} <= set(ops)
    assert ops["llama.opf:llama_block"]["kernels"] == 11 and ops["llama.opf:rms_norm"]["kernels"] == 1
    for r in ops.values():
        assert r["us_per_call"] > 0 and r["torch_ops_us"] > 0
    assert set(res["dispatch_us"]) == {"library", "custom_op", "triton_op", "torch.add"}
    json.dumps(res)
    # an op with a scan launches through its pieces: every piece's launches are stubbed and counted
    scans = measure(files=[EXAMPLES / "gla.opf", EXAMPLES / "gru.opf"], calls=1, rounds=1)["ops"]
    assert scans["gla.opf:gla"]["kernels"] == 1                 # the scan's one kernel (chunked at S=9)
    assert scans["gru.opf:gru"]["kernels"] == 2                 # the input GEMM, the scan's one kernel
