"""bf16 under Triton's interpreter (issue 13, item 1): opforge's corrections
(runtime/interpreter_patches.py) and the refusals where bf16 cannot be right.

The interpreter keeps bf16 as uint16 bit patterns and, uncorrected, computes on the integers
(a bf16 dot is off by about 1e10). The example ops and the built-ins in bf16 are run against the
reference in test_kernels_examples.py and test_kernels_builtins.py, the bf16 layouts in
test_layouts_kernels.py; here are the conversions bit by bit, small hand-written Triton kernels
for what opforge's own kernels do not reach (they widen bf16 to f32 before arithmetic and
reductions, so bf16 adds, maxima, sums, scans and atomics are only met here), and the errors.
Each kernel's expected values come from torch's bf16 on the CPU (which rounds to nearest even
from f32, as a GPU does), or exactly from f32 for the dot.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import opforge
from opforge.runtime import interpreter_patches as ip
from opforge.runtime.device import interpreting, kernel_device

from .kernel_helpers import compile_spec

interpreting()          # before triton.jit below: the interpreter and its corrections
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

BF16 = torch.bfloat16
DEV = kernel_device()
on_interpreter = pytest.mark.skipif(not interpreting(), reason="the interpreter's corrections")


def bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16).cpu().numpy().view(np.uint16)


def randn(*shape, seed=0, scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(BF16)


# -- conversions, bit by bit ----------------------------------------------------------------------
def test_f32_to_bf16_rounds_to_nearest_even_as_torch_does():
    rng = np.random.default_rng(0)
    patterns = np.concatenate([
        rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32),
        # ties (the low half exactly 0x8000) with an even and an odd upper half, and around them
        (rng.integers(0, 2 ** 16, 5000, dtype=np.uint64).astype(np.uint32) << 16) | np.uint32(0x8000),
        (rng.integers(0, 2 ** 16, 5000, dtype=np.uint64).astype(np.uint32) << 16) | np.uint32(0x7FFF),
        np.array([0, 0x80000000, 0x00000001, 0x007FFFFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000,
                  0xFF800000, 0x3FFFFFFF, 0x3F808000, 0x3F818000], dtype=np.uint32),
    ])
    x = patterns.view(np.float32)
    got = ip.f32_to_bf16(x)
    want = bits(torch.from_numpy(x.copy()).to(BF16))
    nan = np.isnan(x)
    assert np.isnan(ip.bf16_to_f32(got[nan])).all()
    assert np.array_equal(got[~nan], want[~nan])
    assert np.array_equal(ip.bf16_to_f32(got[~nan]), torch.from_numpy(x[~nan].copy()).to(BF16).float().numpy())


def test_f64_and_integers_round_to_bf16_once():
    # 1 + 2^-8 is halfway between the bf16 neighbours 1 and 1 + 2^-7; a little above it must round
    # up, though f32 (rounding first) lands on the tie and then on the even 1.0
    up, down = 1 + 2 ** -8 + 2 ** -40, 1 + 2 ** -8 - 2 ** -40
    assert list(ip.to_bf16(np.array([up, down, -up, 2 ** -140, 1e300, -1e300]))) == \
        [0x3F81, 0x3F80, 0xBF81, 0x0000, 0x7F80, 0xFF80]
    # 2^24 + 2^16 + 1: above the tie 2^24 + 2^16, so up to 2^24 + 2^17 (0x4B81); f32 makes the tie
    ints = np.array([3, -2, 0, 16842753, 16842752, 2 ** 31 - 1], dtype=np.int32)
    assert list(ip.to_bf16(ints)) == [0x4040, 0xC000, 0x0000, 0x4B81, 0x4B80, 0x4F00]
    assert list(ip.to_bf16(np.array([True, False]))) == [0x3F80, 0x0000]


# -- hand-written kernels --------------------------------------------------------------------------
@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    rm = tl.arange(0, M)[:, None]
    rn = tl.arange(0, N)[None, :]
    rk = tl.arange(0, K)
    a = tl.load(a_ptr + rm * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn)
    acc = tl.zeros((M, N), dtype=tl.float32)
    acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm * N + rn, acc)


def test_a_bf16_dot_takes_the_operands_exactly_and_accumulates_in_f32():
    a, b = randn(16, 64, seed=1), randn(64, 32, seed=2)
    c = torch.empty(16, 32, device=DEV)
    _dot_kernel[(1,)](a.to(DEV), b.to(DEV), c, 16, 32, 64)
    want = a.double() @ b.double()
    torch.testing.assert_close(c.cpu().double(), want, rtol=1e-5, atol=1e-5)


@triton.jit
def _elementwise_kernel(x_ptr, y_ptr, i_ptr, h_ptr, out_ptr, cmp_ptr, f32_ptr, int_ptr, N: tl.constexpr):
    r = tl.arange(0, N)
    x = tl.load(x_ptr + r)
    y = tl.load(y_ptr + r)
    # bf16 arithmetic kept in bf16 (no widening here, unlike opforge's kernels)
    tl.store(out_ptr + 0 * N + r, x + y)
    tl.store(out_ptr + 1 * N + r, x * y)
    tl.store(out_ptr + 2 * N + r, x - y)
    tl.store(out_ptr + 3 * N + r, tl.maximum(x, y))
    tl.store(out_ptr + 4 * N + r, tl.minimum(x, y))
    tl.store(out_ptr + 5 * N + r, tl.where(x > 0, x, tl.full((N,), 0.3, tl.bfloat16)))
    tl.store(out_ptr + 6 * N + r, -x)
    tl.store(out_ptr + 7 * N + r, tl.load(i_ptr + r).to(tl.bfloat16))
    tl.store(out_ptr + 8 * N + r, tl.load(h_ptr + r).to(tl.bfloat16))
    tl.store(out_ptr + 9 * N + r, (x.to(tl.float32) * 1.0001).to(tl.bfloat16))
    tl.store(cmp_ptr + 0 * N + r, x < y)
    tl.store(cmp_ptr + 1 * N + r, x >= y)
    tl.store(cmp_ptr + 2 * N + r, x == y)
    tl.store(f32_ptr + r, x.to(tl.float32))
    tl.store(int_ptr + r, (x * 8).to(tl.int32))


def test_bf16_arithmetic_comparisons_selects_and_casts_match_torch():
    n = 64
    x, y = randn(n, seed=3, scale=3), randn(n, seed=4, scale=3)
    y[::5] = x[::5]                                    # some equal pairs for == and >=
    ints = torch.arange(-32, 32, dtype=torch.int32) * 1234567
    halves = (torch.randn(n, generator=torch.Generator().manual_seed(5)) * 1000).half()
    out = torch.empty(10, n, dtype=BF16, device=DEV)
    cmp = torch.empty(3, n, dtype=torch.bool, device=DEV)
    f32 = torch.empty(n, device=DEV)
    i32 = torch.empty(n, dtype=torch.int32, device=DEV)
    _elementwise_kernel[(1,)](x.to(DEV), y.to(DEV), ints.to(DEV), halves.to(DEV), out, cmp, f32, i32, n)
    out = out.cpu()
    exact = [x + y, x * y, x - y, torch.maximum(x, y), torch.minimum(x, y),
             torch.where(x > 0, x, torch.tensor(0.3, dtype=BF16)), -x, ints.to(BF16), halves.to(BF16),
             (x.float() * 1.0001).to(BF16)]
    for i, want in enumerate(exact):
        assert np.array_equal(bits(out[i]), bits(want)), (i, out[i], want)
    assert torch.equal(cmp.cpu(), torch.stack([x < y, x >= y, x == y]))
    assert torch.equal(f32.cpu(), x.float())
    assert torch.equal(i32.cpu(), (x * 8).to(torch.int32))


@triton.jit
def _reduce_kernel(x_ptr, max_ptr, min_ptr, arg_ptr, sum_ptr, cum_ptr, M: tl.constexpr, N: tl.constexpr):
    rm = tl.arange(0, M)
    rn = tl.arange(0, N)
    x = tl.load(x_ptr + rm[:, None] * N + rn[None, :])
    tl.store(max_ptr + rm, tl.max(x, axis=1))
    tl.store(min_ptr + rm, tl.min(x, axis=1))
    tl.store(arg_ptr + rm, tl.argmax(x, axis=1))
    tl.store(sum_ptr + rm, tl.sum(x, axis=1))
    tl.store(cum_ptr + rm[:, None] * N + rn[None, :], tl.cumsum(x, axis=1))


def test_bf16_reductions_and_scans_reduce_the_values():
    m, n = 8, 16
    x = randn(m, n, seed=6)
    outs = [torch.empty(m, dtype=BF16, device=DEV) for _ in range(2)]
    arg = torch.empty(m, dtype=torch.int32, device=DEV)
    s = torch.empty(m, dtype=BF16, device=DEV)
    cum = torch.empty(m, n, dtype=BF16, device=DEV)
    _reduce_kernel[(1,)](x.to(DEV), *outs, arg, s, cum, m, n)
    assert torch.equal(outs[0].cpu(), x.max(dim=1).values)
    assert torch.equal(outs[1].cpu(), x.min(dim=1).values)
    assert torch.equal(arg.cpu().long(), x.argmax(dim=1))
    # the order and width of the additions differ between devices: within bf16 rounding
    torch.testing.assert_close(s.cpu().float(), x.float().sum(1), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(cum.cpu().float(), x.float().cumsum(1), rtol=2e-2, atol=3e-2)


@triton.jit
def _atomic_kernel(out_ptr, N: tl.constexpr, SLOTS: tl.constexpr):
    r = tl.arange(0, N)
    val = (r % 3 + 1).to(tl.float32).to(tl.bfloat16)      # 1, 2, 3, 1, 2, 3, ...
    tl.atomic_add(out_ptr + r % SLOTS, val)                 # lanes of one call share addresses


@pytest.mark.parametrize("slots", [4, 16], ids=["shared-addresses", "distinct-addresses"])
def test_bf16_atomic_add_adds_every_lane_of_every_program(slots):
    out = torch.full((slots,), 0.5, dtype=BF16, device=DEV)
    _atomic_kernel[(3,)](out, 16, slots)
    lanes = torch.arange(16)
    want = torch.zeros(slots).index_add_(0, lanes % slots, (lanes % 3 + 1).float()) * 3 + 0.5
    assert torch.equal(out.cpu().float(), want)


# -- refusals ---------------------------------------------------------------------------------------
MATMUL = "op mm(a: bf16[M, K], b: bf16[K, N]) -> bf16[M, N] { return a @ b }\n"
MATMUL_F16 = "op mm(a: f16[M, K], b: f16[K, N]) -> f16[M, N] { return a @ b }\n"


@on_interpreter
def test_the_corrections_are_installed_and_pass_their_self_check():
    from triton.runtime import interpreter as itp
    assert ip.bf16_problem() is None
    assert "interpreter_patches" in (itp.InterpreterBuilder.create_dot.__doc__ or "")
    assert ip._self_check() is None


@on_interpreter
def test_the_self_check_finds_an_uncorrected_dot(monkeypatch):
    from triton.runtime import interpreter as itp

    def raw_dot(self, a, b, d, input_precision, max_num_imprecise_acc):   # the interpreter's own
        return itp.TensorHandle(np.matmul(a.data, b.data, dtype=d.data.dtype) + d.data, d.dtype.scalar)
    monkeypatch.setattr(itp.InterpreterBuilder, "create_dot", raw_dot)
    problem = ip._self_check()
    assert problem is not None and "dot" in problem


@on_interpreter
def test_a_bf16_op_refuses_to_run_without_the_corrections(monkeypatch):
    mod = compile_spec(MATMUL, "bf16_refuse")
    mod16 = compile_spec(MATMUL_F16, "f16_runs")
    monkeypatch.setitem(ip._state, "problem", "the corrections do not fit Triton 9.9's interpreter")
    a, b = randn(3, 5, seed=7), randn(5, 2, seed=8)
    with pytest.raises(opforge.CallError, match=r"mm\(\): bf16 cannot run correctly on the CPU here: "
                                               r"the corrections do not fit Triton 9\.9's interpreter"):
        mod.mm(a, b)
    torch.testing.assert_close(mod16.mm(a.half(), b.half()).float(), (a.float() @ b.float()), rtol=1e-2, atol=1e-2)


@on_interpreter
def test_a_bf16_operation_the_corrections_do_not_cover_is_a_call_error(monkeypatch):
    """What the corrections neither fix nor know to be exact raises InterpreterBf16Error inside
    the kernel; the executor turns it into a CallError that names the kernel."""
    from triton.runtime import interpreter as itp

    def uncovered(self, *args):
        raise ip.InterpreterBf16Error("Triton's interpreter has no correct create_dot for bf16")
    mod = compile_spec(MATMUL, "bf16_uncovered")
    monkeypatch.setattr(itp.InterpreterBuilder, "create_dot", uncovered)
    with pytest.raises(opforge.CallError, match=r"^mm_k0\w*: Triton's interpreter has no correct create_dot for "
                                               r"bf16; bf16 cannot run correctly on the CPU here"):
        mod.mm(randn(3, 5), randn(5, 2))


@triton.jit
def _print_kernel(x_ptr, N: tl.constexpr):
    tl.device_print("x", tl.load(x_ptr + tl.arange(0, N)))


@on_interpreter
def test_unverified_builder_operations_raise_on_bf16_and_not_on_f16():
    with pytest.raises(Exception) as info:
        _print_kernel[(1,)](randn(4), 4)
    cause = ip.interpreter_cause(info.value)
    assert cause is not None and "create_print" in str(cause)
    _print_kernel[(1,)](torch.ones(4, dtype=torch.float16), 4)


# -- a bf16 layer whose layout @auto chooses --------------------------------------------------------
def test_auto_layout_of_a_bf16_weight_is_measured_and_within_tolerance():
    from opforge.runtime.reference import run_graph
    from opforge.runtime.tolerances import assert_close, tolerance_for
    src = ("op f(x: bf16[M, K], w: bf16[N, K] @auto(tol=0.05)) -> bf16[M, N] {\n"
           "    return x @ w.T\n}\n")
    mod = compile_spec(src, "bf16_auto")
    w = randn(24, 64, seed=9)
    layer = mod.f.bind(w=w)
    assert "dense" in "\n".join(layer.report["w"])
    x = randn(5, 64, seed=10)
    ref = run_graph(mod.f.graph, {"x": x, **layer.unpacked()}, {"M": 5, "K": 64, "N": 24}, check=True)[0]
    assert_close(layer(x), ref, tolerance_for(mod.f.graph, layouts=layer.layouts), "bf16 @auto")


@triton.jit
def _compare_cast_kernel(x_ptr, f_ptr, b_ptr, i_ptr, N: tl.constexpr):
    r = tl.arange(0, N)
    m = tl.load(x_ptr + r) != 0
    tl.store(f_ptr + r, m.to(tl.float32))
    tl.store(b_ptr + r, m.to(tl.bfloat16))
    tl.store(i_ptr + r, m.to(tl.int32))


def test_a_comparison_of_bf16_values_casts_as_the_bools_it_holds():
    """A comparison's handle keeps its bf16 operands' dtype over bool data: casting it (to f32,
    bf16 or an integer) casts the bools (the campaign's seeds 7574 and 7760 crashed here)."""
    n = 64
    x = randn(n, seed=6)
    x[::3] = 0
    f, b, i = (torch.empty(n, dtype=d, device=DEV) for d in (torch.float32, BF16, torch.int32))
    _compare_cast_kernel[(1,)](x.to(DEV), f, b, i, n)
    want = x != 0
    assert torch.equal(f.cpu(), want.float()) and torch.equal(b.cpu(), want.to(BF16))
    assert torch.equal(i.cpu(), want.int())
