"""A random-spec generator with an independent oracle (issue 9's campaign, kept as tests).

``generate(seed)`` writes a random op as ``.opf`` text and, beside it, the same program as plain
PyTorch in float64 (an *oracle* that shares nothing with opforge's reference executor: it is
written from the language's semantics, op by op, here). ``check(case)`` compiles the spec,
runs it through the kernels on seeded random inputs at awkward sizes, and compares every output
with the oracle within the op's tolerance (runtime/tolerances.py, the one table).

What a program holds: a DAG of 3-15 statements over every built-in (pointwise math, arithmetic
with literals, scalar parameters and sizes used as values, comparisons and ``where``, the logical
operators ``& | ~`` and masks from ``arange`` positions (with ``//``), casts
among f32/f16/bf16/i32/bool), reductions over random axes with and without keepdim, softmax
and log_softmax, cumsum, matmuls with transposes and broadcast batch axes, views (reshape,
permute, transpose, ``.T``, ``None``), slices with steps, integer indexing, concat, row gathers
``emb[ids]``, ``topk``, and calls of helper ops defined in the same file.

So that a mismatch is a compiler bug and not an ill-conditioned program, every value carries an
interval that bounds it (interval arithmetic, conservative): ``log``/``sqrt``/``rsqrt`` and
divisors need values bounded away from 0, ``exp``/``sin``/``cos`` small ones, and narrow floats
stay far from overflow. Values that depend on a discontinuity (comparisons, casts to integers,
``topk`` indices) are taken only of *exact* values, those both the kernels and the oracle hold
bit for bit (inputs, views of them, max/min of them, ...), so a rounding never flips them.

``minimize(case, fails)`` shrinks a failing program (one output, then statements replaced by
their operands or dropped) for a regression test; tests/regressions/ keeps the ones found.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field, replace

import torch

FLOATS = ("f32", "f16", "bf16")
TORCH = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "i32": torch.int32,
         "i64": torch.int64, "bool": torch.bool}
# the largest magnitude a value of each dtype may reach here (far from f16's 65504)
MAG = {"f32": 1e6, "f16": 3e3, "bf16": 3e3, "i32": 1e6, "bool": 1}
SIZES = {"B": (1, 2, 3), "M": (1, 5, 17, 33), "N": (1, 7, 33, 130), "K": (1, 16, 37, 70), "V": (3, 11)}
POSITIVE = 0.05      # log, sqrt, rsqrt and divisors take values >= this
SMALL = 4.0          # exp, sin, cos take |values| <= this


@dataclass(frozen=True)
class Val:
    name: str
    dtype: str
    shape: tuple          # dims: symbol names, ints, or products "B*M" (sorted factors)
    lo: float
    hi: float
    exact: bool           # the kernels and the oracle hold the same bits

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def mag(self) -> float:
        return max(abs(self.lo), abs(self.hi))

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOATS


@dataclass(frozen=True)
class Stmt:
    outs: tuple           # the values it defines (two for topk)
    spec: str
    oracle: str
    operands: tuple       # names it reads

    @property
    def lhs(self) -> str:
        return ", ".join(v.name for v in self.outs)


@dataclass
class Case:
    seed: int
    dtype: str                          # the working float dtype
    params: list                        # (name, dtype, shape or None for a scalar, kind)
    helpers: list                       # (spec text, oracle text)
    stmts: list                         # Stmt
    outputs: list                       # Vals returned
    bindings: dict

    # -- rendering -----------------------------------------------------------------------------
    def spec(self) -> str:
        lines = [h for h, _ in self.helpers]
        params = ", ".join(f"{n}: {dt}" + (f"[{', '.join(map(str, shp))}]" if shp is not None else "")
                           for n, dt, shp, _ in self.params)
        res = [f"{v.dtype}[{', '.join(dim_text(d) for d in v.shape)}]" for v in self.outputs]
        result = res[0] if len(res) == 1 else "(" + ", ".join(res) + ")"
        body = [f"    {st.lhs} = {st.spec}" for st in self.stmts]
        body.append("    return " + ", ".join(v.name for v in self.outputs))
        lines.append(f"op main({params}) -> {result} {{\n" + "\n".join(body) + "\n}")
        return "\n".join(lines) + "\n"

    def oracle_source(self) -> str:
        lines = ["def main(" + ", ".join(n for n, *_ in self.params) + "):"]
        lines += [f"    {st.lhs} = {st.oracle}" for st in self.stmts]
        lines.append("    return [" + ", ".join(v.name for v in self.outputs) + "]")
        return "\n".join([o for _, o in self.helpers] + lines) + "\n"

    def oracle(self, inputs: dict) -> list:
        """The outputs in float64 (ints and bools as themselves), from plain torch."""
        env = {"torch": torch, "math": math, **self.bindings, **ORACLE_LIB}
        exec(compile(self.oracle_source(), f"<oracle {self.seed}>", "exec"), env)
        args = []
        for n, dt, shp, _ in self.params:
            x = inputs[n]
            if isinstance(x, torch.Tensor):
                x = x.to(torch.float64) if dt in FLOATS or dt == "i32" else x
            args.append(x)
        return env["main"](*args)


def dim_text(d) -> str:
    return str(d)


def dim_value(d, bindings) -> int:
    if isinstance(d, int):
        return d
    out = 1
    for f in str(d).split("*"):
        out *= int(f) if f.isdigit() else bindings[f]
    return out


def mul_dims(a, b):
    if a == 1:
        return b
    if b == 1:
        return a
    fa = [f for f in str(a).split("*")]
    fb = [f for f in str(b).split("*")]
    if not all(f in SIZES for f in fa + fb):
        return None
    return "*".join(sorted(fa + fb))


def bcast(a: tuple, b: tuple):
    n = max(len(a), len(b))
    a = (1,) * (n - len(a)) + tuple(a)
    b = (1,) * (n - len(b)) + tuple(b)
    out = []
    for x, y in zip(a, b):
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            return None
    return tuple(out)


def interval_mul(a, b):
    c = [a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]]
    return min(c), max(c)


def lit(x: float) -> str:
    return repr(float(x))


# helpers the oracle's source calls (semantics written from the language reference)
def _topk(x, k, axis):
    v, i = torch.sort(x, dim=axis, descending=True, stable=True)
    return v.narrow(axis, 0, k), i.narrow(axis, 0, k).to(torch.float64)


def _trunc_int(x):
    return torch.trunc(x)


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _softplus(x):
    return torch.where(x > 20, x, torch.log1p(torch.exp(x)))


def _amax(x, axes, keep):
    return torch.amax(x, dim=axes, keepdim=keep)


def _amin(x, axes, keep):
    return torch.amin(x, dim=axes, keepdim=keep)


ORACLE_LIB = {"_topk": _topk, "_trunc": _trunc_int, "_gelu_tanh": _gelu_tanh, "_gelu": _gelu,
              "_softplus": _softplus, "_amax": _amax, "_amin": _amin}


class Gen:
    def __init__(self, seed: int):
        self.r = random.Random(seed)
        self.seed = seed
        r = self.r
        self.dt = r.choices(FLOATS, weights=(6, 3, 2))[0]
        self.bindings = {s: r.choice(v) for s, v in SIZES.items()}
        self.params: list = []
        self.helpers: list = []
        self.helper_sigs: list = []
        self.stmts: list = []
        self.pool: list[Val] = []
        self.k = 0
        self.names: set = set()

    # -- values --------------------------------------------------------------------------------
    def fresh(self, base: str = "v") -> str:
        self.k += 1
        return f"{base}{self.k}"

    def emit(self, dtype, shape, lo, hi, exact, spec, oracle, operands=()) -> Val:
        v = Val(self.fresh(), dtype, tuple(shape), float(lo), float(hi), exact)
        self.stmts.append(Stmt((v,), spec, oracle, tuple(o.name for o in operands)))
        self.pool.append(v)
        return v

    def param(self, dtype, shape, lo=-1.0, hi=1.0, kind="tensor") -> Val:
        # a parameter's shape is symbols and integers (size arithmetic there is not in the language yet)
        need(shape is None or all(not (isinstance(d, str) and "*" in d) for d in shape))
        name = self.fresh("p")
        self.params.append((name, dtype, tuple(shape) if shape is not None else None, kind))
        v = Val(name, dtype, tuple(shape) if shape is not None else (), lo, hi, True)
        if shape is not None:
            self.pool.append(v)
        return v

    def pick(self, pred=lambda v: True):
        cands = [v for v in self.pool if pred(v)]
        return self.r.choice(cands) if cands else None

    def floats(self, pred=lambda v: True):
        return self.pick(lambda v: v.is_float and pred(v))

    # -- the program ---------------------------------------------------------------------------
    def build(self) -> Case:
        r = self.r
        dims = r.choice([("M", "N"), ("M", "N"), ("B", "M", "N")])
        self.domain = dims
        for _ in range(r.randint(1, 3)):
            shape = tuple(d if r.random() < 0.8 else 1 for d in dims[r.randint(0, len(dims) - 1):])
            if all(d == 1 for d in shape):
                shape = (dims[-1],)
            self.param(self.dt, shape)
        if r.random() < 0.3:
            self.helper_ops()
        n = r.randint(3, 15)
        tries = 0
        while len(self.stmts) < n and tries < 400:
            tries += 1
            op = r.choices(OPS, weights=[w for _, w in OPS_W])[0]
            try:
                op(self)
            except _Skip:
                pass
        return self.finish()

    def finish(self) -> Case:
        r = self.r
        produced = [v for st in self.stmts for v in st.outs]
        used = {o for st in self.stmts for o in st.operands}
        # results: unused values of result-friendly shape (sizes a signature can write), and
        # sometimes one more value
        ok = [v for v in produced if printable(v.shape) and (v.is_float or v.exact)]
        outs = [v for v in ok if v.name not in used]
        if not outs and ok:
            outs = [ok[-1]]
        if ok and r.random() < 0.3:
            extra = r.choice(ok)
            if extra not in outs:
                outs.append(extra)
        if not outs:
            p = next(v for v in self.pool if v.name.startswith("p"))
            outs = [self.emit(p.dtype, p.shape, p.lo, p.hi, True, f"abs({p.name})", f"torch.abs({p.name})", (p,))]
        outs = outs[:4]
        return Case(self.seed, self.dt, self.params, self.helpers, self.stmts, outs, self.bindings)

    # -- helper ops (ops calling ops) ----------------------------------------------------------
    def helper_ops(self):
        r = self.r
        dt = self.dt
        name = f"h{len(self.helpers) + 1}"
        body_spec, body_or = r.choice([
            ("tanh(a) * b + a", "torch.tanh(a) * b + a"),
            ("sigmoid(a - b) * 2.0", "torch.sigmoid(a - b) * 2.0"),
            ("maximum(a, b) - minimum(a, b) * 0.5", "torch.maximum(a, b) - torch.minimum(a, b) * 0.5"),
            ("a * rsqrt(mean(a * a, axis=-1, keepdim=true) + 1.0) * b",
             "a * torch.rsqrt((a * a).mean(dim=-1, keepdim=True) + 1.0) * b"),
        ])
        spec = f"op {name}(a: {dt}[P, Q], b: {dt}[Q]) -> {dt}[P, Q] {{\n    return {body_spec}\n}}"
        oracle = f"def {name}(a, b):\n    return {body_or}\n"
        self.helpers.append((spec, oracle))
        self.helper_sigs.append(name)


class _Skip(Exception):
    pass


def need(cond):
    if not cond:
        raise _Skip


def printable(shape) -> bool:
    return all(isinstance(d, int) or re.fullmatch(r"[A-Z](\*[A-Z])*", str(d)) for d in shape)


# -- the operations ---------------------------------------------------------------------------------
UNARY = {
    # name: (oracle, domain rule, range function)
    "abs": ("torch.abs({0})", None, lambda lo, hi: (0.0 if lo <= 0 <= hi else min(abs(lo), abs(hi)), max(abs(lo), abs(hi)))),
    "neg": ("-{0}", None, lambda lo, hi: (-hi, -lo)),
    "exp": ("torch.exp({0})", "small", lambda lo, hi: (math.exp(lo), math.exp(hi))),
    "log": ("torch.log({0})", "positive", lambda lo, hi: (math.log(lo), math.log(hi))),
    "sqrt": ("torch.sqrt({0})", "positive", lambda lo, hi: (math.sqrt(lo), math.sqrt(hi))),
    "rsqrt": ("torch.rsqrt({0})", "positive", lambda lo, hi: (1 / math.sqrt(hi), 1 / math.sqrt(lo))),
    "sin": ("torch.sin({0})", "small", lambda lo, hi: (-1.0, 1.0)),
    "cos": ("torch.cos({0})", "small", lambda lo, hi: (-1.0, 1.0)),
    "tanh": ("torch.tanh({0})", None, lambda lo, hi: (math.tanh(lo), math.tanh(hi))),
    "sigmoid": ("torch.sigmoid({0})", None, lambda lo, hi: (1 / (1 + math.exp(-max(lo, -60))), 1 / (1 + math.exp(-min(hi, 60))))),
    "relu": ("torch.relu({0})", None, lambda lo, hi: (max(lo, 0.0), max(hi, 0.0))),
    "silu": ("torch.nn.functional.silu({0})", None, lambda lo, hi: (min(-0.28, lo), max(hi, 0.0))),
    "gelu": ("_gelu({0})", "moderate", lambda lo, hi: (min(-0.17, lo), max(hi, 0.0))),
    "gelu_tanh": ("_gelu_tanh({0})", "moderate", lambda lo, hi: (min(-0.17, lo), max(hi, 0.0))),
    "softplus": ("_softplus({0})", None, lambda lo, hi: (math.log1p(math.exp(min(lo, 30))) if lo < 30 else lo, hi + 0.7)),
}
EXACT_UNARY = {"abs", "neg", "relu"}


def op_unary(g: Gen):
    name = g.r.choice(list(UNARY))
    oracle, domain, rng = UNARY[name]
    x = g.floats()
    need(x is not None)
    if domain == "small":
        need(x.mag <= SMALL)
    if domain == "positive":
        need(x.lo >= POSITIVE)
    if domain == "moderate":   # gelu's 1 + erf(x / sqrt(2)) cancels below -3 (in any precision)
        need(x.mag <= 3.0)
    lo, hi = rng(x.lo, x.hi)
    spec = f'gelu({x.name}, approximate="tanh")' if name == "gelu_tanh" else \
        f"-{x.name}" if name == "neg" else f"{name}({x.name})"
    exact = x.exact and name in EXACT_UNARY
    g.emit(x.dtype, x.shape, lo, hi, exact, spec, oracle.format(x.name), (x,))


def scalar_operand(g: Gen, dtype: str):
    """A literal, a scalar parameter or a size used as a value: (spec, oracle, lo, hi)."""
    r = g.r
    kind = r.choice(("lit", "lit", "param", "size"))
    if kind == "lit":
        v = r.choice((0.5, 2.0, -1.5, 3.0, 0.25, -0.75))
        return lit(v), lit(v), v, v
    if kind == "param":
        name = g.fresh("s")
        g.params.append((name, "f32", None, "scalar"))
        return name, name, 0.25, 1.5
    bound = sorted({d for _, _, shp, _ in g.params if shp for d in shp if isinstance(d, str) and d in SIZES})
    need(bound)
    s = r.choice(bound)
    return f"cast({s}, f32)", f"float({s})", float(min(SIZES[s])), float(max(SIZES[s]))


def op_binary(g: Gen):
    r = g.r
    op = r.choice(("+", "-", "*", "*", "/", "maximum", "minimum", "**"))
    x = g.floats()
    need(x is not None)
    use_scalar = r.random() < 0.35
    if use_scalar:
        ys, yo, ylo, yhi = scalar_operand(g, x.dtype)
        shape = x.shape
        y = None
    else:
        y = g.floats(lambda v: v.dtype == x.dtype and bcast(v.shape, x.shape) is not None)
        need(y is not None)
        ys, yo, ylo, yhi = y.name, y.name, y.lo, y.hi
        shape = bcast(x.shape, y.shape)
    if op == "**":
        e = r.choice((2, 3, 0.5, -1, 1.5))
        if e != int(e) or e < 0:
            need(x.lo >= POSITIVE)
        lo, hi = sorted((x.lo ** e, x.hi ** e)) if x.lo >= 0 else (
            (0.0 if e % 2 == 0 else x.lo ** e), max(x.lo ** e, x.hi ** e))
        if e % 2 == 0 and x.lo < 0:
            lo, hi = 0.0, max(x.lo ** e, x.hi ** e)
        need(max(abs(lo), abs(hi)) <= MAG[x.dtype])     # (seed 6793: a square past f16's range)
        g.emit(x.dtype, x.shape, lo, hi, False, f"{x.name} ** {lit(e) if e != int(e) else int(e)}",
               f"{x.name} ** {float(e)}", (x,))
        return
    if op in ("maximum", "minimum"):
        fn = max if op == "maximum" else min
        lo, hi = fn(x.lo, ylo), fn(x.hi, yhi)
        exact = x.exact and (y is None or y.exact)
        g.emit(x.dtype, shape, lo, hi, exact, f"{op}({x.name}, {ys})", f"torch.{op}({x.name}, torch.as_tensor({yo}, dtype=torch.float64))",
               (x,) + ((y,) if y else ()))
        return
    if op == "/":
        need(ylo >= POSITIVE)
        lo, hi = interval_mul((x.lo, x.hi), (1 / yhi, 1 / ylo))
    elif op == "*":
        lo, hi = interval_mul((x.lo, x.hi), (ylo, yhi))
    elif op == "+":
        lo, hi = x.lo + ylo, x.hi + yhi
    else:
        lo, hi = x.lo - yhi, x.hi - ylo
    need(max(abs(lo), abs(hi)) <= MAG[x.dtype])
    swap = op in "+*" and r.random() < 0.5
    spec = f"{ys} {op} {x.name}" if swap else f"{x.name} {op} {ys}"
    oracle = f"({yo}) {op} {x.name}" if swap else f"{x.name} {op} ({yo})"
    g.emit(x.dtype, shape, lo, hi, False, spec, oracle, (x,) + ((y,) if y else ()))


def op_where(g: Gen):
    r = g.r
    c = g.pick(lambda v: v.exact and v.dtype in FLOATS + ("i32",))
    need(c is not None)
    cmp = r.choice(("<", "<=", ">", ">=", "==", "!="))
    thr = r.choice((0.0, 0.25, -0.5, 1.0)) if c.is_float else r.choice((0, 1, -1))
    a = g.floats(lambda v: bcast(v.shape, c.shape) is not None)
    need(a is not None)
    b = g.floats(lambda v: v.dtype == a.dtype and bcast(v.shape, bcast(c.shape, a.shape) or ()) is not None)
    need(b is not None)
    shape = bcast(bcast(c.shape, a.shape), b.shape)
    need(shape is not None)
    cond = f"{c.name} {cmp} {thr if c.dtype == 'i32' else lit(thr)}"
    if r.random() < 0.3:
        bv = g.emit("bool", c.shape, 0, 1, True, cond, f"{c.name} {cmp} {thr}", (c,))
        cs, co, ops = bv.name, bv.name, (bv,)
    else:
        cs, co, ops = cond, f"({c.name} {cmp} {thr})", (c,)
    g.emit(a.dtype, shape, min(a.lo, b.lo), max(a.hi, b.hi), a.exact and b.exact,
           f"where({cs}, {a.name}, {b.name})", f"torch.where({co}, {a.name}, {b.name})", ops + (a, b))


def op_cast(g: Gen):
    r = g.r
    x = g.pick()
    need(x is not None)
    if x.dtype == "bool":
        to = r.choice(FLOATS + ("i32",))
        g.emit(to, x.shape, 0.0, 1.0, True, f"cast({x.name}, {to})", f"{x.name}.to(torch.float64)", (x,))
        return
    if x.dtype == "i32":
        to = r.choice(("f32", g.dt, "bool"))
        if to == "bool":
            g.emit("bool", x.shape, 0, 1, True, f"cast({x.name}, bool)", f"({x.name} != 0)", (x,))
        else:
            g.emit(to, x.shape, x.lo, x.hi, True, f"cast({x.name}, {to})", x.name, (x,))
        return
    to = r.choice(FLOATS + ("i32", "bool"))
    if to == x.dtype:
        raise _Skip
    if to in ("i32", "bool"):
        need(x.exact)
        if to == "bool":
            g.emit("bool", x.shape, 0, 1, True, f"cast({x.name}, bool)", f"({x.name} != 0)", (x,))
        else:
            need(x.mag <= 1e5)
            g.emit("i32", x.shape, math.trunc(x.lo), math.trunc(x.hi), True, f"cast({x.name} * 4.0, i32)",
                   f"_trunc({x.name} * 4.0)", (x,))
        return
    need(x.mag <= MAG[to])
    # to a narrow float the oracle rounds as the cast does (round to nearest even, as torch):
    # a mean of rounded values that cancels is then the same program on both sides
    oracle = x.name if to == "f32" else f"{x.name}.to({TORCH[to]}).to(torch.float64)"    # str: torch.bfloat16
    g.emit(to, x.shape, x.lo, x.hi, x.exact, f"cast({x.name}, {to})", oracle, (x,))


def op_logic(g: Gen):
    """Logical operators on bools (exact values only, so no rounding flips them), written
    without parentheses around comparisons (& and | bind more loosely), and masks built from
    positions: arange along a value's last axis, compared directly or after a floor division."""
    r = g.r
    kind = r.choice(("and", "or", "not", "cmp", "pos", "pos"))
    if kind == "pos":
        x = g.pick(lambda v: v.rank >= 1 and (isinstance(v.shape[-1], int) or v.shape[-1] in SIZES))
        need(x is not None)
        d = x.shape[-1]
        k, cmp = r.choice((0, 1, 2, 5)), r.choice(("<", "<=", ">", ">=", "==", "!="))
        if r.random() < 0.5:
            c = r.choice((2, 3))
            spec = f"arange({d}) // {c} {cmp} {k}"
            oracle = f"(torch.div(torch.arange({d}), {c}, rounding_mode='floor') {cmp} {k})"
        else:
            spec, oracle = f"arange({d}) {cmp} {k}", f"(torch.arange({d}) {cmp} {k})"
        g.emit("bool", (d,), 0, 1, True, spec, oracle, ())
        return
    if kind == "cmp":
        c = g.pick(lambda v: v.exact and v.dtype in FLOATS + ("i32",))
        b = g.pick(lambda v: v.dtype == "bool" and c is not None and bcast(v.shape, c.shape) is not None)
        need(c is not None and b is not None)
        thr = lit(0.25) if c.is_float else "1"
        op = r.choice(("&", "|"))
        g.emit("bool", bcast(c.shape, b.shape), 0, 1, True, f"{c.name} > {thr} {op} {b.name}",
               f"(({c.name} > {thr}) {op} {b.name})", (c, b))
        return
    a = g.pick(lambda v: v.dtype == "bool")
    need(a is not None)
    if kind == "not":
        g.emit("bool", a.shape, 0, 1, True, f"~{a.name}", f"(~{a.name})", (a,))
        return
    b = g.pick(lambda v: v.dtype == "bool" and bcast(v.shape, a.shape) is not None)
    need(b is not None)
    op = "&" if kind == "and" else "|"
    g.emit("bool", bcast(a.shape, b.shape), 0, 1, True, f"{a.name} {op} {b.name}", f"({a.name} {op} {b.name})", (a, b))


def op_int_arith(g: Gen):
    r = g.r
    x = g.pick(lambda v: v.dtype == "i32")
    need(x is not None)
    op = r.choice(("+", "*", "-", "maximum", "abs"))
    k = r.choice((1, 2, 3, -2))
    if op == "abs":
        g.emit("i32", x.shape, 0, x.mag, True, f"abs({x.name})", f"torch.abs({x.name})", (x,))
        return
    if op == "maximum":
        g.emit("i32", x.shape, max(x.lo, k), max(x.hi, k), True, f"maximum({x.name}, {k})",
               f"torch.clamp_min({x.name}, {k})", (x,))
        return
    lo, hi = {"+": (x.lo + k, x.hi + k), "-": (x.lo - k, x.hi - k)}.get(op, interval_mul((x.lo, x.hi), (k, k)))
    need(max(abs(lo), abs(hi)) < 1e6)
    g.emit("i32", x.shape, lo, hi, True, f"{x.name} {op} {k}", f"{x.name} {op} {k}", (x,))


def axes_choice(r, rank):
    if rank == 0:
        raise _Skip
    kind = r.random()
    if kind < 0.5:
        return r.randrange(rank) - (rank if r.random() < 0.5 else 0)
    if kind < 0.8 and rank >= 2:
        return tuple(sorted(r.sample(range(rank), r.randint(1, rank))))
    return None


def norm_axes(axis, rank):
    if axis is None:
        return tuple(range(rank))
    axes = axis if isinstance(axis, tuple) else (axis,)
    return tuple(sorted(a % rank for a in axes))


def axis_text(axis) -> str:
    if axis is None:
        return ""
    if isinstance(axis, tuple):
        return f", axis=({', '.join(map(str, axis))}{',' if len(axis) == 1 else ''})"
    return f", axis={axis}"


def op_reduce(g: Gen):
    r = g.r
    name = r.choice(("sum", "mean", "max", "min", "sum", "max"))
    x = g.pick(lambda v: v.rank >= 1 and (v.is_float or (v.dtype == "i32" and name != "mean")))
    need(x is not None)
    axis = axes_choice(r, x.rank)
    keep = r.random() < 0.5
    axes = norm_axes(axis, x.rank)
    shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape)) if keep else \
        tuple(d for i, d in enumerate(x.shape) if i not in axes)
    count = 1
    for i in axes:
        count *= max(dim_value_max(x.shape[i]), 1)
    if name in ("max", "min"):
        lo, hi = x.lo, x.hi
        exact = x.exact
    elif name == "mean":
        lo, hi = x.lo, x.hi
        exact = False
    else:
        lo, hi = x.lo * count if x.lo < 0 else 0.0, x.hi * count if x.hi > 0 else 0.0
        lo = min(lo, x.lo)
        hi = max(hi, x.hi)
        exact = x.dtype == "i32"
    need(max(abs(lo), abs(hi)) <= MAG[x.dtype])
    keep_s = ", keepdim=true" if keep else ""
    dims = list(axes)
    if name in ("max", "min"):
        oracle = f"_a{name}({x.name}, {dims}, {keep})"
    elif name == "mean":
        oracle = f"{x.name}.mean(dim={dims}, keepdim={keep})"
    else:
        oracle = f"{x.name}.sum(dim={dims}, keepdim={keep})"
    g.emit(x.dtype, shape, lo, hi, exact, f"{name}({x.name}{axis_text(axis)}{keep_s})", oracle, (x,))


def dim_value_max(d) -> int:
    if isinstance(d, int):
        return d
    if str(d).startswith("~"):
        return 4 * max(max(v) for v in SIZES.values())   # a slice or concat of something: a bound
    out = 1
    for f in str(d).split("*"):
        out *= int(f) if f.isdigit() else max(SIZES[f])
    return out


def op_softmax(g: Gen):
    r = g.r
    x = g.floats(lambda v: v.rank >= 1 and v.mag <= 50)
    need(x is not None)
    axis = r.randrange(x.rank) - (x.rank if r.random() < 0.5 else 0)
    if r.random() < 0.6:
        g.emit(x.dtype, x.shape, 0.0, 1.0, False, f"softmax({x.name}, axis={axis})",
               f"torch.softmax({x.name}, dim={axis})", (x,))
    else:
        n = dim_value_max(x.shape[axis])
        lo = -(x.hi - x.lo) - math.log(max(n, 1))
        g.emit(x.dtype, x.shape, lo, 0.0, False, f"log_softmax({x.name}, axis={axis})",
               f"torch.log_softmax({x.name}, dim={axis})", (x,))


def op_cumsum(g: Gen):
    r = g.r
    x = g.pick(lambda v: v.rank >= 1 and (v.is_float or v.dtype == "i32"))
    need(x is not None)
    axis = r.randrange(x.rank)
    n = dim_value_max(x.shape[axis])
    lo, hi = min(x.lo, x.lo * n), max(x.hi, x.hi * n)
    need(max(abs(lo), abs(hi)) <= MAG[x.dtype])
    g.emit(x.dtype, x.shape, lo, hi, x.dtype == "i32", f"cumsum({x.name}, axis={axis})",
           f"torch.cumsum({x.name}, dim={axis})", (x,))


def op_matmul(g: Gen):
    r = g.r
    dt = g.dt
    x = g.floats(lambda v: v.rank >= 2 and v.dtype == dt and v.mag <= 8)
    need(x is not None)
    kdim = x.shape[-1]
    need(kdim != 1 and printable((kdim,)))
    if r.random() < 0.6:
        # x @ w.T with a weight parameter [N', K]
        out_dim = r.choice(("N", "M", 7, "K"))
        w = g.param(dt, (out_dim, kdim))
        spec, oracle, shape = f"{x.name} @ {w.name}.T", f"{x.name} @ {w.name}.T", x.shape[:-1] + (out_dim,)
        ops = (x, w)
        klen, wmag = dim_value_max(kdim), 1.0
    else:
        y = g.floats(lambda v: v.rank >= 2 and v.dtype == dt and v.shape[-1] == kdim and v.mag <= 8
                     and bcast(v.shape[:-2], x.shape[:-2]) is not None and v is not x or
                     (v is x and v.rank >= 2))
        need(y is not None)
        batch = bcast(x.shape[:-2], y.shape[:-2])
        need(batch is not None)
        spec, oracle = f"{x.name} @ {y.name}.T", f"{x.name} @ {y.name}.transpose(-2, -1)"
        shape = batch + (x.shape[-2], y.shape[-2])
        ops = (x, y)
        klen, wmag = dim_value_max(kdim), y.mag
    mag = klen * x.mag * wmag
    need(mag <= MAG[dt])
    g.emit(dt, shape, -mag, mag, False, spec, oracle, ops)


def op_view(g: Gen):
    r = g.r
    x = g.pick(lambda v: v.rank >= 1)
    need(x is not None)
    kind = r.choice(("T", "permute", "transpose", "unsqueeze", "merge", "flatten", "slice", "index", "split"))
    keep = dict(lo=x.lo, hi=x.hi, exact=x.exact)
    if kind == "T":
        need(x.rank >= 2)
        shape = x.shape[:-2] + (x.shape[-1], x.shape[-2])
        g.emit(x.dtype, shape, spec=f"{x.name}.T", oracle=f"{x.name}.transpose(-2, -1)", operands=(x,), **keep)
    elif kind == "permute":
        need(x.rank >= 2)
        perm = list(range(x.rank))
        r.shuffle(perm)
        g.emit(x.dtype, tuple(x.shape[p] for p in perm), spec=f"permute({x.name}, {perm})",
               oracle=f"{x.name}.permute({perm})", operands=(x,), **keep)
    elif kind == "transpose":
        need(x.rank >= 2)
        a, b = r.sample(range(x.rank), 2)
        shape = list(x.shape)
        shape[a], shape[b] = shape[b], shape[a]
        g.emit(x.dtype, tuple(shape), spec=f"transpose({x.name}, {a}, {b})",
               oracle=f"{x.name}.transpose({a}, {b})", operands=(x,), **keep)
    elif kind == "unsqueeze":
        need(x.rank <= 3)
        at = r.randrange(x.rank + 1)
        idx = [":"] * x.rank
        idx.insert(at, "None")
        shape = list(x.shape)
        shape.insert(at, 1)
        g.emit(x.dtype, tuple(shape), spec=f"{x.name}[{', '.join(idx)}]", oracle=f"{x.name}[{', '.join(idx)}]",
               operands=(x,), **keep)
    elif kind in ("merge", "flatten"):
        need(x.rank >= 2)
        if kind == "flatten":
            d = 1
            for s in x.shape:
                d = mul_dims(d, s)
                need(d is not None)
            shape = (d,)
        else:
            a = r.randrange(x.rank - 1)
            d = mul_dims(x.shape[a], x.shape[a + 1])
            need(d is not None)
            shape = x.shape[:a] + (d,) + x.shape[a + 2:]
        need(printable(shape))
        dims = ", ".join(dim_text(s) for s in shape)
        g.emit(x.dtype, shape, spec=f"reshape({x.name}, [{dims}])",
               oracle=f"{x.name}.reshape({', '.join(_py_dim(s) for s in shape)})", operands=(x,), **keep)
    elif kind == "split":
        # undo a merge: a product axis back into its factors
        a = next((i for i, s in enumerate(x.shape) if isinstance(s, str) and "*" in s), None)
        need(a is not None)
        parts = tuple(x.shape[a].split("*"))
        shape = x.shape[:a] + parts + x.shape[a + 1:]
        need(len(shape) <= 4)
        dims = ", ".join(dim_text(s) for s in shape)
        g.emit(x.dtype, shape, spec=f"reshape({x.name}, [{dims}])",
               oracle=f"{x.name}.reshape({', '.join(_py_dim(s) for s in shape)})", operands=(x,), **keep)
    elif kind == "slice":
        a = r.randrange(x.rank)
        d = x.shape[a]
        need(d != 1)
        start, step = r.choice(((1, 1), (0, 2), (1, 2), (0, 1)))
        need((start, step) != (0, 1))
        idx = [":"] * x.rank
        idx[a] = f"{start}::{step}" if step != 1 else f"{start}:"
        shape = list(x.shape)
        shape[a] = f"~{d}:{start}:{step}"       # not printable: reduced or concatenated away
        need(dim_min(d) > start)
        # a stepped slice of a symbolic axis needs (size - start) to divide by the step (a
        # documented limit, checked at call time): only where the case's sizes allow it
        need(step == 1 or (printable((d,)) and (dim_value(d, g.bindings) - start) % step == 0))
        g.emit(x.dtype, tuple(shape), spec=f"{x.name}[{', '.join(idx)}]", oracle=f"{x.name}[{', '.join(idx)}]",
               operands=(x,), **keep)
    else:   # an integer index
        a = r.randrange(x.rank)
        need(x.rank >= 2)
        i = r.choice((0, -1)) if dim_min(x.shape[a]) >= 1 else 0
        idx = [":"] * x.rank
        idx[a] = str(i)
        shape = x.shape[:a] + x.shape[a + 1:]
        g.emit(x.dtype, shape, spec=f"{x.name}[{', '.join(idx)}]", oracle=f"{x.name}[{', '.join(idx)}]",
               operands=(x,), **keep)


def dim_min(d) -> int:
    if isinstance(d, int):
        return d
    if str(d).startswith("~"):
        return 1
    out = 1
    for f in str(d).split("*"):
        out *= int(f) if f.isdigit() else min(SIZES[f])
    return out


def _py_dim(d) -> str:
    return str(d) if not isinstance(d, str) else "(" + str(d) + ")"


def op_concat(g: Gen):
    r = g.r
    x = g.pick(lambda v: v.rank >= 1)
    need(x is not None)
    axis = r.randrange(x.rank)
    # the other half of a slice of the same value (so the result has a size a signature writes),
    # or any value of the same type but along the axis
    y = g.pick(lambda v: v.dtype == x.dtype and v.rank == x.rank and all(
        v.shape[i] == x.shape[i] for i in range(x.rank) if i != axis))
    need(y is not None)
    d = f"~cat({x.shape[axis]},{y.shape[axis]})"
    shape = x.shape[:axis] + (d,) + x.shape[axis + 1:]
    g.emit(x.dtype, shape, min(x.lo, y.lo), max(x.hi, y.hi), x.exact and y.exact,
           f"concat({x.name}, {y.name}, axis={axis})", f"torch.cat([{x.name}, {y.name}], dim={axis})", (x, y))


def op_gather(g: Gen):
    emb = g.param(g.dt, ("V", g.r.choice(("N", "K"))))
    ids = g.param("i32", (g.r.choice(("M", "B")),), lo=0, hi=0, kind="ids")
    g.pool.remove(ids)
    g.emit(g.dt, ids_shape(ids) + emb.shape[1:], emb.lo, emb.hi, True, f"{emb.name}[{ids.name}]",
           f"{emb.name}[{ids.name}.long()]", (emb, ids))


def ids_shape(ids: Val) -> tuple:
    return ids.shape


def op_topk(g: Gen):
    r = g.r
    x = g.floats(lambda v: v.rank >= 1)
    need(x is not None)
    axis = -1 if r.random() < 0.7 else r.randrange(x.rank)
    d = x.shape[axis]
    k = r.choice((1, 2, 3))
    need(dim_min(d) >= k)
    vals = Val(g.fresh(), x.dtype, x.shape[:axis % x.rank] + (k,) + x.shape[axis % x.rank + 1:], x.lo, x.hi, x.exact)
    idx = Val(g.fresh(), "i32", vals.shape, 0, dim_value_max(d), x.exact)
    g.stmts.append(Stmt((vals, idx), f"topk({x.name}, k={k}, axis={axis})", f"_topk({x.name}, {k}, {axis})",
                        (x.name,)))
    g.pool.append(vals)
    if x.exact:
        g.pool.append(idx)


def op_helper(g: Gen):
    need(g.helper_sigs)
    name = g.r.choice(g.helper_sigs)
    a = g.floats(lambda v: v.rank == 2 and v.dtype == g.dt and v.mag <= 50)
    need(a is not None)
    b = g.floats(lambda v: v.rank == 1 and v.dtype == g.dt and v.shape[0] == a.shape[1] and v.mag <= 50)
    if b is None:
        need(printable(a.shape[1:]))
        b = g.param(g.dt, (a.shape[1],))
    mag = 4 * (a.mag + 1) * (b.mag + 1)
    need(mag <= MAG[g.dt])
    g.emit(g.dt, a.shape, -mag, mag, False, f"{name}({a.name}, {b.name})", f"{name}({a.name}, {b.name})", (a, b))


def op_squash(g: Gen):
    """Bring a large value back to a small range (keeps long programs well conditioned)."""
    x = g.floats(lambda v: v.mag > SMALL)
    need(x is not None)
    g.emit(x.dtype, x.shape, -1.0, 1.0, False, f"tanh({x.name} * {lit(1.0 / x.mag)})",
           f"torch.tanh({x.name} * {lit(1.0 / x.mag)})", (x,))


OPS_W = [(op_unary, 14), (op_binary, 16), (op_where, 5), (op_cast, 6), (op_int_arith, 2), (op_reduce, 9),
         (op_softmax, 4), (op_cumsum, 2), (op_matmul, 6), (op_view, 10), (op_concat, 2), (op_gather, 1),
         (op_topk, 2), (op_helper, 3), (op_squash, 4), (op_logic, 4)]
OPS = [f for f, _ in OPS_W]


def generate(seed: int) -> Case:
    return Gen(seed).build()


# -- running a case ---------------------------------------------------------------------------------
def inputs_for(case: Case) -> dict:
    gen = torch.Generator().manual_seed(case.seed)
    out = {}
    for name, dt, shape, kind in case.params:
        if shape is None:
            out[name] = round(0.25 + 1.25 * float(torch.rand((), generator=gen)), 4)
            continue
        sizes = [dim_value(d, case.bindings) for d in shape]
        if kind == "ids":
            out[name] = torch.randint(0, case.bindings["V"], sizes, generator=gen, dtype=torch.int32)
        else:
            out[name] = (torch.rand(sizes, generator=gen, dtype=torch.float64) * 2 - 1).to(TORCH[dt])
    return out


@dataclass
class Outcome:
    ok: bool
    kind: str            # "ok" | "mismatch" | "crash"
    message: str


def check(case: Case, namespace: str) -> Outcome:
    """Compile and run the case; compare every output with the oracle."""
    import opforge
    from opforge.runtime.tolerances import compare, tolerance_for
    inputs = inputs_for(case)
    try:
        mod = opforge.compile(case.spec(), namespace=namespace)
        op = mod.main
        outs = op(*[inputs[n] for n, *_ in case.params])
    except Exception as e:     # a crash is a bug: the spec is valid by construction
        return Outcome(False, "crash", f"{type(e).__name__}: {str(e)[:2000]}")
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    refs = case.oracle(inputs)
    tol = tolerance_for(op.graph)
    for i, (o, ref, v) in enumerate(zip(outs, refs, case.outputs)):
        if o.dtype != TORCH[v.dtype]:
            return Outcome(False, "mismatch", f"output {i} ({v.name}): dtype {o.dtype}, the spec says {v.dtype}")
        ref = torch.as_tensor(ref)
        if v.is_float:
            c = compare(o, ref.to(torch.float64), tol)
            ok, msg = c.ok, c.message
        else:
            ok, msg = _exact(o, ref)
        if not ok:
            return Outcome(False, "mismatch", f"output {i} ({v.name}): {msg}")
    return Outcome(True, "ok", "")


def _exact(o, ref):
    o64, r64 = o.to(torch.float64), ref.to(torch.float64)
    if tuple(o64.shape) != tuple(r64.shape):
        return False, f"shape {tuple(o64.shape)} against {tuple(r64.shape)}"
    bad = o64 != r64
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        return False, f"{int(bad.sum())} elements differ, first at {idx}: {float(o64[idx])} vs {float(r64[idx])}"
    return True, "exact"


# -- shrinking a failure, and keeping it -------------------------------------------------------------
def _rename(text: str, old: str, new: str) -> str:
    return re.sub(rf"\b{re.escape(old)}\b", new, text)


def without_dead(case: Case) -> Case:
    """Statements no output needs, and parameters nothing reads, removed."""
    live = {v.name for v in case.outputs}
    keep = []
    for st in reversed(case.stmts):
        if any(v.name in live for v in st.outs):
            keep.append(st)
            live.update(st.operands)
            live.update(re.findall(r"\b[ps]\d+\b", st.spec))
    keep.reverse()
    params = [p for p in case.params if p[0] in live]
    return replace(case, stmts=keep, params=params)


def simplifications(case: Case):
    """Smaller programs: one output only; a statement replaced by one of its operands of the
    same type (its uses renamed); dead code dropped after each."""
    if len(case.outputs) > 1:
        for v in case.outputs:
            yield without_dead(replace(case, outputs=[v]))
    vals = {v.name: v for st in case.stmts for v in st.outs}
    params = {n: Val(n, dt, tuple(shp), -1, 1, True) for n, dt, shp, _ in case.params if shp is not None}
    for i in reversed(range(len(case.stmts))):
        st = case.stmts[i]
        if len(st.outs) != 1:
            continue
        v = st.outs[0]
        for name in st.operands:
            u = vals.get(name) or params.get(name)
            if u is None or u.dtype != v.dtype or tuple(u.shape) != tuple(v.shape):
                continue
            rest = [Stmt(s.outs, _rename(s.spec, v.name, u.name), _rename(s.oracle, v.name, u.name),
                         tuple(u.name if o == v.name else o for o in s.operands)) for s in case.stmts[i + 1:]]
            outs = [u if o.name == v.name else o for o in case.outputs]
            if len({o.name for o in outs}) != len(outs):
                continue
            yield without_dead(replace(case, stmts=case.stmts[:i] + rest, outputs=outs))


def minimize(case: Case, fails, budget: int = 200) -> Case:
    """The smallest program found (greedily) for which ``fails(case)`` still holds."""
    case = without_dead(case) if fails(without_dead(case)) else case
    changed = True
    while changed and budget > 0:
        changed = False
        for cand in simplifications(case):
            budget -= 1
            if fails(cand):
                case, changed = cand, True
                break
            if budget <= 0:
                break
    return case


def to_json(case: Case) -> dict:
    def val(v: Val):
        return [v.name, v.dtype, list(v.shape), v.lo, v.hi, v.exact]
    return {"seed": case.seed, "dtype": case.dtype, "bindings": case.bindings,
            "params": [[n, dt, list(shp) if shp is not None else None, kind] for n, dt, shp, kind in case.params],
            "helpers": [list(h) for h in case.helpers],
            "stmts": [[[val(v) for v in st.outs], st.spec, st.oracle, list(st.operands)] for st in case.stmts],
            "outputs": [val(v) for v in case.outputs]}


def from_json(d: dict) -> Case:
    def val(x):
        return Val(x[0], x[1], tuple(x[2]), x[3], x[4], x[5])
    return Case(d["seed"], d["dtype"], [(n, dt, tuple(shp) if shp is not None else None, kind)
                                        for n, dt, shp, kind in d["params"]],
                [tuple(h) for h in d["helpers"]],
                [Stmt(tuple(val(v) for v in outs), spec, oracle, tuple(ops)) for outs, spec, oracle, ops in d["stmts"]],
                [val(v) for v in d["outputs"]], dict(d["bindings"]))


def failure_signature(outcome: Outcome) -> tuple:
    """What a shrunk program must keep failing with: a mismatch, or a crash of the same type."""
    return (outcome.kind, outcome.message.split(":")[0] if outcome.kind == "crash" else "")


def campaign(seeds, namespace: str = "campaign", shrink: bool = True, log=print) -> dict:
    """Generate, check and (for failures) shrink; returns counts and the failures found."""
    counts = {"ok": 0, "mismatch": 0, "crash": 0}
    failures = []
    k = 0
    for seed in seeds:
        case = generate(seed)
        out = check(case, f"{namespace}_{seed}")
        counts[out.kind] += 1
        if out.ok:
            continue
        sig = failure_signature(out)
        if shrink:
            def fails(c, sig=sig):
                nonlocal k
                k += 1
                o = check(c, f"{namespace}_{seed}_m{k}")
                return not o.ok and failure_signature(o) == sig
            case = minimize(case, fails)
            out = check(case, f"{namespace}_{seed}_final")
        failures.append((case, out))
        log(f"seed {seed}: {out.kind}: {out.message[:500]}\n{case.spec()}")
    return {"counts": counts, "failures": failures}


def main(argv=None) -> int:
    """python -m opforge.tests.specgen START COUNT [--save DIR]: run a campaign of fresh seeds,
    shrink every failure, and (with --save) write each as a regression case."""
    import argparse
    import json
    import time
    from pathlib import Path
    ap = argparse.ArgumentParser(prog="python -m opforge.tests.specgen")
    ap.add_argument("start", type=int)
    ap.add_argument("count", type=int)
    ap.add_argument("--save", default=None, help="directory for the shrunk failures (tests/regressions)")
    args = ap.parse_args(argv)
    t0 = time.time()
    res = campaign(range(args.start, args.start + args.count))
    for case, out in res["failures"]:
        if args.save:
            path = Path(args.save) / f"seed_{case.seed}.json"
            path.write_text(json.dumps(to_json(case), indent=1) + "\n")
            print(f"saved {path}")
    c = res["counts"]
    print(f"{args.count} specs (seeds {args.start}..{args.start + args.count - 1}): {c['ok']} ok, "
          f"{c['mismatch']} mismatches, {c['crash']} crashes, {time.time() - t0:.0f} s")
    return 0 if not res["failures"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
