"""Contractions: ``matmul`` (``a @ b``, torch.matmul semantics with broadcast batch axes) and
``expert_matmul`` (a mixture-of-experts layer's per-token expert products). Both accumulate in
f32 (i32 for integers) and return the input dtype."""
from __future__ import annotations

import torch

from . import rules
from . import vjp as V
from .dims import format_shape
from .registry import Arg, Kind, RuleError, primitive
from .types import DType, TensorType, accumulator


def matmul_infer(types, attrs):
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


def _t(e, x):
    r = x.type.rank
    return e("transpose", [x], {"a": r - 2, "b": r - 1})


def _is_transpose(e, v) -> bool:
    """Is ``v`` the transpose of its last two axes (``w.T``)? (The emitter of passes/autodiff
    knows each value's producer; without it, no.)"""
    n = getattr(e, "producers", {}).get(v)
    r = v.type.rank
    return n is not None and n.op == "transpose" and {n.attrs["a"] % r, n.attrs["b"] % r} == {r - 2, r - 1}


def _matmul_vjp(e, node, cts):
    """dA = dC @ B^T, dB = A^T @ dC, each summed over the batch axes its operand was broadcast
    along; vector operands as matrices with one row (A) or one column (B)."""
    (dc,) = cts
    a, b = node.inputs
    if dc is None or not node.out.type.dtype.is_float:
        return [None, None]
    A = a if a.type.rank > 1 else e("reshape", [a], {"shape": (1,) + tuple(a.type.shape)})
    B = b if b.type.rank > 1 else e("reshape", [b], {"shape": tuple(b.type.shape) + (1,)})
    batch = tuple(dc.type.shape[: dc.type.rank - (a.type.rank > 1) - (b.type.rank > 1)])
    M = A.type.shape[-2]
    N = B.type.shape[-1]
    dC = dc if a.type.rank > 1 and b.type.rank > 1 else e("reshape", [dc], {"shape": batch + (M, N)})
    da = db = None
    if V.differentiable(a):
        da = V.unbroadcast(e, e("matmul", [dC, _t(e, B)]), A)
        if a.type.rank == 1:
            da = e("reshape", [da], {"shape": tuple(a.type.shape)})
    if V.differentiable(b):
        if B.type.rank == 2 and A.type.rank > 2 and tuple(A.type.shape[:-2]) == batch:
            # a matrix shared by every batch (a weight: x[B, S, K] @ w.T): one product contracting
            # the batch axes and rows together, not a product per batch summed afterwards
            rows = 1
            for d in A.type.shape[:-1]:
                rows = rows * d
            A2 = e("reshape", [A], {"shape": (rows, A.type.shape[-1])})
            dC2 = e("reshape", [dC], {"shape": (rows, N)})
            if _is_transpose(e, b):
                # (dC2^T @ A2)^T: b is a transposed weight (x @ w.T), so w's own gradient is the
                # product itself (the two transposes cancel), with no copy kernel transposing it
                db = _t(e, e("matmul", [_t(e, dC2), A2]))
            else:
                db = e("matmul", [_t(e, A2), dC2])
        else:
            db = V.unbroadcast(e, e("matmul", [_t(e, A), dC]), B)
        if b.type.rank == 1:
            db = e("reshape", [db], {"shape": tuple(b.type.shape)})
    return [da, db]


primitive("matmul", Kind.CONTRACTION, [Arg("a", "tensor"), Arg("b", "tensor")], internal=True,
          doc="a @ b (torch.matmul)", vjp=_matmul_vjp)(infer=matmul_infer, reference=_matmul_ref)


def expert_infer(types, attrs):
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


def expert_ref(ctx, inputs, attrs, out_types, in_types):
    """The reference of a per-token expert matmul (shared with the fused MoE GEMM, prims_fused.py)."""
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


def _expert_vjp(e, node, cts):
    """dx[t(, j)] = dout[t, j] @ w[idx[t, j]] (the same grouped product over the transposed
    experts, summed over the k choices for a shared x); dw[e] = sum of dout[t, j]^T x[t(, j)]
    over the slots routed to e (expert_wgrad)."""
    (dout,) = cts
    x, w, idx = node.inputs
    if dout is None or not node.out.type.dtype.is_float:
        return [None, None, None]
    dx = dw = None
    if V.differentiable(x):
        wt = e("transpose", [w], {"a": 1, "b": 2})                    # [E, K, N]
        dx = e("expert_matmul", [dout, wt, idx])                     # [T, k, K]
        if x.type.rank == 2:
            dx = e("sum", [dx], {"axis": (1,), "keepdim": False})
    if V.differentiable(w):
        dw = e("expert_wgrad", [x, dout, idx], {"experts": w.type.shape[0]})
    return [dx, dw, None]


primitive("expert_matmul", Kind.MOE, [Arg("x", "tensor"), Arg("w", "tensor"), Arg("idx", "tensor")],
          doc="out[t, j] = x[t(, j)] @ w[idx[t, j]].T for mixture-of-experts layers", vjp=_expert_vjp)(
    infer=expert_infer, reference=expert_ref)


def _wgrad_infer(types, attrs):
    x, dout, idx = types
    return [TensorType(x.dtype, (attrs["experts"], dout.shape[2], x.shape[-1]))]


def _wgrad_ref(ctx, inputs, attrs, out_types, in_types):
    from .dims import evaluate
    x, dout, idx = inputs
    experts = evaluate(attrs["experts"], ctx.bindings)
    dt = in_types[0].dtype
    acc = ctx.dt(accumulator(dt))
    t, k = idx.shape
    xs = x[:, None, :].expand(t, k, x.shape[-1]) if x.dim() == 2 else x
    out = torch.zeros(experts, dout.shape[2], x.shape[-1], dtype=acc, device=x.device)
    flat = idx.reshape(-1).long()
    xs, ds = xs.reshape(t * k, -1).to(acc), dout.reshape(t * k, -1).to(acc)
    for ex in torch.unique(flat).tolist():
        sel = flat == ex
        out[ex] = ds[sel].T @ xs[sel]
    return out.to(ctx.dt(out_types[0].dtype))


primitive("expert_wgrad", Kind.MOE, [Arg("x", "tensor"), Arg("dout", "tensor"), Arg("idx", "tensor")],
          internal=True, doc="dw[e] = sum over the slots routed to e of dout^T x (expert_matmul's weight gradient)",
          vjp=V.no_grad("a gradient's gradient (double backward) is not supported"))(
    infer=_wgrad_infer, reference=_wgrad_ref)
