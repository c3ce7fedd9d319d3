"""Symbolic sizes.

A dimension is a plain ``int`` or a :class:`Sym`: a polynomial over size symbols with rational
coefficients and integer (possibly negative) exponents, kept in one canonical form so that two
sizes are equal exactly when their forms are equal. That covers what specs write: ``M``,
``H * E`` (a reshape), ``D / H`` (a head split, ``-1`` in a reshape), ``D - 1`` (a slice) and
``M + N`` (a concat). Division is exact division: ``D / H`` records that ``H`` divides ``D``;
the runtime checks every such size evaluates to a whole number when symbols are bound.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Mapping, Union

# A monomial is a sorted tuple of (symbol name, exponent), exponent != 0; () is the constant 1.
Monomial = tuple[tuple[str, int], ...]


class Sym:
    """A symbolic size in canonical polynomial form. Immutable and hashable."""

    __slots__ = ("terms", "_hash", "_ints")

    def __init__(self, terms: Mapping[Monomial, Fraction]):
        self.terms: tuple[tuple[Monomial, Fraction], ...] = tuple(
            sorted(((m, Fraction(c)) for m, c in terms.items() if c != 0), key=_term_key)
        )
        self._hash = hash(self.terms)
        # the terms in integers, for value(): (numerator, denominator, symbols with positive
        # exponents, symbols with negative ones (exponent made positive))
        self._ints = tuple((c.numerator, c.denominator, tuple((s, e) for s, e in m if e > 0),
                            tuple((s, -e) for s, e in m if e < 0)) for m, c in self.terms)

    @staticmethod
    def of(name: str) -> "Sym":
        return Sym({((name, 1),): Fraction(1)})

    # -- algebra -------------------------------------------------------------------------------
    def __add__(self, other: "Dim") -> "Dim":
        acc = dict(self.terms)
        for m, c in _as_terms(other):
            acc[m] = acc.get(m, Fraction(0)) + c
        return _normalize(acc)

    __radd__ = __add__

    def __neg__(self) -> "Dim":
        return _normalize({m: -c for m, c in self.terms})

    def __sub__(self, other: "Dim") -> "Dim":
        return self + (-other if isinstance(other, Sym) else -int(other))

    def __rsub__(self, other: "Dim") -> "Dim":
        return (-self) + other

    def __mul__(self, other: "Dim") -> "Dim":
        acc: dict[Monomial, Fraction] = {}
        for m1, c1 in self.terms:
            for m2, c2 in _as_terms(other):
                m = _mono_mul(m1, m2)
                acc[m] = acc.get(m, Fraction(0)) + c1 * c2
        return _normalize(acc)

    __rmul__ = __mul__

    def __truediv__(self, other: "Dim") -> "Dim":
        return div(self, other)

    def __rtruediv__(self, other: "Dim") -> "Dim":
        return div(other, self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sym) and self.terms == other.terms

    def __hash__(self) -> int:
        return self._hash

    # -- queries -------------------------------------------------------------------------------
    @property
    def symbols(self) -> frozenset[str]:
        return frozenset(s for m, _ in self.terms for s, _ in m)

    def is_symbol(self) -> bool:
        return len(self.terms) == 1 and self.terms[0][1] == 1 and len(self.terms[0][0]) == 1 \
            and self.terms[0][0][0][1] == 1

    def evaluate(self, bindings: Mapping[str, int]) -> Fraction:
        total = Fraction(0)
        for m, c in self.terms:
            v = Fraction(c)
            for s, e in m:
                if s not in bindings:
                    raise KeyError(s)
                b = Fraction(bindings[s])
                if e < 0 and b == 0:
                    raise ZeroDivisionError(f"size {s} is 0 in {self}")
                v *= b ** e
            total += v
        return total

    def value(self, bindings: Mapping[str, int]) -> tuple[int, int]:
        """The value as an integer fraction (numerator, denominator > 0), not reduced: what
        ``evaluate`` computes, in int arithmetic (a Fraction per term costs ten times as much)."""
        num, den = 0, 1
        for c_num, c_den, pos, neg in self._ints:
            n, d = c_num, c_den
            for s, e in pos:
                n *= bindings[s] if e == 1 else bindings[s] ** e
            for s, e in neg:
                b = bindings[s]
                if b == 0:
                    raise ZeroDivisionError(f"size {s} is 0 in {self}")
                d *= b if e == 1 else b ** e
            if d == 1 and den == 1:
                num += n
            else:
                num, den = num * d + n * den, den * d
        return num, den

    def __repr__(self) -> str:
        return f"Sym({self})"

    def __str__(self) -> str:
        out = []
        for i, (m, c) in enumerate(self.terms):
            sign = "-" if c < 0 else "+"
            c = abs(c)
            num = [s if e == 1 else f"{s}**{e}" for s, e in m if e > 0]
            den = [s if e == -1 else f"{s}**{-e}" for s, e in m if e < 0]
            if c.numerator != 1 or not num:
                num.insert(0, str(c.numerator))
            if c.denominator != 1:
                den.insert(0, str(c.denominator))
            text = "*".join(num) + ("/" + "/".join(den) if den else "")
            out.append(text if i == 0 and sign == "+" else (f"-{text}" if i == 0 else f" {sign} {text}"))
        return "".join(out)


Dim = Union[int, Sym]


def _term_key(t):
    m, _ = t
    return (-sum(abs(e) for _, e in m), m)


def _as_terms(d: Dim):
    if isinstance(d, Sym):
        return d.terms
    return (((), Fraction(d)),)


def _mono_mul(a: Monomial, b: Monomial) -> Monomial:
    acc = dict(a)
    for s, e in b:
        acc[s] = acc.get(s, 0) + e
    return tuple(sorted((s, e) for s, e in acc.items() if e != 0))


def _normalize(acc: Mapping[Monomial, Fraction]) -> Dim:
    acc = {m: c for m, c in acc.items() if c != 0}
    if not acc:
        return 0
    if list(acc) == [()]:
        c = acc[()]
        return int(c) if c.denominator == 1 else Sym(acc)
    return Sym(acc)


def sym(name: str) -> Sym:
    return Sym.of(name)


def div(a: Dim, b: Dim) -> Dim:
    """Exact division ``a / b``. ``b`` must be a single term (a monomial times a number)."""
    if isinstance(b, int):
        if b == 0:
            raise ZeroDivisionError("division of a size by 0")
        if isinstance(a, int):
            return a // b if a % b == 0 else Sym({(): Fraction(a, b)})
        return _normalize({m: c / b for m, c in a.terms})
    if len(b.terms) != 1:
        raise ValueError(f"cannot divide a size by the sum {b}")
    (mb, cb), = b.terms
    inv = tuple((s, -e) for s, e in mb)
    acc = {}
    for m, c in _as_terms(a):
        acc[_mono_mul(m, inv)] = c / cb
    return _normalize(acc)


def is_static(d: Dim) -> bool:
    return isinstance(d, int)


def free_symbols(dims) -> frozenset[str]:
    out: set[str] = set()
    for d in dims:
        if isinstance(d, Sym):
            out |= d.symbols
    return frozenset(out)


def evaluate(d: Dim, bindings: Mapping[str, int]) -> int:
    """The value of a size under ``bindings``; raises ValueError if it is not a whole number >= 0."""
    if isinstance(d, int):
        if d < 0:
            raise ValueError(f"size {d} is negative")
        return d
    num, den = d.value(bindings)
    if num % den:
        raise ValueError(f"size {d} = {Fraction(num, den)} is not a whole number")
    if num < 0:
        raise ValueError(f"size {d} = {Fraction(num, den)} is negative")
    return num // den


def format_dim(d: Dim) -> str:
    s = str(d)
    return s if isinstance(d, int) or d.is_symbol() or " " not in s and "/" not in s else f"({s})"


def format_shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def subst(d: Dim, mapping: Mapping[str, Dim]) -> Dim:
    """Replace symbols by sizes (used when an op's body is inlined at a call site)."""
    if isinstance(d, int):
        return d
    total: Dim = 0
    for m, c in d.terms:
        term: Dim = Sym({(): c}) if c.denominator != 1 else int(c)
        for s, e in m:
            v = mapping.get(s, Sym.of(s))
            for _ in range(abs(e)):
                term = term * v if e > 0 else div(term, v)
        total = total + term
    return total


def subst_any(x, mapping: Mapping[str, Dim]):
    """subst() through tuples and lists (attribute values)."""
    if isinstance(x, Sym):
        return subst(x, mapping)
    if isinstance(x, tuple):
        return tuple(subst_any(v, mapping) for v in x)
    if isinstance(x, list):
        return [subst_any(v, mapping) for v in x]
    return x
