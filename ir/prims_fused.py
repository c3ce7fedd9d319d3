"""Primitives made by pattern rewrites (never written in a spec): each has a type rule and a
reference that reproduces the matched subgraph's arithmetic, roundings included, so the
reference executor gives the same answer before and after the rewrite."""
from __future__ import annotations

import torch

from . import rules
from .dims import evaluate, format_shape
from .registry import Arg, Kind, RuleError, primitive
from .types import TensorType, accumulator


def _flash_infer(types, attrs):
    q, k, v = (rules.need_tensor(t, "flash_attention", i) for i, t in enumerate(types[:3]))
    if not (q.dtype == k.dtype == v.dtype):
        raise RuleError("flash_attention needs q, k, v of one dtype")
    S, E = q.shape[-2:]
    T, Ek = k.shape[-2:]
    Tv, Ev = v.shape[-2:]
    if Ek != E or Tv != T:
        raise RuleError(f"flash_attention: q {format_shape(q.shape)}, k {format_shape(k.shape)}, "
                        f"v {format_shape(v.shape)} do not fit")
    batch = rules.broadcast_shapes([q.shape[:-2], k.shape[:-2], v.shape[:-2]])
    return [TensorType(q.dtype, tuple(batch) + (S, Ev))]


def _flash_ref(ctx, inputs, attrs, out_types, in_types):
    q, k, v = inputs[:3]
    rest = list(inputs[3:])
    dt = in_types[0].dtype
    acc = ctx.dt(accumulator(dt))
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)).to(ctx.dt(dt))
    if attrs["scale"]:
        s = (s.to(ctx.compute_dt(dt)) * rest.pop(0).to(ctx.compute_dt(dt))).to(ctx.dt(dt))
    if attrs["mask"] == "causal":
        S, T = (evaluate(d, ctx.bindings) for d in attrs["causal"])
        i = torch.arange(S, device=s.device)[:, None]
        j = torch.arange(T, device=s.device)[None, :]
        s = torch.where(j <= i + (T - S), s, torch.tensor(float("-inf"), dtype=s.dtype, device=s.device))
    elif attrs["mask"] == "tensor":
        m = rest.pop(0).to(torch.bool)
        s = torch.where(m, s, torch.tensor(float("-inf"), dtype=s.dtype, device=s.device))
    p = torch.softmax(s.to(ctx.compute_dt(dt)), dim=-1).to(ctx.dt(dt))
    return torch.matmul(p.to(acc), v.to(acc)).to(ctx.dt(out_types[0].dtype))


primitive("flash_attention", Kind.FUSED, [Arg("q", "tensor"), Arg("k", "tensor"), Arg("v", "tensor")],
          internal=True, doc="softmax(mask(q @ k.T * scale)) @ v in one kernel, never storing the scores")(
    infer=_flash_infer, reference=_flash_ref)
