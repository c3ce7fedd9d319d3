"""Contractions: ``matmul`` (``a @ b``, torch.matmul semantics with broadcast batch axes) and
``expert_matmul`` (a mixture-of-experts layer's per-token expert products). Both accumulate in
f32 (i32 for integers) and return the input dtype."""
from __future__ import annotations

import torch

from . import rules
from .dims import format_shape
from .registry import Arg, Kind, RuleError, primitive
from .types import DType, TensorType, accumulator


def _matmul_infer(types, attrs):
    a = rules.need_tensor(types[0], "@", 0)
    b = rules.need_tensor(types[1], "@", 1)
    if a.dtype != b.dtype:
        raise RuleError(f"operands of '@' have different dtypes {a.dtype} and {b.dtype}",
                        hint=f"make them equal with a cast, e.g. cast({{1}}, {a.dtype})", arg=1)
    rules.need_numeric(a, "@")
    if a.rank == 0 or b.rank == 0:
        raise RuleError("'@' needs tensors of rank 1 or more", arg=0 if a.rank == 0 else 1)
    ash = a.shape if a.rank > 1 else (1,) + a.shape
    bsh = b.shape if b.rank > 1 else b.shape + (1,)
    if ash[-1] != bsh[-2]:
        raise RuleError(f"'@' contracts {format_shape(a.shape)} with {format_shape(b.shape)}: "
                        f"{ash[-1]} against {bsh[-2]}",
                        hint="the last axis of the left must match the second-to-last of the right"
                             + ("; did you mean .T on the right?" if ash[-1] == bsh[-1] else ""), arg=1)
    batch = rules.broadcast_shapes([ash[:-2], bsh[:-2]], who=[0, 1])
    shape = batch + ((ash[-2],) if a.rank > 1 else ()) + ((bsh[-1],) if b.rank > 1 else ())
    return [TensorType(a.dtype, shape)]


def _matmul_ref(ctx, inputs, attrs, out_types, in_types):
    a, b = inputs
    dt = in_types[0].dtype
    acc = ctx.dt(accumulator(dt)) if dt.is_float else torch.int64
    return torch.matmul(a.to(acc), b.to(acc)).to(ctx.dt(out_types[0].dtype))


primitive("matmul", Kind.CONTRACTION, [Arg("a", "tensor"), Arg("b", "tensor")], internal=True,
          doc="a @ b (torch.matmul)")(infer=_matmul_infer, reference=_matmul_ref)


def _expert_infer(types, attrs):
    x = rules.need_tensor(types[0], "expert_matmul", 0)
    w = rules.need_tensor(types[1], "expert_matmul", 1)
    idx = rules.need_tensor(types[2], "expert_matmul", 2)
    if x.dtype != w.dtype:
        raise RuleError(f"expert_matmul of different dtypes {x.dtype} and {w.dtype}",
                        hint=f"cast({{1}}, {x.dtype})", arg=1)
    if idx.dtype != DType.i32 or idx.rank != 2:
        raise RuleError(f"expert_matmul needs idx: i32[T, k], got {idx}", arg=2)
    if w.rank != 3:
        raise RuleError(f"expert_matmul needs w: [E, N, K], got {w}", arg=1)
    t, k = idx.shape
    if x.rank == 2:
        if x.shape[0] != t:
            raise RuleError(f"expert_matmul: x has {x.shape[0]} tokens, idx has {t}", arg=2)
    elif x.rank == 3:
        if tuple(x.shape[:2]) != (t, k):
            raise RuleError(f"expert_matmul: x {format_shape(x.shape)} does not match idx {format_shape(idx.shape)}", arg=2)
    else:
        raise RuleError(f"expert_matmul needs x: [T, K] or [T, k, K], got {x}", arg=0)
    if x.shape[-1] != w.shape[2]:
        raise RuleError(f"expert_matmul contracts x {format_shape(x.shape)} with w {format_shape(w.shape)}: "
                        f"{x.shape[-1]} against {w.shape[2]}", arg=1)
    return [TensorType(x.dtype, (t, k, w.shape[1]))]


def _expert_ref(ctx, inputs, attrs, out_types, in_types):
    x, w, idx = inputs
    dt = in_types[0].dtype
    acc = ctx.dt(accumulator(dt)) if dt.is_float else torch.int64
    t, k = idx.shape
    xs = x[:, None, :].expand(t, k, x.shape[-1]) if x.dim() == 2 else x
    out = torch.zeros(t, k, w.shape[1], dtype=acc, device=x.device)
    idx = idx.long()
    if ((idx < 0) | (idx >= w.shape[0])).any():
        raise ValueError(f"expert_matmul: expert index out of range [0, {w.shape[0]})")
    for e in torch.unique(idx).tolist():
        sel = idx == e
        out[sel] = xs[sel].to(acc) @ w[e].to(acc).T
    return out.to(ctx.dt(out_types[0].dtype))


primitive("expert_matmul", Kind.MOE, [Arg("x", "tensor"), Arg("w", "tensor"), Arg("idx", "tensor")],
          doc="out[t, j] = x[t(, j)] @ w[idx[t, j]].T for mixture-of-experts layers")(
    infer=_expert_infer, reference=_expert_ref)
