"""Primitives made by pattern rewrites (never written in a spec): each has a type rule and a
reference that reproduces the matched subgraph's arithmetic, roundings included, so the
reference executor gives the same answer before and after the rewrite."""
from __future__ import annotations

import torch

from . import rules
from . import vjp as V
from .dims import evaluate, format_shape
from .registry import Arg, Kind, RuleError, primitive
from .types import DType, TensorType, accumulator


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


primitive("flash_attention", Kind.FUSED, [Arg("q", "tensor"), Arg("k", "tensor"), Arg("v", "tensor"),
                                          Arg("scale_and_mask", "tensors")],
          internal=True, doc="softmax(mask(q @ k.T * scale)) @ v in one kernel, never storing the scores",
          vjp=V.no_grad("flash attention's backward is not built yet"))(
    infer=_flash_infer, reference=_flash_ref)


# -- mixture of experts -------------------------------------------------------------------------
def moe_block(slots: int, experts: int) -> int:
    """Rows per block of the grouped expert GEMMs (and the padding of the sorted slots): big
    enough for the tensor cores, small enough that padding stays a fraction of the tokens."""
    avg = slots / max(experts, 1)
    return 16 if avg <= 16 else 32 if avg <= 64 else 64


MOE_BLOCK_MAX = 64


def _router_infer(types, attrs):
    x, w = (rules.need_tensor(t, "moe_router", i) for i, t in enumerate(types))
    k = attrs["k"]
    dt = attrs["dtype"]
    return [TensorType(dt, (x.shape[0], k)), TensorType(DType.i32, (x.shape[0], k))]


def _router_ref(ctx, inputs, attrs, out_types, in_types):
    x, w = inputs
    dt = in_types[0].dtype
    logits = torch.matmul(x.to(ctx.dt(accumulator(dt))), w.to(ctx.dt(accumulator(dt))).T).to(ctx.dt(dt))
    logits = logits.to(ctx.dt(attrs["dtype"]))
    vals, idx = torch.sort(logits, dim=-1, descending=True, stable=True)
    vals, idx = vals[:, :attrs["k"]], idx[:, :attrs["k"]].to(torch.int32)
    if attrs["softmax"]:
        vals = torch.softmax(vals.to(ctx.compute_dt(attrs["dtype"])), dim=-1).to(ctx.dt(attrs["dtype"]))
    return [vals.contiguous(), idx.contiguous()]


primitive("moe_router", Kind.FUSED, [Arg("x", "tensor"), Arg("w", "tensor")], internal=True, n_outputs=2,
          doc="logits = x @ w.T; top-k experts per token; optionally the softmax of the chosen logits",
          vjp=V.no_grad("the MoE router's backward is not built yet"))(
    infer=_router_infer, reference=_router_ref)


def _align_infer(types, attrs):
    (idx,) = types
    t, k = idx.shape
    e = attrs["experts"]
    return [TensorType(DType.i32, (t * k + MOE_BLOCK_MAX * e,)), TensorType(DType.i32, (t * k + e,)),
            TensorType(DType.i32, (1,))]


def moe_align_reference(idx: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slots (t * k + j) sorted by expert, stable; each expert's run padded with the sentinel
    T*k to a multiple of the block; the expert of each block; the number of blocks."""
    t, k = idx.shape
    n = t * k
    blk = moe_block(n, experts)
    flat = idx.reshape(-1).long()
    slots = torch.full((n + MOE_BLOCK_MAX * experts,), n, dtype=torch.int32, device=idx.device)
    block_expert = torch.full((n + experts,), experts, dtype=torch.int32, device=idx.device)
    pos = 0
    for e in range(experts):
        mine = torch.nonzero(flat == e).reshape(-1)
        slots[pos:pos + mine.numel()] = mine.to(torch.int32)
        padded = -(-mine.numel() // blk) * blk
        block_expert[pos // blk:(pos + padded) // blk] = e
        pos += padded
    return slots, block_expert, torch.tensor([pos // blk], dtype=torch.int32, device=idx.device)


def _align_ref(ctx, inputs, attrs, out_types, in_types):
    return list(moe_align_reference(inputs[0], evaluate(attrs["experts"], ctx.bindings)))


primitive("moe_align", Kind.MOE, [Arg("idx", "tensor")], internal=True, n_outputs=3,
          doc="sort the (token, choice) slots by expert, padded per expert to the GEMM block",
          vjp=V.no_grad("it gives integer slots"))(
    infer=_align_infer, reference=_align_ref)


def _expert_gemm_infer(types, attrs):
    from .prims_contract import _expert_infer
    return _expert_infer(types[:3], attrs)


def _expert_gemm_ref(ctx, inputs, attrs, out_types, in_types):
    from .prims_contract import _expert_ref
    return _expert_ref(ctx, inputs[:3], attrs, out_types, in_types[:3])


primitive("expert_gemm", Kind.MOE, [Arg("x", "tensor"), Arg("w", "tensor"), Arg("idx", "tensor"),
                                    Arg("sorted_slots", "tensor"), Arg("block_expert", "tensor"),
                                    Arg("num_blocks", "tensor")], internal=True,
          doc="expert_matmul computed as grouped GEMMs over slots sorted by expert (inputs 4-6: the dispatch)",
          vjp=V.no_grad("the grouped expert GEMM's backward is not built yet"))(
    infer=_expert_gemm_infer, reference=_expert_gemm_ref)
