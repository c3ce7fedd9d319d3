"""Vector-Jacobian products of level-1 primitives: the pieces their rules share.

Every primitive's registry entry holds its gradient as ``extra["vjp"]``: a function
``vjp(e, node, cts) -> [input cotangent or None, ...]`` that, given the cotangents of the node's
outputs (None where no gradient reaches an output), emits level-1 nodes through ``e`` (an
:class:`~opforge.ir.emit.Emitter`) computing the cotangent of each input (None for no gradient:
integer, bool and scalar operands, or zero). A primitive without a gradient says so with
:func:`no_grad` and a reason; ir/registry.py refuses, at import, a primitive with neither.
passes/autodiff.py runs the rules in reverse over a graph.

Rules follow PyTorch's conventions (max/min share the gradient among ties, maximum/minimum split
it equally between equal operands, relu and abs give 0 at 0).
"""
from __future__ import annotations

from dataclasses import dataclass

from .dims import Dim
from .emit import Emitter
from .graph import Node, Value
from .types import DType, ScalarType, TensorType


@dataclass(frozen=True)
class NoGrad:
    """A primitive with no gradient, and why (its outputs are integers or bools, it quantizes,
    it is internal to a layout, ...). Asking for a gradient through it is an error saying so."""
    why: str

    def __call__(self, e, node, cts):
        if any(c is not None for c in cts):
            raise NoGradient(f"'{node.op}' has no gradient: {self.why}")
        return [None] * len(node.inputs)


class NoGradient(ValueError):
    """A gradient was asked through a primitive that has none."""


def no_grad(why: str) -> NoGrad:
    return NoGrad(why)


def zero_grad_inputs(e, node, cts):
    """A primitive whose gradient is zero everywhere (round, comparisons): no cotangent flows."""
    return [None] * len(node.inputs)


def differentiable(v: Value) -> bool:
    return isinstance(v.type, TensorType) and v.type.dtype.is_float


def const(e: Emitter, value: float) -> Value:
    return e.const(float(value), DType.f32)


def size_value(e: Emitter, d: Dim) -> Value:
    """A size as an f32 scalar (sizes of a reduction, for mean)."""
    if isinstance(d, int):
        return const(e, d)
    return e("cast", [e("dim", [], {"size": d})], {"dtype": DType.f32})


def fill(e: Emitter, v: Value, value: float = 0.0) -> Value:
    """A tensor of v's type holding ``value`` (never stored: index arithmetic)."""
    return e("fill", [], {"shape": tuple(v.type.shape), "dtype": v.type.dtype, "value": float(value)})


def unbroadcast(e: Emitter, ct: Value, target: Value) -> Value | None:
    """The cotangent of an operand that was broadcast to ct's shape: summed over the axes it was
    broadcast along (NumPy's rules, right-aligned), reshaped to the operand's shape."""
    if ct is None or not differentiable(target):
        return None
    shape = tuple(target.type.shape)
    out = tuple(ct.type.shape)
    if shape == out:
        return ct
    lead = len(out) - len(shape)
    inner = tuple(lead + i for i, d in enumerate(shape) if d == 1 and out[lead + i] != 1)
    axes = tuple(range(lead)) + inner
    # only leading axes: a sum without keepdim is the operand's shape already, so no reshape
    # follows (a reshaped result would be a copy kernel of its own)
    r = e("sum", [ct], {"axis": axes, "keepdim": bool(inner)}) if axes else ct
    if tuple(r.type.shape) != shape:
        r = e("reshape", [r], {"shape": shape})
    return r


def like(e: Emitter, ct: Value | None, v: Value) -> Value | None:
    """ct in v's dtype (a cotangent has its primal's dtype)."""
    if ct is None:
        return None
    return ct if ct.type.dtype == v.type.dtype else e("cast", [ct], {"dtype": v.type.dtype})


def add(e: Emitter, a: Value | None, b: Value | None) -> Value | None:
    if a is None:
        return b
    if b is None:
        return a
    return e("add", [a, b])


def expand_to(e: Emitter, ct: Value, reduced: Value, axes, keepdim: bool, full: Value) -> Value:
    """A reduction's cotangent (of ``reduced``) broadcast back over the reduced axes of ``full``."""
    if not keepdim and axes:
        keep = tuple(1 if i in axes else d for i, d in enumerate(full.type.shape))
        ct = e("reshape", [ct], {"shape": keep})
    if tuple(ct.type.shape) != tuple(full.type.shape):
        ct = e("expand", [ct], {"shape": tuple(full.type.shape)})
    return ct


def is_scalar(v: Value) -> bool:
    return isinstance(v.type, ScalarType)


def unary(fn):
    """A rule for a one-operand pointwise primitive from ``fn(e, x, y, dy) -> dx``."""
    def rule(e: Emitter, node: Node, cts):
        (dy,) = cts
        (x,) = node.inputs
        if dy is None or not differentiable(x):
            return [None]
        return [like(e, fn(e, x, node.out, dy), x)]
    return rule
