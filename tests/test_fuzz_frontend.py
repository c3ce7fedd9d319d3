"""Token-level fuzzing of the front end.

Valid specs (every example and a few small ones below) are broken at the token level: a token
deleted, duplicated, swapped with another, or replaced by another token of the same file (or
an awkward literal). Loading and canonicalising the result (with the IR verifier on) must
either succeed or raise SpecError; any other exception is a bug. Every SpecError must point
inside the source, and its report must format.
"""
from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opforge.frontend import load_program
from opforge.frontend.diagnostics import SpecError
from opforge.passes.context import PassContext
from opforge.passes.pipeline import canonical_graph

from .conftest import EXAMPLE_FILES

SMALL_SPECS = [
    # elementwise, scalars and defaults, comparisons, where
    """op scale_add(x: f32[M, N], y: f32[M, N], alpha: f32 = 0.5, flag: bool = true, n: i32 = 3) -> f32[M, N] {
    z = x * alpha + y / 2.0 - (1 + 2 * 3)
    c = where(z > 0.0, z, -z); d = maximum(c, minimum(x, y))
    return abs(d) ** 2.0
}
""",
    # gathers, slices with steps and negative bounds, None and ..., reductions over tuples
    """op embed(emb: f16[V, D], ids: i32[B, S], pos: f16[S, D]) -> f16[B, S, D - 2] {
    e = emb[ids] + pos
    a = e[:, :, 1:-1]
    b = e[0, None, ..., ::2]
    return a * cast(sum(b, axis=(1, 2), keepdim=true), f16)
}
""",
    # several results, integer reductions, scans, softmax family
    """op reductions(x: f32[M, N], k: i32[M, N]) -> (f32[M, 1], i32[M], f32[M, N], i32[M, N]) {
    m = max(x, axis=-1, keepdim=true)
    s = sum(k, axis=1)
    l = log_softmax(x - m, axis=-1)
    return mean(l, axis=1, keepdim=true), s, exp(l) * sigmoid(x), cumsum(k, axis=0)
}
""",
    # reshape with -1 and size arithmetic, transpose, concat, topk
    """op heads(x: f16[B, S, D], w: f16[D, D], y: f16[U, D]) -> (f16[B, 4, S, D / 4], f16[S + U, D], i32[S, 2]) {
    q = reshape(x @ w.T, [B, S, 4, -1])
    c = concat(x[0], y, axis=0)
    v, i = topk(cast(x[0], f32), k=2, axis=-1)
    return transpose(q, 1, 2), c, i
}
""",
    # layouts, gelu with a string, a call of another op by position and by keyword
    """op mlp(x: f16[M, K], w1: f16[F, K] @quant(int4, group=32), w2: f16[K, F] @lowrank(tol=0.05)) -> f16[M, K] {
    return gelu(x @ w1.T, approximate="tanh") @ w2.T
}

op user(x: f16[M, K], w1: f16[F, K], w2: f16[K, F] @sparse(2:4), e: f16[A, K]) -> f16[M, K] {
    h = mlp(x, w1, w2); g = mlp(x=h, w1=w1, w2=w2)
    return g + cast(cast(M, f32) * 0.0, f16) + permute(e[0:1, :], [0, 1])
}
""",
    # masks, symbolic sizes as values, integer and bool arithmetic, one-line bodies
    """op masked(s: f32[H, S, T]) -> f32[H, S, T] {
    return softmax(where(causal(S, T), s, -inf), axis=-1) * rsqrt(cast(T, f32)) + softplus(tanh(s))
}
op ints(a: i32[N], b: i32[N], c: u8[N]) -> (bool[N], i32[N], f32[N]) {
    return (a == b) != (a < b), a * 2 + b - abs(-a), cast(c, f32) / 3.0
}
op tiny(x: f32[]) -> f32[] { return x * 2.0 }
op moe(x: f16[T, D], w: f16[E, F, D] , idx: i32[T, 2]) -> f16[T, 2, F] { return expert_matmul(x, w, idx) }
""",
]

EXAMPLES = [p.read_text() for p in EXAMPLE_FILES]

# Comments and whitespace other than newlines are kept as they are; newlines are tokens (they
# end statements), so they are deleted, duplicated and moved like any other token.
TOKEN = re.compile(r'\n|[ \t\r]+|#[^\n]*|"[^"\n]*"|[A-Za-z_][A-Za-z0-9_]*'
                   r'|[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?|->|//|\*\*|\.\.\.|<=|>=|==|!=|.')
AWKWARD = ["0", "-1", "99999999999999999999", "1e400", "None", "...", "T", "inf", "bool", "u8", ";", "\n"]
MUTATIONS = ("delete", "duplicate", "swap", "replace")


def tokenize(src: str) -> list[str]:
    pieces = TOKEN.findall(src)
    assert "".join(pieces) == src
    return pieces


def significant(pieces: list[str]) -> list[int]:
    return [i for i, p in enumerate(pieces) if (p == "\n" or not p.isspace()) and not p.startswith("#")]


@st.composite
def mutated(draw, seeds: list[str]) -> str:
    pieces = tokenize(draw(st.sampled_from(seeds)))
    idx = significant(pieces)
    replacement = st.one_of(st.sampled_from([pieces[i] for i in idx]), st.sampled_from(AWKWARD))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(MUTATIONS))
        i = draw(st.sampled_from(idx))
        if kind == "delete":
            pieces[i] = ""
        elif kind == "duplicate":
            pieces[i] = f"{pieces[i]} {pieces[i]}"
        elif kind == "swap":
            j = draw(st.sampled_from(idx))
            pieces[i], pieces[j] = pieces[j], pieces[i]
        else:
            pieces[i] = draw(replacement)
    return "".join(pieces)


def check_frontend(src: str) -> str:
    """'ok' or 'error'; any exception other than SpecError propagates (a bug)."""
    try:
        program = load_program(src)
        for op in program.graphs:
            canonical_graph(program, op, PassContext(program=program, verify=True))
    except SpecError as e:
        check_spec_error(e, src)
        return "error"
    return "ok"


def check_spec_error(e: SpecError, src: str) -> None:
    report = str(e)   # must not raise
    assert e.span is not None, f"a spec error without a place in the text: {report}"
    lines = src.split("\n")
    assert 1 <= e.line <= len(lines), report
    assert 1 <= e.col <= len(lines[e.line - 1].rstrip("\r")) + 1, report
    assert (e.span.end_line, e.span.end_col) >= (e.line, e.col), report
    head = f"<string>:{e.line}:{e.col}: error: "
    assert report.startswith(head), report
    shown = report.split("\n")
    assert len(shown) >= 3 and re.fullmatch(r" *\^~*", shown[2]), report
    assert len(shown[2]) - len(shown[2].lstrip(" ")) == e.col - 1, report


SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def test_seeds_are_valid():
    for src in EXAMPLES + SMALL_SPECS:
        assert check_frontend(src) == "ok"


@settings(max_examples=1200, **SETTINGS)
@given(mutated(EXAMPLES))
def test_mutated_examples(src: str):
    check_frontend(src)


@settings(max_examples=1200, **SETTINGS)
@given(mutated(SMALL_SPECS))
def test_mutated_small_specs(src: str):
    check_frontend(src)


# Inputs the fuzzer (and a review prompted by it) turned up; each once raised something other
# than SpecError or pointed outside the text.
REGRESSIONS = [
    "op f(x: i64[M]) -> i64[M] {\n    return x * (99999999999999999999 + 1)\n}\n",    # folding overflowed
    "op g(x: i32[D], n: i32 = 99999999999999999999) -> i32[D] {\n    return x * (n + 1)\n}\n"
    "op f(a: i32[8]) -> i32[8] {\n    return g(a)\n}\n",                               # default overflowed
    "op f(x: f32[M]) -> f32[M] {\n    return x * " + "1" * 5000 + "\n}\n",             # int() digit limit
    "op f(x: f32[" + "9" * 5000 + "]) -> f32[M] {\n    return x\n}\n",
    "op g(x: f16[D], y: f16[E]) -> f16[D] {\n    return reshape(reshape(x, [-1, E]), [D])\n}\n"
    "op f(a: f16[8], b: f16[0]) -> f16[8] {\n    return g(a, b)\n}\n",                    # size / 0 when inlining
    "op g(x: f16[D], y: f16[E]) -> f16[D / E, E] {\n    return reshape(x, [-1, E])\n}\n"
    "op f(a: f16[8], b: f16[M], c: f16[N]) -> f16[8] {\n    return g(a, concat(b, c))\n}\n",  # size / a sum
    "op f(x: f32[M]) -> f32[M] {\n    return " + "-" * 3000 + "x\n}\n",                 # recursion in the transformer
    "op f(x: f32[M]) -> f32[M] {\r    return y\r}\r",                                  # lone carriage returns
    "op f(x: f32[M]) -> f32[M] {\n    return x\x0c\n}\n",
    "op f(x: f32[M]) -> f32[M] {\n    return x\n\nop g(x: f32[M]) -> f32[M] {\n    return x\n}\n",
    "f(x: f32[M]) -> f32[M] {\n    return x\n}\n",
]


@pytest.mark.parametrize("src", REGRESSIONS)
def test_regressions(src: str):
    check_frontend(src)
