"""Recurrences: ``scan`` (issue 15, first part): the front end's diagnostics, the IR text, the
reference executor against independent step-by-step loops and torch.nn.GRU, the compiled op
(its pieces and the steps, runtime/scan.py) through the interpreter against the reference at
lengths 1, 37 and 200, with ``reverse``, initial and final states, f32 and f16, strongly
decaying gates, gradients, torch.compile, and the class explain() gives each recurrence.
"""
from __future__ import annotations

import pytest
import torch

import opforge
from opforge.frontend.diagnostics import SpecError
from opforge.ir.printer import print_graph
from opforge.runtime.reference import run_graph

from .filecheck import filecheck
from .kernel_helpers import compiled, run_case

# -- the front end --------------------------------------------------------------------------------
HEAD = "op f(x: f32[S, H], h0: f32[H]) -> f32[S, H] {\n"
ERRORS = [
    ("next_value_changes_type", HEAD + "    y = scan t in S with h = h0 {\n        return h[0:1], h\n    }\n    return y\n}",
     "the next value of the carry 'h' is f32[1], but the carry is f32[H]", (3, 16)),
    ("too_few_values", "op f(x: f32[S, H], h0: f32[H]) -> f32[S, H] {\n    y = scan t in S with h = h0, c = h0 {\n"
     "        return h + x[t]\n    }\n    return y\n}", "the body returns 1 value, but the scan has 2 carries", (3, 9)),
    ("body_name_outside", HEAD + "    y = scan t in S with h = h0 {\n        hn = h + x[t]\n        return hn, hn\n    }\n"
     "    return hn\n}", "'hn' is defined in the body of a scan (line 3)", (6, 12)),
    ("nested", HEAD + "    y = scan t in S with h = h0 {\n        z = scan u in S with g = h {\n            return g, g\n"
     "        }\n        return h, h\n    }\n    return y\n}", "a scan inside the body of a scan is not supported", (3, 13)),
    ("index_as_bound", HEAD + "    y = scan t in S with h = h0 {\n        return h + sum(x[:t], axis=0), h\n    }\n    return y\n}",
     "the step index 't' is a value, not a size", (3, 27)),
    ("wrong_axis_size", "op f(x: f32[T, H], h0: f32[H], s: f32[S]) -> f32[S, H] {\n    y = scan t in S with h = h0 {\n"
     "        return h + x[t], h\n    }\n    return y\n}", "indexes an axis of size T, but the scan runs over S", (3, 22)),
    ("scalar_carry_untyped", HEAD + "    y = scan t in S with h = 0.0 {\n        return h + x[t], h\n    }\n    return y\n}",
     "the carry 'h' starts from a scalar: give its type", (2, 26)),
    ("names_on_the_left", HEAD + "    a, b, c = scan t in S with h = h0 {\n        return h + x[t], h\n    }\n    return a\n}",
     "the scan gives 1 output and 1 final carry, but 3 names are assigned", (2, 15)),
    ("not_reverse", HEAD + "    y = scan t in S backwards with h = h0 {\n        return h + x[t], h\n    }\n    return y\n}",
     "expected 'reverse' or 'with' after the scan's length, got 'backwards'", (2, 21)),
    ("slice_of_a_body_value", HEAD + "    y = scan t in S with h = h0 {\n        z = x * 2.0\n        return h + z[t], h\n    }\n"
     "    return y\n}", "can index values defined before the scan", (4, 20)),
    ("carry_declared_otherwise", HEAD + "    y = scan t in S with h: f32[S] = h0 {\n        return h, h\n    }\n    return y\n}",
     "the carry 'h' is declared f32[S], but its first value is f32[H]", (2, 38)),
    ("keyword_name", "op f(x: f32[S, H]) -> f32[S, H] {\n    with = x\n    return x\n}", "", None),
]


@pytest.mark.parametrize("name, src, message, at", ERRORS, ids=[e[0] for e in ERRORS])
def test_scan_errors_point_at_the_fault(name, src, message, at):
    with pytest.raises(SpecError) as e:
        opforge.load(src)
    if message:
        assert message in e.value.message, e.value.message
    if at is not None:
        assert (e.value.span.line, e.value.span.col) == at, (e.value.span, str(e.value))
    assert e.value.hint or not message        # every scan error says what to do


IR = r"""
CHECK: op f(%x: f32[S, H], %h0: f32[H]) -> (f32[S, H], f32[H]) {
CHECK: %y: f32[S, H], %h_last: f32[H] = scan(%h0, %x) {carries=1, fills=[None], length=S, reverse=true, slice_axes=[0], uses_index=true} {
CHECK-NEXT: op f__scan_body(%t: i64, %h: f32[H], %x_t: f32[H]) -> (f32[H], f32[H]) {
CHECK: cast(%t) {dtype=f32}
CHECK: return %hn,
CHECK: return %y, %h_last
"""
DECAY = """
op f(x: f32[S, H], h0: f32[H]) -> (f32[S, H], f32[H]) {
    y, h_last = scan t in S reverse with h = h0 {
        hn = h * 0.5 + x[t] * cast(t, f32)
        return hn, hn * 2.0
    }
    return y, h_last
}"""


def test_the_scan_node_prints_its_body_as_a_region():
    filecheck(print_graph(opforge.load(DECAY).graphs["f"]), IR)


# -- the reference and the compiled op --------------------------------------------------------------
# log-space gates as in gated linear attention: h = exp(g_t) * h + k_t v_t^T, read by q_t
GLA = """
op gla(q: {T}[S, H, E], k: {T}[S, H, E], v: {T}[S, H, F], g: {T}[S, H, E], h0: {T}[H, E, F]) -> ({T}[S, H, F], {T}[H, E, F]) {{
    o, h_last = scan t in S {rev}with h = h0 {{
        h_next = exp(g[t])[:, :, None] * h + k[t][:, :, None] * v[t][:, None, :]
        return h_next, sum(q[t][:, :, None] * h_next, axis=1)
    }}
    return o, h_last
}}"""
# an elementwise gate (HGRN-like): cheap enough for 200 steps through the interpreter
HGRN = """
op hgrn(x: f32[S, B, D], f: f32[S, B, D]) -> (f32[S, B, D], f32[B, D]) {
    o, h_last = scan t in S with h: f32[B, D] = 0.0 {
        a = sigmoid(f[t])
        h_next = a * h + (1.0 - a) * x[t]
        return h_next, h_next * 2.0
    }
    return o, h_last
}"""


def naive_gla(q, k, v, g, h0, reverse=False):
    h, out = h0.double(), [None] * q.shape[0]
    for t in (reversed(range(q.shape[0])) if reverse else range(q.shape[0])):
        h = g[t].double().exp().unsqueeze(-1) * h + torch.einsum("he,hf->hef", k[t].double(), v[t].double())
        out[t] = torch.einsum("he,hef->hf", q[t].double(), h)
    return torch.stack(out), h


def gla_inputs(S, H=2, E=3, F=4, dtype=torch.float32, gate=(-1.0, 0.0), seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(S, H, E, generator=gen).to(dtype) for _ in range(2))
    v = torch.randn(S, H, F, generator=gen).to(dtype)
    lo, hi = gate
    g = (lo + (hi - lo) * torch.rand(S, H, E, generator=gen)).to(dtype)
    h0 = torch.randn(H, E, F, generator=gen).to(dtype)
    return q, k, v, g, h0


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_reference_runs_the_steps_like_a_naive_loop(reverse):
    g = opforge.load(GLA.format(T="f32", rev="reverse " if reverse else "")).graphs["gla"]
    q, k, v, gate, h0 = gla_inputs(37)
    o, h_last = run_graph(g, dict(q=q, k=k, v=v, g=gate, h0=h0), dict(S=37, H=2, E=3, F=4), check=True)
    want_o, want_h = naive_gla(q, k, v, gate, h0, reverse)
    torch.testing.assert_close(o, want_o, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_last, want_h, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("S", [1, 37])
@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_compiled_gla_matches_the_reference(S, dtype, reverse):
    op = compiled(GLA.format(T=dtype, rev="reverse " if reverse else ""), f"scan_gla_{dtype}").gla
    run_case(op, dict(S=S, H=2, E=3, F=5), seed=S)


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_strongly_decaying_gates_neither_overflow_nor_lose_the_result(dtype):
    """Log-gates down to -20 per step: the state decays to the latest updates; nothing
    overflows (the step-by-step form never exponentiates a sum of gates) and the outputs match
    the float64 loop within the dtype's tolerance."""
    torch_dt = torch.float32 if dtype == "f32" else torch.float16
    op = compiled(GLA.format(T=dtype, rev=""), f"scan_decay_{dtype}").gla
    q, k, v, g, h0 = gla_inputs(37, dtype=torch_dt, gate=(-20.0, 0.0), seed=5)
    o, h_last = op(q, k, v, g, h0)
    assert torch.isfinite(o).all() and torch.isfinite(h_last).all()
    want_o, want_h = naive_gla(q, k, v, g, h0)
    tol = dict(rtol=2e-3, atol=2e-3) if dtype == "f32" else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(o.double(), want_o, **tol)
    torch.testing.assert_close(h_last.double(), want_h, **tol)


def test_two_hundred_steps_of_an_elementwise_recurrence():
    op = compiled(HGRN, "scan_hgrn").hgrn
    run_case(op, dict(S=200, B=2, D=5), seed=7)


def test_a_scan_of_length_zero_gives_empty_outputs_and_the_initial_carry():
    op = compiled(GLA.format(T="f32", rev=""), "scan_empty").gla
    q, k, v, g, h0 = gla_inputs(0)
    o, h_last = op(q, k, v, g, h0)
    assert o.shape == (0, 2, 4) and torch.equal(h_last, h0)


# -- GRU against torch.nn.GRU, forward and backward ------------------------------------------------
def _gru():
    from pathlib import Path
    return opforge.compile(Path(opforge.__file__).resolve().parent / "examples" / "gru.opf",
                           namespace="scan_gru_t", ops=["gru"]).gru


def test_gru_matches_torch_nn_gru_forward_and_backward():
    op = _gru()
    S, B, I, F = 37, 3, 5, 7
    torch.manual_seed(0)
    gru = torch.nn.GRU(I, F)
    x = torch.randn(S, B, I, requires_grad=True)
    h0 = torch.randn(1, B, F, requires_grad=True)
    want, want_h = gru(x, h0)
    ws = [gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0]
    mine = [w.detach().clone().requires_grad_() for w in ws]
    x2, h02 = x.detach().clone().requires_grad_(), h0.detach()[0].clone().requires_grad_()
    y, h_last = op(x2, h02, *mine)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_last, want_h[0], rtol=1e-5, atol=1e-5)
    cy, ch = torch.randn_like(y), torch.randn_like(h_last)
    torch.autograd.backward([want, want_h[0]], [cy, ch])
    torch.autograd.backward([y, h_last], [cy, ch])
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h02.grad, h0.grad[0], rtol=1e-4, atol=1e-4)
    for w, m in zip(ws, mine):
        torch.testing.assert_close(m.grad, w.grad, rtol=1e-4, atol=1e-4)


def test_gradcheck_through_the_steps_in_float64():
    from opforge.ir.types import DType
    op = compiled(GLA.format(T="f32", rev="reverse "), "scan_gc", dtype=DType.f64).gla
    args = [a.double().requires_grad_() for a in gla_inputs(5, E=2, F=3)]
    assert torch.autograd.gradcheck(lambda *a: op(*a), tuple(args), eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=True)


def test_torch_compile_fullgraph_traces_the_steps():
    op = compiled(HGRN, "scan_compile").hgrn
    x, f = torch.randn(6, 2, 3), torch.randn(6, 2, 3)
    want = op(x, f)
    got = torch.compile(lambda a, b: op(a, b), fullgraph=True, backend="aot_eager")(x, f)
    for g_, w in zip(got, want):
        torch.testing.assert_close(g_, w)


# -- the class of a recurrence ----------------------------------------------------------------------
MIXED = """
op mixed(x: f32[S, H]) -> f32[S, H] {
    y = scan t in S with a: f32[H] = 0.0, b: f32[H] = 1.0 {
        return a * 0.5 + b, b * 0.5 + x[t], a
    }
    return y
}"""


@pytest.mark.parametrize("src, name, kind, why", [
    (GLA.format(T="f32", rev=""), "gla", "linear", "a * carry + b"),
    (HGRN, "hgrn", "linear", "a * carry + b"),
    (MIXED, "mixed", "general", "the carries a, b mix"),
])
def test_explain_gives_the_class_and_how_the_scan_runs(src, name, kind, why):
    op = getattr(compiled(src, f"scan_class_{name}"), name)
    text = op.explain()
    assert f"{kind} recurrence" in text and why in text, text
    assert "one kernel for all steps" in text and "with gradients" in text, text
    said = "in chunks of BLOCK_C steps" in text or "no chunked form" in text
    assert said == (kind == "linear"), text


def test_gru_is_a_general_recurrence_through_its_matmul():
    text = _gru().explain()
    assert "general recurrence: a carry goes through matmul" in text


POSITIONS = """
op f(x: f32[B, S, H]) -> f32[S, B] {
    y = scan t in S with c: f32[B] = 0.0 {
        m = cast(arange(S) <= t, f32)
        cn = c + x[:, t, 1:][:, 0] * sum(m, axis=0)
        return cn, cn
    }
    return y
}"""


def test_the_step_index_as_a_value_and_a_middle_axis_step_slice():
    """``x[:, t, 1:]`` (the step on axis 1, then more indices) and ``arange(S) <= t`` in the
    body: the body reads the size S, which no value it reads has any more (S is passed to it)."""
    op = compiled(POSITIONS, "scan_positions").f
    x = torch.randn(2, 5, 3)
    c, want = torch.zeros(2), []
    for t in range(5):
        c = c + x[:, t, 1] * (t + 1)
        want.append(c)
    torch.testing.assert_close(op(x), torch.stack(want))
    run_case(op, dict(B=3, S=7, H=2), seed=3)


# -- hoisting the carry-free GEMMs (passes/scan_hoist.py) --------------------------------------------
def test_gru_input_projection_is_one_gemm_over_all_steps():
    op = _gru()
    seg, scan, _ = op.parts
    assert "hoisted out of the loop, run once over all steps before it: matmul, add (" in op.explain()
    mm = [n for n in seg.graph.nodes if n.op == "matmul"]
    assert len(mm) == 1 and str(mm[0].out.type) == "f32[S, B, 3*F]"     # x @ w_ih.T over the sequence
    body_mm = [n for n in scan.graph.nodes if n.op == "matmul"]
    assert len(body_mm) == 1 and "w_hh" in {p.name for p in scan.graph.params}  # only h @ w_hh.T per step
    assert "x_t" not in {p.name for p in scan.graph.params}


def test_gla_outer_product_stays_in_the_body():
    op = compiled(GLA.format(T="f32", rev=""), "scan_nohoist").gla
    assert "hoisted out of the loop: nothing" in op.explain()
    assert len(op.parts) == 2          # no piece before the scan (nothing left the loop): the body, its one kernel


HOISTED = """
op f(x: f32[B, S, I], w: f32[F, I], h0: f32[B, F]) -> (f32[S, B, F], f32[B, F]) {
    y, h_last = scan t in S reverse with h = h0 {
        u = (x[:, t] @ w.T) * 0.5
        h_next = tanh(u + h)
        return h_next, h_next - u
    }
    return y, h_last
}"""


@pytest.mark.parametrize("S", [1, 37])
def test_hoisting_a_middle_axis_step_slice_with_a_literal(S):
    """x[:, t] (the step on axis 1: the hoisted GEMM reads x with the step axis moved first) and
    a literal in the hoisted chain; the body's output reads the hoisted value too."""
    op = compiled(HOISTED, "scan_hoist_mid").f
    assert "hoisted out of the loop, run once over all steps before it: permute" not in op.explain()
    assert "matmul, mul" in op.explain()
    run_case(op, dict(B=2, S=S, I=5, F=3), seed=S)
