"""Reductions (sum, mean, max, min), softmax and log_softmax, and the cumsum scan.

Reductions accumulate in f32 (i32 for integers) and return the input dtype, as DSL.md says.
The rule stores ``axis`` as a sorted tuple of non-negative axes (all axes when omitted).
"""
from __future__ import annotations

import torch

from . import rules
from . import vjp as V
from .registry import Arg, Kind, RuleError, primitive
from .types import TensorType, accumulator

X = Arg("x", "tensor")


def _reduce_rule(name: str):
    def infer(types, attrs):
        t = rules.need_tensor(types[0], name)
        rules.need_numeric(t, name)
        if name == "mean" and not t.dtype.is_float:
            raise RuleError(f"'mean' needs a floating-point tensor, got {t}",
                            hint="cast it first: mean(cast({0}, f32), ...)", arg=0)
        axes = rules.norm_axes(attrs.get("axis"), t.rank, name)
        keep = bool(attrs.get("keepdim", False))
        shape = tuple(1 if i in axes else d for i, d in enumerate(t.shape)) if keep else \
            tuple(d for i, d in enumerate(t.shape) if i not in axes)
        return [TensorType(t.dtype, shape)], {"axis": axes, "keepdim": keep}
    return infer


def _reduce_ref(name: str):
    def ref(ctx, inputs, attrs, out_types, in_types):
        (x,) = inputs
        dt = in_types[0].dtype
        axes, keep = list(attrs["axis"]), attrs["keepdim"]
        out = ctx.dt(out_types[0].dtype)
        if not axes:
            return x.to(out)
        if name in ("max", "min"):
            r = (torch.amax if name == "max" else torch.amin)(x, dim=axes, keepdim=keep)
            return r.to(out)
        acc = x.to(ctx.dt(accumulator(dt)) if not ctx.check or dt.is_float else torch.int64)
        r = acc.sum(dim=axes, keepdim=keep)
        if name == "mean":
            n = 1
            for a in axes:
                n *= x.shape[a]
            r = r / n
        return r.to(out)
    return ref


def _reduce_vjp(name: str):
    """sum: the cotangent broadcast back; mean: divided by the count; max/min: shared equally
    among the elements equal to the result (torch.amax's rule)."""
    def rule(e, node, cts):
        (dy,) = cts
        (x,) = node.inputs
        if dy is None or not V.differentiable(x):
            return [None]
        axes, keep = node.attrs["axis"], node.attrs["keepdim"]
        if not axes:
            return [dy]
        if name in ("sum", "mean"):
            g = V.expand_to(e, dy, node.out, axes, keep, x)
            if name == "mean":
                n = 1
                for a in axes:
                    n = n * x.type.shape[a]
                g = e("div", [g, V.size_value(e, n)])
            return [g]
        y = V.expand_to(e, node.out, node.out, axes, keep, x)
        hit = e("eq", [x, y])
        count = e("sum", [e("cast", [hit], {"dtype": x.type.dtype})], {"axis": axes, "keepdim": True})
        share = e("div", [dy if keep else e("reshape", [dy], {"shape": tuple(count.type.shape)}), count])
        return [e("where", [hit, V.expand_to(e, share, count, axes, True, x), V.const(e, 0.0)])]
    return rule


REDUCE_ARGS = [X, Arg("axis", "axes", None), Arg("keepdim", "bool", False)]
for _name, _doc in {"sum": "sum over axes", "mean": "mean over axes", "max": "maximum over axes",
                    "min": "minimum over axes"}.items():
    primitive(_name, Kind.REDUCTION, REDUCE_ARGS, doc=_doc, vjp=_reduce_vjp(_name))(
        infer=_reduce_rule(_name), reference=_reduce_ref(_name))


def _softmax_rule(name: str):
    def infer(types, attrs):
        t = rules.need_tensor(types[0], name)
        rules.need_float(t, name)
        return [t], {"axis": rules.norm_axis(attrs.get("axis", -1), t.rank, name)}
    return infer


def _softmax_ref(fn):
    def ref(ctx, inputs, attrs, out_types, in_types):
        (x,) = inputs
        return fn(x.to(ctx.compute_dt(in_types[0].dtype)), dim=attrs["axis"]).to(ctx.dt(out_types[0].dtype))
    return ref


def _softmax_vjp(e, node, cts):
    """softmax: y * (dy - sum(dy * y)); log_softmax: dy - exp(y) * sum(dy), along the axis."""
    (dy,) = cts
    if dy is None:
        return [None]
    y, axis = node.out, node.attrs["axis"]
    if node.op == "softmax":
        s = e("sum", [e("mul", [dy, y])], {"axis": (axis,), "keepdim": True})
        return [e("mul", [y, e("sub", [dy, s])])]
    s = e("sum", [dy], {"axis": (axis,), "keepdim": True})
    return [e("sub", [dy, e("mul", [e("exp", [y]), s])])]


primitive("softmax", Kind.REDUCTION, [X, Arg("axis", "int", -1)], doc="exp(x - max) / sum(exp(x - max))",
          vjp=_softmax_vjp)(infer=_softmax_rule("softmax"), reference=_softmax_ref(torch.softmax))
primitive("log_softmax", Kind.REDUCTION, [X, Arg("axis", "int", -1)], doc="x - max - log(sum(exp(x - max)))",
          vjp=_softmax_vjp)(infer=_softmax_rule("log_softmax"), reference=_softmax_ref(torch.log_softmax))


def _cumsum_infer(types, attrs):
    t = rules.need_tensor(types[0], "cumsum")
    rules.need_numeric(t, "cumsum")
    return [t], {"axis": rules.norm_axis(attrs["axis"], t.rank, "cumsum"), "reverse": bool(attrs.get("reverse", False))}


def _cumsum_ref(ctx, inputs, attrs, out_types, in_types):
    (x,) = inputs
    dt = in_types[0].dtype
    acc = ctx.dt(accumulator(dt)) if dt.is_float else torch.int64
    axis = attrs["axis"]
    if attrs.get("reverse"):
        return torch.cumsum(x.to(acc).flip(axis), dim=axis).flip(axis).to(ctx.dt(out_types[0].dtype))
    return torch.cumsum(x.to(acc), dim=axis).to(ctx.dt(out_types[0].dtype))


def _cumsum_vjp(e, node, cts):
    (dy,) = cts
    if dy is None or not V.differentiable(node.inputs[0]):
        return [None]
    return [e("cumsum", [dy], {"axis": node.attrs["axis"], "reverse": not node.attrs.get("reverse", False)})]


primitive("cumsum", Kind.SCAN, [X, Arg("axis", "int"), Arg("reverse", "bool", False)],
          doc="inclusive prefix sum along an axis (from the end with reverse=true)", vjp=_cumsum_vjp)(
    infer=_cumsum_infer, reference=_cumsum_ref)

