"""Seeded random specs through the compiled kernels, against the float64 reference.

A small generator (``random.Random(seed)``, so every case is reproducible from its id) writes
an op over a domain ``[M, N]`` or ``[B, M, N]``: parameters of broadcastable shapes, then a DAG
of statements drawn from pointwise math, broadcasting binary ops with literals and scalar
parameters, comparisons and ``where``, casts (through f16, i32 and bool and back), reductions
over random axes with and without keepdim, softmax/log_softmax over random axes. Values stay
bounded (log/sqrt/rsqrt/division get positive operands, exp only of bounded values), so a
mismatch is a compiler bug, not an ill-conditioned case. The fusion partitioner sees a
different graph in every case: the same value used by several consumers, reductions feeding
pointwise chains feeding reductions, results stored at full and reduced shapes.

The generator steers clear of a known compiler bug (test_kernels_builtins.KNOWN_BUGS, a value
with only size-1 axes read by a kernel): no parameter has only size-1 axes and no reduction
covers every non-1 axis of its operand. Results are full-domain values (every unused value that
broadcasts to the domain, summed) and, sometimes, a reduction's own result.
"""
from __future__ import annotations

import random
import re

import pytest

from .kernel_helpers import compiled, run_case

SYMS = ("B", "M", "N")
SIZE_CHOICES = {"B": (1, 2, 3), "M": (1, 5, 7, 33), "N": (1, 7, 33, 130)}


def bcast(a: tuple, b: tuple):
    """NumPy broadcasting of shapes of symbols and 1s; None if they do not broadcast."""
    n = max(len(a), len(b))
    a = (1,) * (n - len(a)) + a
    b = (1,) * (n - len(b)) + b
    out = []
    for x, y in zip(a, b):
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            return None
    return tuple(out)


def fmt(shape) -> str:
    return ", ".join(str(d) for d in shape)


class SpecGen:
    def __init__(self, seed: int, dtype: str):
        self.r = random.Random(seed)
        self.dt = dtype
        rank = self.r.choice((2, 2, 3))
        self.domain = SYMS[-rank:]
        self.params: list[tuple[str, str]] = []
        self.lines: list[str] = []
        self.pool: list[tuple[str, tuple, str]] = []   # (name, shape, kind: full|reduced|other)
        self.k = 0

    # -- helpers -------------------------------------------------------------------------------
    def fresh(self) -> str:
        self.k += 1
        return f"v{self.k}"

    def kind(self, shape, reduced=False) -> str:
        if reduced:
            return "reduced"
        return "full" if tuple(shape) == self.domain else "other"

    def emit(self, expr: str, shape: tuple, reduced=False) -> tuple:
        name = self.fresh()
        self.lines.append(f"    {name} = {expr}")
        entry = (name, tuple(shape), self.kind(shape, reduced))
        self.pool.append(entry)
        return entry

    def param_shape(self) -> tuple:
        r = self.r
        shape = [d if r.random() < 0.75 else 1 for d in self.domain]
        if r.random() < 0.3:
            shape = shape[r.randint(1, len(shape) - 1):]
        if all(d == 1 for d in shape):      # known bug: an all-size-1 parameter (BUG_SCALAR_LOAD)
            shape[-1] = self.domain[-1]
        return tuple(shape)

    def pick(self, pred=lambda e: True):
        cands = [e for e in self.pool if pred(e)]
        # prefer recent values, so statements chain
        return cands[-1] if self.r.random() < 0.4 else self.r.choice(cands)

    # -- statements ----------------------------------------------------------------------------
    def unary(self):
        name, shape, _ = self.pick()
        f = self.r.choice([
            "tanh({})", "sigmoid({})", "sin({})", "cos({})", "relu({})", "silu({})", "gelu({})",
            'gelu({}, approximate="tanh")', "abs({})", "softplus({})", "exp(tanh({}))", "log(abs({}) + 1)",
            "sqrt(abs({}) + 0.5)", "rsqrt({0} * {0} + 1)", "-{}", "{} ** 2", "{} * 0.5 + 1",
            "2 * {} - 1", "cast(cast({}, f16), $T)", "cast({} > 0, $T)", "where({0} > 0.25, {0}, -{0})",
            "{} * s", "{} + cast(N, f32)", "{} / M",
        ])
        return self.emit(f.format(name).replace("$T", self.dt), shape)

    def binary(self):
        a = self.pick()
        partners = [e for e in self.pool if bcast(a[1], e[1]) is not None]
        b = self.r.choice(partners)
        shape = bcast(a[1], b[1])
        f = self.r.choice(["{} + {}", "{} - {}", "{} * {}", "{} / (abs({}) + 1)", "maximum({}, {})",
                           "minimum({}, {})", "where({0} > {1}, {0}, {1})", "({0} + {1}) * 0.5"])
        return self.emit(f.format(a[0], b[0]), shape)

    def reduction(self):
        # known bug (BUG_SCALAR_LOAD): a value with only size-1 axes read by another kernel, so
        # no reduction over every non-1 axis of its operand
        cands = [e for e in self.pool if sum(d != 1 for d in e[1]) >= 2]
        if not cands:
            return self.unary()
        name, shape, _ = self.r.choice(cands)
        rank = len(shape)
        axes = [i for i, d in enumerate(shape) if d != 1]
        r = self.r
        if len(axes) >= 3 and r.random() < 0.25:
            ax = tuple(sorted(r.sample(axes, 2)))
            axis_text = f"({ax[0]}, {ax[1]})"
        else:
            ax = (r.choice(axes),)
            axis_text = str(ax[0] - rank if r.random() < 0.5 else ax[0])
        keep = r.random() < 0.6
        fn = r.choice(["sum", "mean", "max", "min", "softmax", "log_softmax"])
        if fn in ("softmax", "log_softmax"):
            if len(ax) > 1:
                return self.unary()
            return self.emit(f"{fn}({name}, axis={axis_text})", shape)
        if keep:
            out = tuple(1 if i in ax else d for i, d in enumerate(shape))
        else:
            out = tuple(d for i, d in enumerate(shape) if i not in ax)
        kw = ", keepdim=true" if keep else ""
        arg = name if fn != "sum" else f"{name} * 0.25"
        return self.emit(f"{fn}({arg}, axis={axis_text}{kw})", out, reduced=True)

    # -- the op --------------------------------------------------------------------------------
    def generate(self) -> str:
        r = self.r
        n_params = r.randint(1, 3)
        self.params.append(("x0", f"x0: $T[{fmt(self.domain)}]"))
        self.pool.append(("x0", self.domain, "param"))
        for i in range(1, n_params):
            shape = self.param_shape()
            self.params.append((f"x{i}", f"x{i}: $T[{fmt(shape)}]"))
            self.pool.append((f"x{i}", shape, "param"))
        for _ in range(r.randint(2, 7)):
            choice = r.random()
            if choice < 0.4:
                self.unary()
            elif choice < 0.75:
                self.binary()
            else:
                self.reduction()
        # results: every value no statement uses that broadcasts to the domain, summed (so the
        # whole DAG is live), plus maybe a reduction's own result that is not used otherwise
        used = set()
        for line in self.lines:
            used.update(re.findall(r"\b(v\d+|x\d+)\b", line.split("=", 1)[1]))
        leaves = [e for e in self.pool if e[2] != "param" and e[0] not in used]
        live = [e for e in leaves if bcast(e[1], self.domain) == self.domain]
        if not any(e[1] == self.domain for e in live):
            live.append(self.pool[0])          # x0, full domain
        last = self.emit(" + ".join(e[0] for e in live) if len(live) > 1 else f"{live[0][0]} * 2", self.domain)
        results = [last]
        reduced = [e for e in leaves if e[2] == "reduced" and e[1] and e not in live]
        if reduced:
            results.append(r.choice(reduced))
        sig = ", ".join(p for _, p in self.params) + ", s: f32 = 0.75"
        rtypes = [f"$T[{fmt(e[1])}]" for e in results]
        rt = rtypes[0] if len(rtypes) == 1 else "(" + ", ".join(rtypes) + ")"
        body = "\n".join(self.lines)
        ret = ", ".join(e[0] for e in results)
        return f"op rand({sig}) -> {rt} {{\n{body}\n    return {ret}\n}}\n".replace("$T", self.dt)

    def sizes(self) -> list[dict]:
        out = []
        for _ in range(2):
            out.append({s: self.r.choice(SIZE_CHOICES[s]) for s in self.domain})
        return out


SEEDS = list(range(60))


def generated(seed: int):
    dtype = "f16" if seed % 3 == 2 else "f32"
    g = SpecGen(seed, dtype)
    return g.generate(), g.sizes()


@pytest.mark.parametrize("seed", SEEDS)
def test_random_spec(seed):
    src, sizes = generated(seed)
    op = compiled(src, f"rand{seed}").rand
    for i, b in enumerate(sizes):
        try:
            run_case(op, b, seed=seed * 10 + i)
        except AssertionError as e:
            raise AssertionError(f"{e}\nspec (seed {seed}):\n{src}") from None


def test_generator_covers_the_intended_constructs():
    """The seeds above exercise what the module docstring promises."""
    text = "\n".join(generated(s)[0] for s in SEEDS)
    for needle in ("keepdim=true", "softmax(", "log_softmax(", "sum(", "mean(", "max(", "min(", "cast(",
                   "where(", "[B, M, N]", "axis=(", "axis=0", "axis=-2", "f16[", "f32[", ") -> ("):
        assert needle in text, needle
