"""The one-kernel lowering of a scan (passes/lower_recurrence.py): the carries on chip across
all steps, and its chunked form (passes/lower_chunked_scan.py). Each example recurrence
(examples/gla.opf, mamba.opf, retnet.opf, gru.opf) through the interpreter against the
float64 reference and the step-by-step form, at lengths that are not multiples of any block, with
``reverse``, initial and final states, f16, strongly decaying gates; that a call without
gradients runs the one kernel and a call with them the steps; the kernel counts; the generated
kernel's form; and that a body the template does not take keeps the steps, saying why.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import opforge
from opforge.runtime.scan import ScanPiece

from .filecheck import filecheck
from .kernel_helpers import compiled, on_launch, run_case
from .test_scan import GLA, HGRN, gla_inputs, naive_gla

EXAMPLES = Path(opforge.__file__).resolve().parent / "examples"
FILES = {"gla": "gla", "selective_scan": "mamba", "retention": "retnet", "gru": "gru"}      # op -> examples/*.opf
SIZES = dict(B=3, H=2, E=5, F=3, D=6, N=3, I=4)


@pytest.fixture(scope="module")
def recurrent():
    """The example recurrences, each from its file, as attributes."""
    from types import SimpleNamespace
    return SimpleNamespace(**{op: getattr(opforge.compile(EXAMPLES / f"{stem}.opf", namespace=f"scan_kernel_{stem}"), op)
                              for op, stem in FILES.items()})


def scan_piece(op) -> ScanPiece:
    (p,) = [p for p in op.pieces if isinstance(p, ScanPiece)]
    return p


def kernel_source(op, name: str) -> str:
    """The generated Triton of one kernel of op."""
    src = op.stage_text("triton")
    start = src.index(f"def {name}(")
    end = src.find("@triton.jit", start)
    return src[start:end if end >= 0 else len(src)]


class StepsForbidden:
    """Stands in for a scan body's op: a call that should run the one kernel never steps."""
    kernel_count = 0

    def __call__(self, *a):
        raise AssertionError("the body ran step by step")


@pytest.mark.parametrize("name, S", [(name, S) for name in ("gla", "selective_scan", "retention", "gru")
                                     for S in (1, 37)] + [("gla", 200), ("gru", 200)])
def test_each_example_runs_as_one_kernel_and_matches_the_reference(recurrent, name, S, monkeypatch):
    op = getattr(recurrent, name)
    piece = scan_piece(op)
    assert piece.fused is not None, piece.why_not_fused
    monkeypatch.setattr(piece, "op", StepsForbidden())
    run_case(op, dict(SIZES, S=S), seed=S)


def test_the_one_kernel_and_the_steps_agree(recurrent, monkeypatch):
    op = recurrent.gru
    from .kernel_helpers import call_args, random_inputs
    ins = random_inputs(op.graph, dict(SIZES, S=23), seed=4)
    one = op(*call_args(op.graph, ins))
    monkeypatch.setenv("OPFORGE_SCAN_STEPS", "1")
    steps = op(*call_args(op.graph, ins))
    for a, b in zip(one, steps):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_call_that_needs_gradients_runs_the_steps(recurrent, monkeypatch):
    """The one kernel has no backward: with an argument that requires grad the steps run (and
    autograd goes through them); under no_grad the one kernel runs."""
    op = recurrent.gla
    piece = scan_piece(op)
    q, k, v, g, h0 = gla_inputs(9, E=5, F=3)
    calls = []
    real = piece.op
    monkeypatch.setattr(piece, "op", lambda *a: calls.append(1) or real(*a))
    q.requires_grad_()
    o, _ = op(q, k, v, g, h0)
    assert calls and o.requires_grad
    o.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    calls.clear()
    with torch.no_grad():
        op(q, k, v, g, h0)
    assert not calls


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_gla_kernel_with_strongly_decaying_gates(dtype, reverse):
    """Log-gates down to -20 per step, 37 steps (not a multiple of any block), h0 in, the final
    state out: nothing overflows and the result matches the float64 loop."""
    torch_dt = torch.float32 if dtype == "f32" else torch.float16
    op = compiled(GLA.format(T=dtype, rev="reverse " if reverse else ""), f"scan_k_decay_{dtype}_{reverse}").gla
    assert scan_piece(op).fused is not None
    q, k, v, g, h0 = gla_inputs(37, E=5, F=3, dtype=torch_dt, gate=(-20.0, 0.0), seed=9)
    o, h_last = op(q, k, v, g, h0)
    assert torch.isfinite(o).all() and torch.isfinite(h_last).all()
    want_o, want_h = naive_gla(q, k, v, g, h0, reverse)
    tol = dict(rtol=2e-3, atol=2e-3) if dtype == "f32" else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(o.double(), want_o, **tol)
    torch.testing.assert_close(h_last.double(), want_h, **tol)


def test_past_the_whole_extent_the_steps_run(monkeypatch):
    """A GRU's hidden size is one tile of the kernel (its weight tile square): past 128 the
    call runs the steps, and gives the same result."""
    op = compiled(GRU_SRC, "scan_k_wide").gru
    piece = scan_piece(op)
    assert [str(g) for _, g in piece.fused_forms] == ["F <= 128"]
    calls, real = [], piece.op
    monkeypatch.setattr(piece, "op", lambda *a: calls.append(1) or real(*a))
    run_case(op, dict(S=3, B=2, I=3, F=130), seed=1)
    assert len(calls) == 3                           # the body ran at each of the 3 steps
    calls.clear()
    run_case(op, dict(S=3, B=2, I=3, F=7), seed=1)
    assert not calls


def test_kernel_counts(recurrent):
    """GRU over the sequence: the hoisted input GEMM plus one; the linear recurrences: one."""
    assert recurrent.gru.kernel_count == 2
    for name in ("gla", "selective_scan", "retention"):
        assert getattr(recurrent, name).kernel_count == 1, name
    assert recurrent.gru.step_kernel_count > recurrent.gru.kernel_count


def test_the_gla_kernel_keeps_the_state_on_chip_and_tiles_heads_and_values(recurrent):
    """Grid over (heads, value columns), the key axis whole in the tile; one loop over the
    steps; per step: the slices of q, k, v and the gate loaded, the state updated in registers,
    the readout summed over the key axis and stored; the state stored once, after the loop."""
    src = kernel_source(scan_piece(recurrent.gla).fused, "gla__scan0_fused_k0_scan")
    filecheck(src, """
        CHECK: pid_0 = tl.program_id(axis=0)
        CHECK: pid_2 = tl.program_id(axis=1)
        CHECK: h = tl.load(h0_ptr
        CHECK: for i in range(0, S, 1):
        CHECK: tl.load(gate_ptr + t * stride_gate_0
        CHECK: tl.sigmoid(
        CHECK: h_next =
        CHECK: tl.sum(
        CHECK: tl.store(o_ptr + t * stride_o_0
        CHECK: h = tl.where(mask, h_next, 0.0)
        CHECK-NOT: tl.store(
        CHECK: tl.store(h_last_ptr
    """)
    assert src.count("tl.store(") == 2


def test_the_gru_kernel_contracts_the_state_with_tl_dot(recurrent):
    src = kernel_source(scan_piece(recurrent.gru).fused, "gru__scan1_fused_k0_scan")
    filecheck(src, """
        CHECK: for i in range(0, S, 1):
        CHECK: tl.load(gi_ptr + t * stride_gi_0
        CHECK: tl.dot(
        CHECK: tl.sigmoid(
        CHECK: tl.store(y_ptr + t * stride_y_0
        CHECK: h = tl.where(mask, h_next, 0.0)
    """)
    assert src.count("tl.dot(") == 3          # one per gate: h @ w_hh[gate].T


def test_explain_says_how_each_scan_runs(recurrent):
    text = recurrent.gru.explain()
    assert "without gradients: one kernel for all steps (gru__scan1_fused):\n" \
           "    gru__scan1_fused_k0_scan while F <= 128: step after step, the carries on chip" in text
    assert "with gradients, with OPFORGE_SCAN_STEPS=1 or past those sizes: step by step" in text
    text = recurrent.gla.explain()
    assert "gla__scan0_fused_k0_scan while S <= 8 and E <= 256: step after step" in text
    assert "gla__scan0_fused_k0_scan_chunked while E <= 256: in chunks of BLOCK_C steps" in text
    text = recurrent.retention.explain()
    assert "no chunked form (the decay is not written as exp(...) or sigmoid(...)" in text


GRU_SRC = (EXAMPLES / "gru.opf").read_text()

LEAD_MIX = """
op f(x: f32[S, H]) -> f32[S, H] {
    y = scan t in S with c: f32[H] = 0.0 {
        cn = c * 0.5 + x[t] + sum(c, axis=0)
        return cn, cn
    }
    return y
}"""


def test_a_body_that_mixes_the_leading_axis_keeps_the_steps_and_says_why():
    op = compiled(LEAD_MIX, "scan_k_leadmix").f
    piece = scan_piece(op)
    assert piece.fused is None and "mixes the rows" in piece.why_not_fused
    assert "no one-kernel form:" in op.explain() and "mixes the rows" in op.explain()
    assert op.kernel_count == op.step_kernel_count
    run_case(op, dict(S=7, H=5), seed=2)


def test_an_elementwise_recurrence_tiles_both_axes():
    op = compiled(HGRN, "scan_k_hgrn").hgrn
    src = scan_piece(op).fused.stage_text("triton")
    assert "tl.program_id(axis=1)" in src and "tl.sum" not in src
    run_case(op, dict(S=45, B=3, D=37), seed=6)


def launched(op, call) -> list:
    """The kernels a call of a CompiledOp launches, by name."""
    names: list = []
    with on_launch(op, lambda kc: names.append(kc.name)):
        call()
    return names


@pytest.mark.parametrize("S, form", [(5, "gla__scan0_fused_k0_scan"), (37, "gla__scan0_fused_k0_scan_chunked")])
def test_gla_runs_sequentially_for_a_few_steps_and_in_chunks_beyond(recurrent, S, form):
    op = recurrent.gla
    fused = scan_piece(op).fused
    from .kernel_helpers import call_args, random_inputs
    ins = random_inputs(op.graph, dict(SIZES, S=S), seed=S)
    assert launched(fused, lambda: op(*call_args(op.graph, ins))) == [form]
    run_case(op, dict(SIZES, S=S), seed=S)


def test_the_chunked_kernel_keeps_the_state_on_chip_and_takes_exponents_within_the_chunk(recurrent):
    src = kernel_source(scan_piece(recurrent.gla).fused, "gla__scan0_fused_k0_scan_chunked")
    filecheck(src, """
        CHECK: state = tl.load(h0_ptr
        CHECK: for c0 in range(0, S, BLOCK_C):
        CHECK: for e0 in range(0, E, BLOCK_EI):
        CHECK: tl.cumsum(
        CHECK: tl.exp(tl.where(causal3,
        CHECK: G = tl.cumsum(log_a, axis=0)
        CHECK: inter = tl.dot(q * tl.exp(G), state
        CHECK: o = tl.dot(A2, v, inter
        CHECK: tl.store(o_ptr
        CHECK: G_last = tl.sum(log_a, axis=0, keep_dims=True)
        CHECK: state = state * tl.trans(tl.exp(G_last)) + tl.dot(tl.trans(k * tl.exp(G_last - G)), v
        CHECK-NOT: tl.store(
        CHECK: tl.store(h_last_ptr
    """)
    assert src.count("tl.store(") == 2 and src.count("tl.dot(") == 3


@pytest.mark.parametrize("gate", [(-20.0, 0.0), (-1000.0, 0.0), (-0.01, 0.0)], ids=["to_-20", "to_-1000", "mild"])
@pytest.mark.parametrize("S", [16, 53])
def test_chunked_gla_at_any_gate_magnitude(S, gate):
    """Log-gates down to -20 and -1000 per step (the decay underflows to zero) and mild ones, a
    length that is a multiple of the chunk and one that is not: finite, and the float64 loop's
    result."""
    op = compiled(GLA.format(T="f32", rev=""), "scan_k_gates").gla
    q, k, v, g, h0 = gla_inputs(S, E=5, F=3, gate=gate, seed=S)
    o, h_last = op(q, k, v, g, h0)
    assert torch.isfinite(o).all() and torch.isfinite(h_last).all()
    want_o, want_h = naive_gla(q, k, v, g, h0)
    torch.testing.assert_close(o.double(), want_o, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(h_last.double(), want_h, rtol=2e-4, atol=2e-4)


def test_the_cookbook_gla_layer_runs_in_chunks():
    """A batch and a head axis before the state's: one program per (batch, head, column tile)."""
    from .test_cookbook import BLOCKS
    (src,) = [b for b in BLOCKS if "op gla_layer" in b]
    op = compiled(src, "scan_k_cookbook").gla_layer
    forms = [k.name for k, _ in scan_piece(op).fused_forms]
    assert forms[-1].endswith("_chunked")
    run_case(op, dict(S=21, B=2, H=2, E=5, F=17), seed=3)


def test_sizes_are_bound_once_per_shape_and_checked_for_every_new_one(recurrent):
    """A call's sizes are kept by its arguments' shapes: another shape is bound (and checked)
    again, so a call whose shapes disagree is an error even after good calls."""
    from opforge.runtime.binding import CallError
    op = recurrent.gla
    for S in (5, 11, 5):
        q, k, v, g, h0 = gla_inputs(S, E=5, F=3)
        o, h_last = op(q, k, v, g, h0)
        want_o, want_h = naive_gla(q, k, v, torch.nn.functional.logsigmoid(g), h0)
        torch.testing.assert_close(o.double(), want_o, rtol=1e-4, atol=1e-4)
    q, k, v, g, h0 = gla_inputs(5, E=5, F=3)
    with pytest.raises(CallError, match="gate"):
        op(q, k, v, g[:4], h0)


LSTM = """
op lstm(x: f32[S, B, I], h0: f32[B, F], c0: f32[B, F], w_ih: f32[4 * F, I], w_hh: f32[4 * F, F], b_ih: f32[4 * F], b_hh: f32[4 * F]) -> (f32[S, B, F], f32[B, F], f32[B, F]) {
    y, h_last, c_last = scan t in S with h = h0, c = c0 {
        g = x[t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh
        i = sigmoid(g[:, :F])
        f = sigmoid(g[:, F:2 * F])
        n = tanh(g[:, 2 * F:3 * F])
        o = sigmoid(g[:, 3 * F:])
        c_next = f * c + i * n
        h_next = o * tanh(c_next)
        return h_next, c_next, h_next
    }
    return y, h_last, c_last
}"""


@pytest.mark.parametrize("S", [1, 37])
def test_lstm_with_two_carries_matches_torch_nn_lstm(S):
    """Two carries (h, c) of one shape, the gates from h @ w_hh.T sliced four ways: one kernel
    without gradients, torch.nn.LSTM's outputs and final states; with gradients, its gradients."""
    op = compiled(LSTM, "scan_k_lstm").lstm
    assert scan_piece(op).fused is not None and op.kernel_count == 2
    B, I, F = 3, 5, 7
    torch.manual_seed(S)
    lstm = torch.nn.LSTM(I, F)
    x, h0, c0 = torch.randn(S, B, I), torch.randn(1, B, F), torch.randn(1, B, F)
    ws = [lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0]
    with torch.no_grad():
        want, (want_h, want_c) = lstm(x, (h0, c0))
        y, h_last, c_last = op(x, h0[0], c0[0], *ws)
    for got, exp in ((y, want), (h_last, want_h[0]), (c_last, want_c[0])):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)
    mine = [w.detach().clone().requires_grad_() for w in ws]
    y, h_last, c_last = op(x, h0[0], c0[0], *mine)
    want, (want_h, want_c) = lstm(x, (h0, c0))
    cy = torch.randn_like(y)
    torch.autograd.backward([want], [cy])
    torch.autograd.backward([y], [cy])
    for w, m in zip(ws, mine):
        torch.testing.assert_close(m.grad, w.grad, rtol=1e-4, atol=1e-4)


# -- found by review: each of these once gave a wrong number, a crash or a NaN ------------------
CONCAT_OF_A_SUM = """
op g(x: f32[S, B, 1, 4], y: f32[S, B, 1, 3], h0: f32[B, 3, 4]) -> (f32[S, B, 3, 4], f32[B, 3, 4]) {
    o, hl = scan t in S with h = h0 {
        c = concat(sum(x[t], axis=2)[:, :, None], y[t], axis=2)
        h_next = h * 0.5 + c
        return h_next, h_next
    }
    return o, hl
}"""

GATE_OF_A_SUM = """
op g(x: f32[S, B, M], u: f32[S, B, N], h0: f32[B, N]) -> (f32[S, B, N], f32[B, N]) {
    o, hl = scan t in S with h = h0 {
        h_next = h * sigmoid(sum(x[t], axis=1))[:, None] + u[t]
        return h_next, h_next
    }
    return o, hl
}"""

SCALAR_OF_THE_STEP = """
op g(x: f32[S, B, N], h0: f32[B, N]) -> (f32[S, B, N], f32[B, N]) {
    y, hl = scan t in S with h = h0 {
        h_next = h * 0.5 + x[t] * cast(t + 1, f32)
        return h_next, h_next
    }
    return y, hl
}"""


@pytest.mark.parametrize("src, sizes", [(CONCAT_OF_A_SUM, dict(S=3, B=2)), (GATE_OF_A_SUM, dict(S=9, B=3, M=5, N=7)),
                                        (SCALAR_OF_THE_STEP, dict(S=6, B=2, N=3))],
                         ids=["concat_of_a_sum", "gate_of_a_sum", "scalar_of_the_step"])
def test_reductions_inside_other_glue_and_scalars_of_the_step(src, sizes, monkeypatch):
    """A reduction whose caller's mask runs along the reduced axis (a concat's branch, a
    broadcast read) sums every lane; a scalar the body computes from the step index is computed
    in the kernel. All in the one kernel, against the reference."""
    op = compiled(src, "scan_k_review").g
    piece = scan_piece(op)
    assert piece.fused is not None, piece.why_not_fused
    monkeypatch.setattr(piece, "op", StepsForbidden())
    run_case(op, sizes, seed=1)


def test_torch_compile_with_dynamic_shapes(recurrent):
    op = recurrent.gla
    q, k, v, g, h0 = gla_inputs(9, E=5, F=3)
    want = op(q, k, v, g, h0)
    got = torch.compile(lambda *a: op(*a), dynamic=True, backend="aot_eager")(q, k, v, g, h0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_chunked_gla_with_a_reset_and_with_mixed_gates():
    """A log-decay of -inf (a reset: exp(-inf) = 0) and decays of -1000 between mild ones of
    -0.01: finite, and the steps' result (each step's log-decay counts from -30 at least in
    the chunked form: a factor of 9e-14 in place of 0)."""
    op = compiled(GLA.format(T="f32", rev=""), "scan_k_reset").gla
    q, k, v, g, h0 = gla_inputs(64, E=5, F=3, gate=(-0.01, 0.0), seed=2)
    g[10] = float("-inf")
    g[20:28] = -1000.0
    g[40:48] = -1000.0
    o, h_last = op(q, k, v, g, h0)
    assert torch.isfinite(o).all() and torch.isfinite(h_last).all()
    want_o, want_h = naive_gla(q, k, v, g, h0)
    torch.testing.assert_close(o.double(), want_o, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h_last.double(), want_h, rtol=1e-4, atol=1e-4)
