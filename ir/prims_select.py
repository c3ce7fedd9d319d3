"""Selection primitives: ``topk`` (deterministic: ties go to the lower index) and the ``causal``
mask source."""
from __future__ import annotations

import torch

from . import rules
from . import vjp as V
from .dims import evaluate
from .registry import Arg, Kind, RuleError, primitive
from .types import DType, TensorType


def _topk_infer(types, attrs):
    t = rules.need_tensor(types[0], "topk")
    rules.need_numeric(t, "topk")
    axis = rules.norm_axis(attrs.get("axis", -1), t.rank, "topk")
    k = attrs["k"]
    if k < 1:
        raise RuleError(f"topk needs k >= 1, got {k}", arg="k")
    n = t.shape[axis]
    if isinstance(n, int) and k > n:
        raise RuleError(f"topk with k={k} over an axis of size {n}", arg="k")
    shape = list(t.shape)
    shape[axis] = k
    return [TensorType(t.dtype, tuple(shape)), TensorType(DType.i32, tuple(shape))], {"k": k, "axis": axis}


def _topk_ref(ctx, inputs, attrs, out_types, in_types):
    (x,) = inputs
    k, axis = attrs["k"], attrs["axis"]
    if k > x.shape[axis]:
        raise ValueError(f"topk with k={k} over an axis of size {x.shape[axis]}")
    # A stable descending sort keeps equal values in index order: ties pick the lower index.
    vals, idx = torch.sort(x, dim=axis, descending=True, stable=True)
    return [vals.narrow(axis, 0, k).contiguous(), idx.narrow(axis, 0, k).to(torch.int32).contiguous()]


def _topk_vjp(e, node, cts):
    """The values' cotangent goes back to the selected elements; the indices have none."""
    dv = cts[0]
    x = node.inputs[0]
    if dv is None or not V.differentiable(x):
        return [None]
    axis = node.attrs["axis"]
    return [e("scatter_along", [dv, node.outputs[1]], {"axis": axis, "size": x.type.shape[axis]})]


primitive("topk", Kind.SELECTION, [Arg("x", "tensor"), Arg("k", "int"), Arg("axis", "int", -1)], n_outputs=2,
          doc="the k largest values along an axis and their indices (i32); ties pick the lower index",
          vjp=_topk_vjp)(infer=_topk_infer, reference=_topk_ref)


def _scatter_along_infer(types, attrs):
    src, idx = types
    shape = list(src.shape)
    shape[attrs["axis"]] = attrs["size"]
    return [TensorType(src.dtype, tuple(shape))]


def _scatter_along_ref(ctx, inputs, attrs, out_types, in_types):
    src, idx = inputs
    shape = list(src.shape)
    shape[attrs["axis"]] = evaluate(attrs["size"], ctx.bindings)
    out = torch.zeros(shape, dtype=src.dtype, device=src.device)
    return out.scatter_add_(attrs["axis"], idx.long(), src)


# the selections a scatter_along may add up at one position, unrolled as index arithmetic
SCATTER_ALONG_MAX = 64

primitive("scatter_along", Kind.SHAPE, [Arg("src", "tensor"), Arg("idx", "tensor")], internal=True,
          doc="out[..., idx[..., j], ...] += src[..., j, ...] along an axis (topk's gradient), zeros elsewhere",
          vjp=lambda e, n, cts: [None if cts[0] is None else e("take", [cts[0], n.inputs[1]], {"axis": n.attrs["axis"]}),
                                 None])(infer=_scatter_along_infer, reference=_scatter_along_ref)


def _take_infer(types, attrs):
    x = rules.need_tensor(types[0], "take")
    idx = rules.need_tensor(types[1], "take", 1)
    if not (idx.dtype.is_int and not idx.dtype.is_bool):
        raise rules.RuleError(f"'take' needs integer indices, got {idx}", hint="cast them: cast({1}, i32)", arg=1)
    if idx.rank != x.rank:
        raise rules.RuleError(f"'take' needs indices of the same rank as the tensor: {x} and {idx}",
                              hint="add the missing axes with None, e.g. idx[:, None]", arg=1)
    axis = rules.norm_axis(attrs["axis"], x.rank, "take")
    for i, (a, b) in enumerate(zip(x.shape, idx.shape)):
        if i != axis and a != b:
            raise rules.RuleError(f"'take': the indices {idx} must match {x} on every axis but axis {axis}; "
                                  f"axis {i} is {b}, not {a}", arg=1)
    return [TensorType(x.dtype, tuple(idx.shape))], {"axis": axis}


def _take_ref(ctx, inputs, attrs, out_types, in_types):
    return torch.take_along_dim(inputs[0], inputs[1].long(), dim=attrs["axis"])


def _take_vjp(e, n, cts):
    """The gradient adds each taken entry back where it came from: a scatter_along, which
    unrolls the entries taken per position, so their count must be a literal of at most
    SCATTER_ALONG_MAX (cross-entropy's one target, top-k's k)."""
    if cts[0] is None:
        return [None, None]
    axis = n.attrs["axis"]
    k = n.inputs[1].type.shape[axis]
    if not isinstance(k, int) or k > SCATTER_ALONG_MAX:
        raise V.NoGradient(f"take(..., axis={axis}) takes {k} entries per position along the axis; its gradient "
                           f"adds them back one by one and needs a literal count of at most {SCATTER_ALONG_MAX}")
    return [e("scatter_along", [cts[0], n.inputs[1]], {"axis": axis, "size": n.inputs[0].type.shape[axis]}), None]


primitive("take", Kind.SHAPE, [Arg("x", "tensor"), Arg("idx", "tensor"), Arg("axis", "int")],
          doc="x[..., idx[..., j, ...], ...] along one axis (torch.take_along_dim): out[i][j] = x[i][idx[i][j]] "
              "for axis=1; idx has x's rank and sizes but along the axis; indices in [0, size)",
          vjp=_take_vjp)(infer=_take_infer, reference=_take_ref)


def _causal_infer(types, attrs):
    return [TensorType(DType.bool, (attrs["S"], attrs["T"]))]


def _causal_ref(ctx, inputs, attrs, out_types, in_types):
    s, t = evaluate(attrs["S"], ctx.bindings), evaluate(attrs["T"], ctx.bindings)
    i = torch.arange(s, device=ctx.device)[:, None]
    j = torch.arange(t, device=ctx.device)[None, :]
    return j <= i + (t - s)


primitive("causal", Kind.SOURCE, [Arg("S", "dim"), Arg("T", "dim")],
          doc="bool[S, T] mask, true where j <= i + T - S (queries aligned to the end of the keys)",
          vjp=V.no_grad("a mask has no inputs"))(
    infer=_causal_infer, reference=_causal_ref)


def _arange_ref(ctx, inputs, attrs, out_types, in_types):
    return torch.arange(evaluate(attrs["N"], ctx.bindings), device=ctx.device, dtype=torch.int64)


primitive("arange", Kind.SOURCE, [Arg("N", "dim")],
          doc="i64[N] = 0, 1, ..., N-1: positions, for masks and biases built by broadcasting "
              "(i = arange(S)[:, None], j = arange(T)[None, :])",
          vjp=V.no_grad("positions have no gradient"))(
    infer=lambda types, attrs: [TensorType(DType.i64, (attrs["N"],))], reference=_arange_ref)
