"""Elementwise primitives: unary math, binary arithmetic and comparisons, ``where``, ``cast``,
and the scalar sources (literals and symbolic sizes used as values).

Arithmetic on 16- and 8-bit floats happens in f32 and is rounded once per primitive, as
PyTorch's GPU kernels do; the tile lowering keeps fused chains in f32 and rounds at stores
and explicit casts.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from . import rules
from . import vjp as V
from .registry import Arg, Kind, RuleError, primitive
from .types import DType, ScalarType, TensorType

X = Arg("x", "tensor")


def _unary_rule(name: str, float_only: bool):
    def infer(types, attrs):
        (t,) = types
        (rules.need_float if float_only else rules.need_numeric)(t, name)
        return [t]
    return infer


def _unary_ref(fn):
    def ref(ctx, inputs, attrs, out_types, in_types):
        (x,) = inputs
        out = out_types[0].dtype
        return fn(x.to(ctx.compute_dt(out)), **attrs).to(ctx.dt(out))
    return ref


def _gelu(x, approximate="none"):
    return F.gelu(x, approximate=approximate)


UNARY = {
    # name: (torch function, floating-point only, doc)
    "abs": (torch.abs, False, "absolute value"),
    "neg": (torch.neg, False, "negation (unary minus)"),
    "exp": (torch.exp, True, "e ** x"),
    "log": (torch.log, True, "natural logarithm"),
    "sqrt": (torch.sqrt, True, "square root"),
    "rsqrt": (torch.rsqrt, True, "1 / sqrt(x)"),
    "sin": (torch.sin, True, "sine"),
    "cos": (torch.cos, True, "cosine"),
    "tanh": (torch.tanh, True, "hyperbolic tangent"),
    "sigmoid": (torch.sigmoid, True, "1 / (1 + exp(-x))"),
    "relu": (torch.relu, False, "max(x, 0)"),
    "silu": (F.silu, True, "x * sigmoid(x)"),
    "softplus": (F.softplus, True, "log(1 + exp(x))"),
}

# -- tile lowerings: (builder, operand tiles, attrs) -> tile. Triton's core has no tanh or
# log1p (and the interpreter no libdevice), so those are written out, accurate to a few ulps of
# f32 everywhere (2 * sigmoid(2x) - 1 or log(1 + exp(x)) lose every digit of small results).
TANH_SMALL = 0.625
# Cephes' tanhf: tanh(x) = x + x * z * P(z), z = x * x, for |x| < 0.625
TANH_P = (-5.70498872745e-3, 2.06390887954e-2, -5.37397155531e-2, 1.33314422036e-1, -3.33332819422e-1)


def _t_tanh(b, x):
    x = b.let(b.widen(x), "tanh_x")
    z = b.let(b.mul(x, x), "tanh_z")
    poly = b.const(TANH_P[0])
    for c in TANH_P[1:]:
        poly = b.add(b.mul(poly, z), c)
    small = b.add(b.mul(b.mul(poly, z), x), x)
    ax = b.unary("abs", x)
    big = b.sub(1.0, b.truediv(2.0, b.add(b.unary("exp", b.mul(2.0, ax)), 1.0)))
    big = b.where(b.binop("lt", x, 0.0), b.unary("neg", big), big)
    return b.where(b.binop("lt", ax, TANH_SMALL), small, big)


def _t_log1p(b, y):
    """log(1 + y) without losing small y: log(u) * y / (u - 1) with u = 1 + y rounded (the
    rounding error of u cancels; Goldberg's trick), and y itself where u rounds to 1."""
    y = b.let(y, "log1p_y")
    u = b.let(b.add(1.0, y), "log1p_u")
    return b.where(b.binop("eq", u, 1.0), y, b.mul(b.unary("log", u), b.truediv(y, b.sub(u, 1.0))))


def _t_softplus(b, x):
    """log(1 + exp(x)) as max(x, 0) + log1p(exp(-|x|)); torch returns x itself above 20."""
    x = b.let(b.widen(x), "softplus_x")
    soft = b.add(b.maximum(x, 0.0), _t_log1p(b, b.unary("exp", b.unary("neg", b.unary("abs", x)))))
    return b.where(b.binop("gt", x, 20.0), x, soft)


def _t_gelu(b, x, approximate="none"):
    x = b.widen(x)
    if approximate == "tanh":
        inner = b.mul(0.7978845608028654, b.add(x, b.mul(0.044715, b.mul(x, b.mul(x, x)))))
        # 0.5 * x * (1 + tanh(u)) is x * sigmoid(2u): the same value, without the cancellation
        # of 1 + tanh(u) for negative u
        return b.mul(x, b.unary("sigmoid", b.mul(2.0, inner)))
    return b.mul(b.mul(0.5, x), b.add(1.0, b.unary("erf", b.mul(x, 0.7071067811865476))))


UNARY_TILE = {
    "abs": lambda b, x: b.unary("abs", x),
    "neg": lambda b, x: b.unary("neg", x),
    "exp": lambda b, x: b.unary("exp", x),
    "log": lambda b, x: b.unary("log", x),
    "sqrt": lambda b, x: b.unary("sqrt", x),
    "rsqrt": lambda b, x: b.unary("rsqrt", x),
    "sin": lambda b, x: b.unary("sin", x),
    "cos": lambda b, x: b.unary("cos", x),
    "tanh": _t_tanh,
    "sigmoid": lambda b, x: b.unary("sigmoid", x),
    "relu": lambda b, x: b.maximum(x, 0),
    "silu": lambda b, x: b.mul(b.widen(x), b.unary("sigmoid", x)),
    "softplus": _t_softplus,
}

# -- gradients: dx from (emitter, x, y = f(x), dy) --------------------------------------------
def _e(e, op, *xs, **attrs):
    """One node: operands may be Values or Python numbers (f32 literals)."""
    return e(op, [x if not isinstance(x, (int, float)) else V.const(e, x) for x in xs], attrs or None)


def _d_abs(e, x, y, dy):
    return _e(e, "where", _e(e, "gt", x, 0.0), dy, _e(e, "where", _e(e, "lt", x, 0.0), _e(e, "neg", dy), 0.0))


def _d_sigmoid_of(e, x):
    return _e(e, "sigmoid", x)


UNARY_VJP = {
    "abs": _d_abs,
    "neg": lambda e, x, y, dy: _e(e, "neg", dy),
    "exp": lambda e, x, y, dy: _e(e, "mul", dy, y),
    "log": lambda e, x, y, dy: _e(e, "div", dy, x),
    "sqrt": lambda e, x, y, dy: _e(e, "div", _e(e, "mul", dy, 0.5), y),
    "rsqrt": lambda e, x, y, dy: _e(e, "mul", _e(e, "mul", dy, -0.5), _e(e, "mul", y, _e(e, "mul", y, y))),
    "sin": lambda e, x, y, dy: _e(e, "mul", dy, _e(e, "cos", x)),
    "cos": lambda e, x, y, dy: _e(e, "neg", _e(e, "mul", dy, _e(e, "sin", x))),
    "tanh": lambda e, x, y, dy: _e(e, "mul", dy, _e(e, "sub", 1.0, _e(e, "mul", y, y))),
    "sigmoid": lambda e, x, y, dy: _e(e, "mul", dy, _e(e, "mul", y, _e(e, "sub", 1.0, y))),
    "relu": lambda e, x, y, dy: _e(e, "where", _e(e, "gt", x, 0.0), dy, 0.0),
    # x * s(x): s + x s (1 - s)
    "silu": lambda e, x, y, dy: _e(e, "mul", dy, _e(e, "mul", _d_sigmoid_of(e, x),
                                                    _e(e, "add", 1.0, _e(e, "mul", x, _e(e, "sub", 1.0, _d_sigmoid_of(e, x)))))),
    # torch's softplus is x itself above 20
    "softplus": lambda e, x, y, dy: _e(e, "where", _e(e, "gt", x, 20.0), dy, _e(e, "mul", dy, _d_sigmoid_of(e, x))),
}
INV_SQRT_2 = 0.7071067811865476
INV_SQRT_2PI = 0.3989422804014327
GELU_K, GELU_C = 0.7978845608028654, 0.044715


def _d_gelu(e, x, y, dy, approximate="none"):
    if approximate == "tanh":
        # 0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 c x^2), t = tanh(k (x + c x^3))
        x2 = _e(e, "mul", x, x)
        t = _e(e, "tanh", _e(e, "mul", GELU_K, _e(e, "add", x, _e(e, "mul", GELU_C, _e(e, "mul", x2, x)))))
        left = _e(e, "mul", 0.5, _e(e, "add", 1.0, t))
        right = _e(e, "mul", _e(e, "mul", _e(e, "mul", 0.5, x), _e(e, "sub", 1.0, _e(e, "mul", t, t))),
                   _e(e, "mul", GELU_K, _e(e, "add", 1.0, _e(e, "mul", 3 * GELU_C, x2))))
        return _e(e, "mul", dy, _e(e, "add", left, right))
    # Phi(x) + x phi(x)
    cdf = _e(e, "mul", 0.5, _e(e, "add", 1.0, _e(e, "erf", _e(e, "mul", x, INV_SQRT_2))))
    pdf = _e(e, "mul", INV_SQRT_2PI, _e(e, "exp", _e(e, "mul", -0.5, _e(e, "mul", x, x))))
    return _e(e, "mul", dy, _e(e, "add", cdf, _e(e, "mul", x, pdf)))


for _name, (_fn, _float_only, _doc) in UNARY.items():
    primitive(_name, Kind.POINTWISE, [X], internal=_name == "neg", doc=_doc,
              tile=lambda b, args, attrs, _t=UNARY_TILE[_name]: _t(b, args[0]),
              vjp=V.unary(UNARY_VJP[_name]))(
        infer=_unary_rule(_name, _float_only), reference=_unary_ref(_fn))


def _gelu_vjp(e, node, cts):
    return V.unary(lambda e, x, y, dy: _d_gelu(e, x, y, dy, node.attrs.get("approximate", "none")))(e, node, cts)


primitive("gelu", Kind.POINTWISE, [X, Arg("approximate", "str", "none", choices=("none", "tanh"))],
          doc='Gaussian error linear unit, exact ("none") or the tanh approximation',
          tile=lambda b, args, attrs: _t_gelu(b, args[0], attrs.get("approximate", "none")), vjp=_gelu_vjp)(
    infer=_unary_rule("gelu", True), reference=_unary_ref(_gelu))

primitive("erf", Kind.POINTWISE, [X], internal=True, doc="the error function (gelu's gradient)",
          tile=lambda b, args, attrs: b.unary("erf", args[0]),
          vjp=V.unary(lambda e, x, y, dy: _e(e, "mul", dy, _e(e, "mul", 2 * INV_SQRT_2PI * 2 ** 0.5,
                                                                  _e(e, "exp", _e(e, "neg", _e(e, "mul", x, x)))))))(
    infer=_unary_rule("erf", True), reference=_unary_ref(torch.erf))


# -- binary -------------------------------------------------------------------------------------
def _binary_rule(name: str, compare: bool = False, true_div: bool = False):
    def infer(types, attrs):
        for i, t in enumerate(types):
            if not compare or name not in ("eq", "ne"):
                rules.need_numeric(t, SYMBOLS.get(name, name), i)
        dtype, shape = rules.elementwise(types, SYMBOLS.get(name, name))
        if compare:
            dtype = DType.bool
        elif true_div and not dtype.is_float:
            dtype = DType.f32  # true division, as torch: integers divide to a float
        return [rules.make_type(dtype, shape)]
    return infer


def _binary_ref(fn, compare: bool = False):
    def ref(ctx, inputs, attrs, out_types, in_types):
        # Operands meet in the dtype the rule chose (scalars adopt it), computed in f32 for
        # narrow floats; comparisons compare in the operands' common dtype.
        operand = rules.result_dtype(in_types, "op") if compare else out_types[0].dtype
        # torch compares in the operands' common dtype (a float scalar is rounded to f16 first);
        # arithmetic happens in f32 for narrow floats, the scalar unrounded
        cd = ctx.dt(operand) if compare else ctx.compute_dt(operand)
        a, b = (x.to(cd) for x in inputs)
        r = fn(a, b)
        return r if compare else r.to(ctx.dt(out_types[0].dtype))
    return ref


SYMBOLS = {"add": "+", "sub": "-", "mul": "*", "div": "/", "pow": "**", "lt": "<", "le": "<=",
           "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}

BINARY = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "pow": torch.pow,
    "maximum": torch.maximum, "minimum": torch.minimum,
}
COMPARE = {"lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge, "eq": torch.eq, "ne": torch.ne}
AB = [Arg("a", "tensor"), Arg("b", "tensor")]

def _t_pow(b, x, y):
    """Integer and half-integer literal exponents become products and square roots."""
    if y.op == "const" and not isinstance(y.args[0], bool):
        e = y.args[0]
        if float(e).is_integer() and abs(e) <= 8:
            n = int(abs(e))
            r = b.const(1.0) if n == 0 else x
            for _ in range(max(n - 1, 0)):
                r = b.mul(r, x)
            return b.truediv(1.0, r) if e < 0 else (b.widen(r) if n else r)
        if e == 0.5:
            return b.unary("sqrt", x)
    if not x.dtype.is_float and not y.dtype.is_float:
        return _int_pow(b, x, y)
    return _float_pow(b, x, y)


def _float_pow(b, x, y):
    """torch.pow of floats: exp(y * log|x|), then the sign of a negative base to an integer
    power (odd: negative), NaN for a negative base to a fractional one, and 1 for y == 0 or
    x == 1 (even where the other operand is NaN). In f32 for 16-bit operands."""
    x, y = b.widen(x), b.widen(y)
    if not y.dtype.is_float:
        y = b.cast(y, x.dtype)
    if not x.dtype.is_float:
        x = b.cast(x, y.dtype)
    mag = b.unary("exp", b.mul(y, b.unary("log", b.unary("abs", x))))
    if y.op == "const":                          # a literal exponent: its kind is known here
        e = float(y.args[0])
        if math.isnan(e):
            return b.where(b.binop("eq", x, 1.0), 1.0, float("nan"))
        if not e.is_integer() and not math.isinf(e):
            r = b.where(b.binop("lt", x, 0.0), float("nan"), mag)
        elif not math.isinf(e) and abs(e) < 2.0 ** 53 and int(e) % 2:
            r = b.where(b.binop("lt", b.truediv(1.0, x), 0.0), b.unary("neg", mag), mag)
        else:
            r = mag
        return r if e != 0 else b.const(1.0, x.dtype)
    big = b.binop("ge", b.unary("abs", y), 2.0 ** 24)           # every float this large is an even integer
    yi = b.cast(b.where(big, 0.0, y), DType.i64)
    integral = b.binop("or", big, b.binop("eq", b.cast(yi, y.dtype), y))
    odd = b.binop("and", b.unary("not", big), b.binop("ne", b.mod(yi, 2), 0))
    # the sign: of a negative base or -0.0 (1 / x < 0) to an odd integer power
    flip = b.binop("and", b.binop("lt", b.truediv(1.0, x), 0.0), b.binop("and", integral, odd))
    r = b.where(flip, b.unary("neg", mag), mag)
    r = b.where(b.binop("and", b.binop("lt", x, 0.0), b.unary("not", integral)), float("nan"), r)
    return b.where(b.binop("or", b.binop("eq", y, 0.0), b.binop("eq", x, 1.0)), 1.0, r)


def _int_pow(b, x, y):
    """torch.pow of integers, wrapping as they do: square-and-multiply over the exponent's bits
    (unrolled); a negative exponent gives 0, except 1 for a base of 1 and +-1 for -1."""
    bits = max(x.dtype.bits, y.dtype.bits)
    wide = DType.i64 if bits > 32 else DType.i32
    x, y = b.cast(x, wide), b.cast(y, wide)
    r, base = b.const(1, wide), x
    odd = b.binop("eq", b.bitand(y, 1), 1)
    for i in range(bits - 1):
        bit = b.binop("eq", b.bitand(b.shr(y, i), 1), 1) if i else odd
        r = b.let(b.where(bit, b.mul(r, base), r), "pw")
        if i < bits - 2:
            base = b.let(b.mul(base, base), "sq")
    neg = b.where(b.binop("eq", x, 1), 1, b.where(b.binop("eq", x, -1), b.where(odd, -1, 1), 0))
    return b.where(b.binop("lt", y, 0), neg, r)


BINARY_TILE = {
    "add": lambda b, x, y: b.add(x, y),
    "sub": lambda b, x, y: b.sub(x, y),
    "mul": lambda b, x, y: b.mul(x, y),
    "div": lambda b, x, y: b.truediv(x, y),
    "pow": _t_pow,
    "maximum": lambda b, x, y: b.maximum(x, y),
    "minimum": lambda b, x, y: b.minimum(x, y),
}

def _binary_cts(e, a, b, y, dy, op):
    """(da, db) before unbroadcasting."""
    if op == "add":
        return dy, dy
    if op == "sub":
        return dy, _e(e, "neg", dy)
    if op == "mul":
        return _e(e, "mul", dy, b), _e(e, "mul", dy, a)
    if op == "div":
        return _e(e, "div", dy, b), _e(e, "neg", _e(e, "div", _e(e, "mul", dy, y), b))
    if op == "pow":
        # d/da = b a^(b-1) = b y / a where a != 0; written as b * a^(b - 1) to stay exact at 0
        da = _e(e, "mul", dy, _e(e, "mul", b, _e(e, "pow", a, _e(e, "sub", b, 1.0))))
        db = None if V.is_scalar(b) else _e(e, "mul", dy, _e(e, "mul", _e(e, "log", a), y))
        return da, db
    # maximum / minimum: the larger (smaller) operand takes the gradient, equal ones half each
    win = "gt" if op == "maximum" else "lt"
    tie = _e(e, "eq", a, b)
    half = _e(e, "mul", dy, 0.5)
    da = _e(e, "where", tie, half, _e(e, "where", _e(e, win, a, b), dy, 0.0))
    db = _e(e, "where", tie, half, _e(e, "where", _e(e, win, b, a), dy, 0.0))
    return da, db


def _binary_vjp(op):
    def rule(e, node, cts):
        (dy,) = cts
        a, b = node.inputs
        if dy is None or not node.out.type.dtype.is_float:
            return [None, None]
        da, db = _binary_cts(e, a, b, node.out, dy, op)
        return [V.like(e, V.unbroadcast(e, da, a) if not V.is_scalar(a) else None, a),
                V.like(e, V.unbroadcast(e, db, b) if db is not None and not V.is_scalar(b) else None, b)]
    return rule


for _name, _fn in BINARY.items():
    primitive(_name, Kind.POINTWISE, AB, internal=_name in SYMBOLS, doc=f"elementwise {_name}",
              tile=lambda b, args, attrs, _t=BINARY_TILE[_name]: _t(b, *args), vjp=_binary_vjp(_name))(
        infer=_binary_rule(_name, true_div=_name == "div"), reference=_binary_ref(_fn))
def _t_compare(b, op, x, y):
    """Compare in the operands' common dtype: a scalar meeting a narrow-float tile is rounded
    to that dtype first, as torch does."""
    for s, t in ((x, y), (y, x)):
        if s.shape == () and t.shape != () and t.dtype.is_float and s.dtype != t.dtype:
            s2 = b.cast(s, t.dtype)
            x, y = (s2, y) if s is x else (x, s2)
    return b.binop(op, x, y)


for _name, _fn in COMPARE.items():
    primitive(_name, Kind.POINTWISE, AB, internal=True, doc=f"comparison {SYMBOLS[_name]}, gives bool",
              tile=lambda b, args, attrs, _op=_name: _t_compare(b, _op, *args),
              vjp=V.no_grad("a comparison gives bool"))(
        infer=_binary_rule(_name, compare=True), reference=_binary_ref(_fn, compare=True))


# -- logical operators and integer floor division ----------------------------------------------
LOGICAL = {"logical_and": ("&", torch.logical_and), "logical_or": ("|", torch.logical_or)}


def _need_bool(t, sym: str, arg: int) -> None:
    if not t.dtype.is_bool:
        example = "~(x > 0.0)" if sym == "~" else f"(x > 0.0) {sym} (x < 1.0)"
        if not t.dtype.is_float:
            example = "~(j > i)" if sym == "~" else f"(j <= i) {sym} (j > i - W)"
        raise RuleError(f"'{sym}' needs bool operands, got {t}",
                        hint=f"'&', '|' and '~' are logical: compare first, e.g. {example}", arg=arg)


def _logical_rule(name: str):
    sym = LOGICAL[name][0]

    def infer(types, attrs):
        for i, t in enumerate(types):
            _need_bool(t, sym, i)
        return [rules.make_type(DType.bool, rules.elementwise(types, sym)[1])]
    return infer


def _logical_ref(fn):
    def ref(ctx, inputs, attrs, out_types, in_types):
        return fn(*(x.to(torch.bool) for x in inputs))
    return ref


for _name, (_sym, _fn) in LOGICAL.items():
    primitive(_name, Kind.POINTWISE, AB, internal=True, doc=f"logical {_name[8:]} of bools (written {_sym})",
              tile=lambda b, args, attrs, _op=_name[8:]: b.binop(_op, *args),
              vjp=V.no_grad("a logical operator gives bool"))(
        infer=_logical_rule(_name), reference=_logical_ref(_fn))


def _not_infer(types, attrs):
    (t,) = types
    _need_bool(t, "~", 0)
    return [t]


primitive("logical_not", Kind.POINTWISE, [X], internal=True, doc="logical not of a bool (written ~)",
          tile=lambda b, args, attrs: b.unary("not", args[0]), vjp=V.no_grad("a logical operator gives bool"))(
    infer=_not_infer, reference=lambda ctx, inputs, attrs, out_types, in_types: torch.logical_not(inputs[0].to(torch.bool)))


def _floordiv_infer(types, attrs):
    for i, t in enumerate(types):
        if not t.dtype.is_int:
            raise RuleError(f"'//' on values needs integer operands, got {t}",
                            hint="for floats write floor division out: a / b, or cast to an integer first", arg=i)
    dtype, shape = rules.elementwise(types, "//")
    return [rules.make_type(dtype, shape)]


def _floordiv_ref(ctx, inputs, attrs, out_types, in_types):
    dt = ctx.dt(out_types[0].dtype)
    a, b = (x.to(dt) for x in inputs)
    return torch.div(a, b, rounding_mode="floor")


def floor_div(b, x, y):
    """Python's (and torch's) floor division of integers: Triton's // truncates toward zero,
    so a quotient with a nonzero remainder of the other sign than the divisor steps down."""
    q = b.floordiv(x, y)
    r = b.mod(x, y)
    if y.op == "const" and y.args[0] > 0:     # a positive divisor (a chunk size): r < 0 steps down
        fix = b.binop("lt", r, 0)
    else:
        fix = b.binop("and", b.binop("ne", r, 0), b.binop("ne", b.binop("lt", r, 0), b.binop("lt", y, 0)))
    return b.sub(q, b.cast(fix, q.dtype))


primitive("floordiv", Kind.POINTWISE, AB, internal=True, doc="floor division of integers (written //), as torch",
          tile=lambda b, args, attrs: floor_div(b, *args), vjp=V.no_grad("integer division has no gradient"))(
    infer=_floordiv_infer, reference=_floordiv_ref)


# -- where, cast --------------------------------------------------------------------------------
def _where_infer(types, attrs):
    c, a, b = types
    if not c.dtype.is_bool:
        raise RuleError(f"the condition of 'where' must be bool, got {c}",
                        hint="compare to get a bool, e.g. {0} != 0", arg=0)
    try:
        dtype, _ = rules.elementwise([a, b], "where")
    except RuleError as e:  # the rule numbers a, b as 0, 1; they are operands 1, 2 of where
        hint = re.sub(r"\{(\d+)\}", lambda m: "{%d}" % (int(m.group(1)) + 1), e.hint) if e.hint else e.hint
        raise RuleError(e.message, hint, e.arg + 1 if isinstance(e.arg, int) else e.arg) from None
    tensors = [(i, t.shape) for i, t in enumerate(types) if isinstance(t, TensorType)]
    if not tensors:
        return [ScalarType(dtype)]
    shape = rules.broadcast_shapes([s for _, s in tensors], who=[i for i, _ in tensors])
    return [TensorType(dtype, shape)]


def _where_ref(ctx, inputs, attrs, out_types, in_types):
    c, a, b = inputs
    dt = ctx.dt(out_types[0].dtype)
    return torch.where(c.to(torch.bool), a.to(dt), b.to(dt))


def _where_vjp(e, node, cts):
    (dy,) = cts
    c, a, b = node.inputs
    if dy is None or not node.out.type.dtype.is_float:
        return [None, None, None]
    da = None if V.is_scalar(a) else V.unbroadcast(e, _e(e, "where", c, dy, 0.0), a)
    db = None if V.is_scalar(b) else V.unbroadcast(e, _e(e, "where", c, 0.0, dy), b)
    return [None, V.like(e, da, a), V.like(e, db, b)]


primitive("where", Kind.POINTWISE, [Arg("cond", "tensor"), Arg("a", "tensor"), Arg("b", "tensor")],
          doc="a where cond else b", tile=lambda b, args, attrs: b.where(*args), vjp=_where_vjp)(
    infer=_where_infer, reference=_where_ref)


def _cast_infer(types, attrs):
    (t,) = types
    return [t.with_dtype(attrs["dtype"])]


def _cast_ref(ctx, inputs, attrs, out_types, in_types):
    (x,) = inputs
    target = attrs["dtype"]
    if target.is_int and x.dtype.is_floating_point:
        x = torch.trunc(x)  # float -> int truncates toward zero, as C and torch do
    return x.to(ctx.dt(target))


def _t_cast(b, args, attrs):
    (x,), target = args, attrs["dtype"]
    if target.is_bool:
        return b.binop("ne", x, 0)
    return b.cast(x, target)  # float -> int truncates toward zero in Triton, as in torch


def _cast_vjp(e, node, cts):
    (dy,) = cts
    (x,) = node.inputs
    if dy is None or not V.differentiable(x) or not node.out.type.dtype.is_float:
        return [None]      # to or from integers and bools: no gradient
    return [V.like(e, dy, x)]


primitive("cast", Kind.POINTWISE, [X, Arg("dtype", "dtype")], doc="convert to another dtype", tile=_t_cast,
          vjp=_cast_vjp)(
    infer=_cast_infer, reference=_cast_ref)


def _st_infer(types, attrs):
    shadow, value = types
    if not isinstance(shadow, TensorType) or not isinstance(value, TensorType) or shadow.shape != value.shape:
        raise RuleError("straight_through takes a shadow and a value of one shape")
    return [value]


def _st_vjp(e, node, cts):
    (dy,) = cts
    shadow, _ = node.inputs
    return [V.like(e, dy, shadow) if dy is not None else None, None]


primitive("straight_through", Kind.POINTWISE, [Arg("shadow", "tensor"), Arg("value", "tensor")], internal=True,
          doc="value, differentiated as if it were shadow (a straight-through estimate: W8A8's activation "
              "quantization); dropped before fusion (passes/straight_through.py)",
          tile=lambda b, args, attrs: args[1], vjp=_st_vjp)(
    infer=_st_infer, reference=lambda ctx, inputs, attrs, out_types, in_types: inputs[1])


# -- scalar sources -----------------------------------------------------------------------------
def _const_infer(types, attrs):
    return [ScalarType(attrs["dtype"])]


def _const_ref(ctx, inputs, attrs, out_types, in_types):
    return ctx.tensor(attrs["value"], attrs["dtype"])


primitive("const", Kind.SOURCE, internal=True, doc="a literal", vjp=V.no_grad("a literal has no inputs"))(infer=_const_infer, reference=_const_ref)


def _dim_infer(types, attrs):
    return [ScalarType(DType.i64)]


def _dim_ref(ctx, inputs, attrs, out_types, in_types):
    from .dims import evaluate
    return ctx.tensor(evaluate(attrs["size"], ctx.bindings), DType.i64)


primitive("dim", Kind.SOURCE, internal=True, doc="a symbolic size used as a value",
          vjp=V.no_grad("a size has no inputs"))(
    infer=_dim_infer, reference=_dim_ref)

INF = math.inf
