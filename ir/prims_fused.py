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
    return [TensorType(q.dtype, tuple(batch) + (S, Ev)), TensorType(accumulator(q.dtype), tuple(batch) + (S,))]


def masked_scores(ctx, attrs, q, k, rest, dt, bindings):
    """q @ k.T, scaled and masked (-inf where masked), in the dtype the reference computes in."""
    acc = ctx.dt(accumulator(dt))
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)).to(ctx.dt(dt))
    rest = list(rest)
    if attrs["scale"]:
        s = (s.to(ctx.compute_dt(dt)) * rest.pop(0).to(ctx.compute_dt(dt))).to(ctx.dt(dt))
    if attrs["mask"] == "causal":
        S, T = (evaluate(d, bindings) for d in attrs["causal"])
        i = torch.arange(S, device=s.device)[:, None]
        j = torch.arange(T, device=s.device)[None, :]
        s = torch.where(j <= i + (T - S), s, torch.tensor(float("-inf"), dtype=s.dtype, device=s.device))
    elif attrs["mask"] == "tensor":
        m = rest.pop(0).to(torch.bool)
        s = torch.where(m, s, torch.tensor(float("-inf"), dtype=s.dtype, device=s.device))
    return s


def _flash_ref(ctx, inputs, attrs, out_types, in_types):
    q, k, v = inputs[:3]
    dt = in_types[0].dtype
    s = masked_scores(ctx, attrs, q, k, inputs[3:], dt, ctx.bindings)
    acc = ctx.dt(accumulator(dt))
    p = torch.softmax(s.to(ctx.compute_dt(dt)), dim=-1).to(ctx.dt(dt))
    out = torch.matmul(p.to(acc), v.to(acc)).to(ctx.dt(out_types[0].dtype))
    lse = torch.logsumexp(s.to(ctx.dt(accumulator(dt))), dim=-1)
    return [out, lse]


def _flash_vjp(e, node, cts):
    """FlashAttention-2's backward: delta = rowsum(dO * O) (a row kernel), then dQ, dK, dV from
    the saved log-sum-exp (flash_attention_bwd: the scores are recomputed per tile, never P);
    dK and dV summed over the batch axes k and v were broadcast along (grouped-query heads)."""
    do, dlse = cts
    if dlse is not None:
        raise V.NoGradient("the log-sum-exp of flash attention is internal (no gradient)")
    if do is None:
        return [None] * len(node.inputs)
    q, k, v = node.inputs[:3]
    o, lse = node.outputs
    f32 = accumulator(q.type.dtype)
    delta = e("sum", [e("mul", [e("cast", [do], {"dtype": f32}), e("cast", [o], {"dtype": f32})])],
              {"axis": (o.type.rank - 1,), "keepdim": False})
    dq = e.multi("flash_attention_bwd", [q, k, v, lse, delta, do] + list(node.inputs[3:]), dict(node.attrs))
    grads = [V.unbroadcast(e, g, x) if V.differentiable(x) else None for g, x in zip(dq, (q, k, v))]
    return grads + [None] * (len(node.inputs) - 3)


primitive("flash_attention", Kind.FUSED, [Arg("q", "tensor"), Arg("k", "tensor"), Arg("v", "tensor"),
                                          Arg("scale_and_mask", "tensors")],
          internal=True, n_outputs=2,
          doc="softmax(mask(q @ k.T * scale)) @ v in one kernel, never storing the scores; the second "
              "result is each query row's log-sum-exp of its scores (stored only when the backward reads it)",
          vjp=_flash_vjp)(infer=_flash_infer, reference=_flash_ref)


def _flash_bwd_infer(types, attrs):
    q, k, v, lse, delta, do = types[:6]
    batch = tuple(_flash_infer([q, k, v] + list(types[6:]), attrs)[0].shape[:-2])
    return [TensorType(q.dtype, batch + tuple(q.shape[-2:])), TensorType(k.dtype, batch + tuple(k.shape[-2:])),
            TensorType(v.dtype, batch + tuple(v.shape[-2:]))]


def _flash_bwd_ref(ctx, inputs, attrs, out_types, in_types):
    q, k, v, lse, delta, do = inputs[:6]
    rest = inputs[6:]
    dt = in_types[0].dtype
    cd = ctx.compute_dt(dt) if not ctx.check else torch.float64
    s = masked_scores(ctx, attrs, q, k, rest, dt, ctx.bindings).to(cd)
    scale = rest[0].to(cd) if attrs["scale"] else 1.0
    p = torch.exp(s - lse.to(cd)[..., None])
    p = torch.where(torch.isfinite(s), p, torch.zeros((), dtype=cd, device=p.device))
    q, k, v, do = (x.to(cd) for x in (q, k, v, do))
    batch = p.shape[:-2]
    dv = torch.matmul(p.transpose(-2, -1), do)
    dp = torch.matmul(do, v.transpose(-2, -1))
    ds = p * (dp - delta.to(cd)[..., None])
    dq = torch.matmul(ds, k.expand(batch + k.shape[-2:])) * scale
    dk = torch.matmul(ds.transpose(-2, -1), q.expand(batch + q.shape[-2:])) * scale
    return [dq.to(ctx.dt(out_types[0].dtype)), dk.to(ctx.dt(out_types[1].dtype)), dv.to(ctx.dt(out_types[2].dtype))]


primitive("flash_attention_bwd", Kind.FUSED, [Arg("q", "tensor"), Arg("k", "tensor"), Arg("v", "tensor"),
                                              Arg("lse", "tensor"), Arg("delta", "tensor"), Arg("do", "tensor"),
                                              Arg("scale_and_mask", "tensors")],
          internal=True, n_outputs=3,
          doc="dQ, dK, dV of flash attention from its log-sum-exp and delta = rowsum(dO * O), the scores "
              "recomputed per tile (a dK/dV kernel over query blocks, a dQ kernel over key blocks)",
          vjp=V.no_grad("a gradient's gradient (double backward) is not supported"))(
    infer=_flash_bwd_infer, reference=_flash_bwd_ref)


def _flash_mod_infer(types, attrs):
    s, v = (rules.need_tensor(t, "flash_attention_mod", i) for i, t in enumerate(types))
    if s.dtype != v.dtype or s.rank < 2 or v.rank < 2 or s.shape[-1] != v.shape[-2]:
        raise RuleError(f"flash_attention_mod: scores {s}, v {v} do not fit")
    batch = tuple(rules.broadcast_shapes([s.shape[:-2], v.shape[:-2]]))
    return [TensorType(s.dtype, batch + (s.shape[-2], v.shape[-1])),
            TensorType(accumulator(s.dtype), batch + (s.shape[-2],))]


def _flash_mod_ref(ctx, inputs, attrs, out_types, in_types):
    """softmax(s) @ v with the roundings of the two nodes it replaced."""
    s, v = inputs
    dt = in_types[0].dtype
    acc = ctx.dt(accumulator(dt))
    p = torch.softmax(s.to(ctx.compute_dt(dt)), dim=-1).to(ctx.dt(dt))
    out = torch.matmul(p.to(acc), v.to(acc)).to(ctx.dt(out_types[0].dtype))
    lse = torch.logsumexp(s.to(acc), dim=-1)
    return [out, lse.expand(tuple(out.shape[:-1]))]


def _flash_mod_vjp(e, node, cts):
    """The unfused backward of softmax(s) @ v (the S x T probabilities recomputed from the
    saved scores by a row kernel, then the ordinary matmul and softmax gradients); the
    gradient of s flows on through the score cone's own rules to q and k. A fused backward
    for score changes is future work (docs/language.md, Attention)."""
    do, dlse = cts
    if dlse is not None:
        raise V.NoGradient("the log-sum-exp of flash attention is internal (no gradient)")
    if do is None:
        return [None, None]
    s, v = node.inputs
    r = s.type.rank
    p = e("softmax", [s], {"axis": r - 1})
    dv = e("matmul", [e("transpose", [p], {"a": r - 2, "b": r - 1}), do])
    dp = e("matmul", [do, e("transpose", [v], {"a": v.type.rank - 2, "b": v.type.rank - 1})])
    dp = V.unbroadcast(e, dp, p)
    dot = e("sum", [e("mul", [dp, p])], {"axis": (r - 1,), "keepdim": True})
    ds = e("mul", [p, e("sub", [dp, dot])])
    return [V.like(e, ds, s) if V.differentiable(s) else None,
            V.unbroadcast(e, dv, v) if V.differentiable(v) else None]


primitive("flash_attention_mod", Kind.FUSED, [Arg("s", "tensor"), Arg("v", "tensor")],
          internal=True, n_outputs=2,
          doc="softmax(s) @ v in one kernel with the scores' matmul and the pointwise work that "
              "computes s from it (score changes, masks from positions), never storing the scores; "
              "the second result is each row's log-sum-exp",
          vjp=_flash_mod_vjp)(infer=_flash_mod_infer, reference=_flash_mod_ref)


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
          vjp=lambda e, n, cts: _router_vjp(e, n, cts))(
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
    from .prims_contract import expert_infer
    return expert_infer(types[:3], attrs)


def _expert_gemm_ref(ctx, inputs, attrs, out_types, in_types):
    from .prims_contract import expert_ref
    return expert_ref(ctx, inputs[:3], attrs, out_types, in_types[:3])


primitive("expert_gemm", Kind.MOE, [Arg("x", "tensor"), Arg("w", "tensor"), Arg("idx", "tensor"),
                                    Arg("sorted_slots", "tensor"), Arg("block_expert", "tensor"),
                                    Arg("num_blocks", "tensor")], internal=True,
          doc="expert_matmul computed as grouped GEMMs over slots sorted by expert (inputs 4-6: the dispatch)",
          vjp=lambda e, n, cts: _expert_gemm_vjp(e, n, cts))(
    infer=_expert_gemm_infer, reference=_expert_gemm_ref)


def _router_vjp(e, node, cts):
    """Through the chosen logits only: the softmax of the k values (when the router has it),
    scattered back to the experts' logits, then the logits' matmul: dx = dl @ w, dw = dl^T x."""
    dvals = cts[0]
    x, w = node.inputs
    if dvals is None:
        return [None, None]
    vals, idx = node.outputs
    if node.attrs["softmax"]:
        s = e("sum", [e("mul", [dvals, vals])], {"axis": (1,), "keepdim": True})
        dvals = e("mul", [vals, e("sub", [dvals, s])])
    dl = e("scatter_along", [dvals, idx], {"axis": 1, "size": w.type.shape[0]})
    dl = V.like(e, dl, x)
    dx = e("matmul", [dl, w]) if V.differentiable(x) else None
    dw = e("matmul", [e("transpose", [dl], {"a": 0, "b": 1}), x]) if V.differentiable(w) else None
    return [dx, dw]


def _expert_gemm_vjp(e, node, cts):
    """dx by the same grouped GEMMs over the transposed experts (the forward's dispatch reused);
    dw per expert over its slots (expert_wgrad)."""
    (dout,) = cts
    x, w, idx = node.inputs[:3]
    dispatch = list(node.inputs[3:])
    if dout is None:
        return [None] * len(node.inputs)
    dx = dw = None
    if V.differentiable(x):
        dx = e("expert_gemm", [dout, e("transpose", [w], {"a": 1, "b": 2}), idx] + dispatch)
        if x.type.rank == 2:
            dx = e("sum", [dx], {"axis": (1,), "keepdim": False})
    if V.differentiable(w):
        dw = e("expert_wgrad", [x, dout, idx], {"experts": w.type.shape[0]})
    return [dx, dw] + [None] * (len(node.inputs) - 2)
