"""Selection primitives: ``topk`` (deterministic: ties go to the lower index) and the ``causal``
mask source."""
from __future__ import annotations

import torch

from . import rules
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


primitive("topk", Kind.SELECTION, [Arg("x", "tensor"), Arg("k", "int"), Arg("axis", "int", -1)], n_outputs=2,
          doc="the k largest values along an axis and their indices (i32); ties pick the lower index")(
    infer=_topk_infer, reference=_topk_ref)


def _causal_infer(types, attrs):
    return [TensorType(DType.bool, (attrs["S"], attrs["T"]))]


def _causal_ref(ctx, inputs, attrs, out_types, in_types):
    s, t = evaluate(attrs["S"], ctx.bindings), evaluate(attrs["T"], ctx.bindings)
    i = torch.arange(s, device=ctx.device)[:, None]
    j = torch.arange(t, device=ctx.device)[None, :]
    return j <= i + (t - s)


primitive("causal", Kind.SOURCE, [Arg("S", "dim"), Arg("T", "dim")],
          doc="bool[S, T] mask, true where j <= i + T - S (queries aligned to the end of the keys)")(
    infer=_causal_infer, reference=_causal_ref)
