"""Symbolic sizes (ir/dims.py): canonical form, exact division, substitution, evaluation."""
from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opforge.ir.dims import Sym, div, evaluate, format_dim, format_shape, free_symbols, is_static, subst, \
    subst_any, sym

A, B, C, D, E, H, M, N = (sym(s) for s in "ABCDEHMN")


def value(d, bindings) -> Fraction:
    """The exact value of a size, whole or not (evaluate() insists on whole numbers)."""
    return Fraction(d) if isinstance(d, int) else d.evaluate(bindings)


# -- canonical equality ---------------------------------------------------------------------------
def test_equal_forms_are_equal_and_hash_equal():
    assert sym("M") == sym("M") and hash(sym("M")) == hash(sym("M"))
    assert M + N == N + M and hash(M + N) == hash(N + M)
    assert M * N == N * M
    assert (M + 1) * (M - 1) == M * M - 1
    assert 2 * M == M + M
    assert M != N and M + 1 != M and M * N != M + N
    assert len({M + N, N + M, M * 2, M + M}) == 2


def test_sums_that_cancel_become_plain_ints():
    assert M - M == 0 and isinstance(M - M, int)
    assert (M + 3) - M == 3 and isinstance((M + 3) - M, int)
    assert (M + N) - N == M
    assert 0 * M == 0 and isinstance(0 * M, int)
    assert M * 2 / 2 == M
    assert sym("M") != 1  # a symbol never equals an int, whatever it is bound to later


def test_head_split_is_exact():
    assert H * (D / H) == D
    assert (D / H) * H == D
    assert D / H * E / E == D / H
    assert (D / H) / E == D / (H * E)
    assert D / D == 1 and isinstance(D / D, int)
    assert (H * E) / E == H
    # reshape [B, S, D] -> [B, S, -1, E] infers D / E; reshaping back multiplies out
    assert (B * D) / (B * E) * E == D


def test_int_division():
    assert div(6, 3) == 2 and isinstance(div(6, 3), int)
    half = div(7, 2)
    assert isinstance(half, Sym) and not half.symbols
    assert half.evaluate({}) == Fraction(7, 2)
    assert 2 * half == 7
    with pytest.raises(ZeroDivisionError):
        div(M, 0)
    with pytest.raises(ZeroDivisionError):
        div(3, 0)


def test_division_by_a_sum_is_refused():
    with pytest.raises(ValueError, match="sum"):
        div(D, M + N)
    with pytest.raises(ValueError, match="sum"):
        D / (H + 1)


def test_queries():
    assert (D / H + M).symbols == {"D", "H", "M"}
    assert M.is_symbol() and not (2 * M).is_symbol() and not (M + 1).is_symbol() and not (M * N).is_symbol()
    assert not (D / H).is_symbol()
    assert free_symbols([M, 3, D / H]) == {"M", "D", "H"}
    assert free_symbols([1, 2]) == frozenset()
    assert is_static(4) and not is_static(M)


def test_printing():
    assert str(M) == "M"
    assert str(M + N) == "M + N"
    assert str(1 - M) == "-M + 1"
    assert str(2 * M - 3) == "2*M - 3"
    assert str(E * H) == "E*H"
    assert str(D / E) == "D/E"
    assert str(E / 2) == "E/2"
    assert str(M * M) == "M**2"
    assert str(div(7, 2)) == "7/2"
    assert format_dim(M) == "M" and format_dim(7) == "7"
    assert format_dim(M + N) == "(M + N)" and format_dim(D / E) == "(D/E)"
    assert format_shape((M, D / E, 4)) == "[M, D/E, 4]"


# -- evaluation -----------------------------------------------------------------------------------
def test_evaluate_whole_values():
    b = {"D": 64, "H": 4, "M": 5, "N": 3}
    assert evaluate(D / H, b) == 16 and isinstance(evaluate(D / H, b), int)
    assert evaluate(M - N, b) == 2
    assert evaluate(M * N + 1, b) == 16
    assert evaluate(7, {}) == 7
    assert evaluate(0, {}) == 0


@pytest.mark.parametrize("size,bindings,match", [
    (D / H, {"D": 10, "H": 4}, "not a whole number"),
    (E / 2, {"E": 7}, "not a whole number"),
    (div(7, 2), {}, "not a whole number"),
    (M - N, {"M": 1, "N": 2}, "negative"),
    (-3, {}, "negative"),
])
def test_evaluate_rejects_fractions_and_negatives(size, bindings, match):
    with pytest.raises(ValueError, match=match):
        evaluate(size, bindings)


def test_evaluate_errors_for_unbound_and_zero_divisors():
    with pytest.raises(KeyError):
        evaluate(M + N, {"M": 1})
    with pytest.raises(ZeroDivisionError):
        evaluate(D / H, {"D": 4, "H": 0})


# -- substitution (inlining) ----------------------------------------------------------------------
def test_subst():
    assert subst(D / H, {"D": H * E}) == E
    assert subst(E / 2, {"E": D / H}) == D / (2 * H)
    assert subst(M + 1, {"M": 3}) == 4 and isinstance(subst(M + 1, {"M": 3}), int)
    assert subst(M * M, {"M": N + 1}) == N * N + 2 * N + 1
    assert subst(M + N, {}) == M + N
    assert subst(M, {"N": 5}) == M
    assert subst(5, {"M": 2}) == 5
    assert subst(D / E, {"D": 12, "E": 4}) == 3
    assert subst(D / E, {"D": 10, "E": 4}) == div(5, 2)
    assert subst_any((M, [N, 2], "s", 1.5), {"M": 3, "N": D}) == (3, [D, 2], "s", 1.5)


# -- algebraic properties on random polynomials ---------------------------------------------------
SYMS = ["A", "B", "C"]
leaves = st.one_of(st.integers(-4, 4), st.sampled_from(SYMS).map(sym))


def _combine(children):
    return st.one_of(
        st.tuples(children, children).map(lambda t: t[0] + t[1]),
        st.tuples(children, children).map(lambda t: t[0] - t[1]),
        st.tuples(children, children).map(lambda t: t[0] * t[1]),
    )


polys = st.recursive(leaves, _combine, max_leaves=6)
# single-term divisors: a nonzero number times a product of symbols (what div accepts)
monomials = st.tuples(st.sampled_from([1, 2, 3, -1]), st.lists(st.sampled_from(SYMS), max_size=3)).map(
    lambda t: _product(t[0], t[1]))
bindings = st.fixed_dictionaries({s: st.integers(1, 9) for s in SYMS})


def _product(c, names):
    out = c
    for s in names:
        out = out * sym(s)
    return out


FAST = settings(max_examples=150, deadline=None)


@FAST
@given(polys, polys, polys)
def test_ring_laws(p, q, r):
    assert (p + q) * r == p * r + q * r
    assert p * (q + r) == p * q + p * r
    assert p + q == q + p and p * q == q * p
    assert (p + q) + r == p + (q + r) and (p * q) * r == p * (q * r)
    assert p - p == 0 and p + 0 == p and p * 1 == p and p * 0 == 0
    assert hash((p + q) * r) == hash(p * r + q * r)


@FAST
@given(polys, polys, bindings)
def test_evaluation_is_a_homomorphism(p, q, b):
    assert value(p + q, b) == value(p, b) + value(q, b)
    assert value(p - q, b) == value(p, b) - value(q, b)
    assert value(p * q, b) == value(p, b) * value(q, b)


@FAST
@given(polys, monomials, bindings)
def test_exact_division_by_a_monomial(p, m, b):
    assert div(p * m, m) == p
    assert div(p, m) * m == p
    assert value(div(p, m), b) == value(p, b) / value(m, b)


@FAST
@given(polys, polys, bindings)
def test_subst_then_evaluate_is_evaluate_with_the_value(p, q, b):
    # subst(p, A -> q) evaluated at b is p evaluated with A bound to q's value at b
    qv = value(q, b)
    got = value(subst(p, {"A": q}), b)
    if qv.denominator == 1:
        assert got == value(p, {**b, "A": int(qv)})
    assert got == _eval_with_fraction(p, {**b, "A": qv})


def _eval_with_fraction(p, b) -> Fraction:
    if isinstance(p, int):
        return Fraction(p)
    total = Fraction(0)
    for mono, c in p.terms:
        v = Fraction(c)
        for s, e in mono:
            v *= Fraction(b[s]) ** e
        total += v
    return total
