"""Primitives of packed weight layouts (made by passes/layouts.py, never written in a spec).

The unpacking ones compute a dense weight element from packed storage and are *glue*: the
evaluator turns them into loads and bit arithmetic inside the consuming GEMM's operand loads,
so no dense copy of a weight is ever made.
- ``unpack_int4(packed u8[N, K/2]) -> u8[N, K]``: low nibble is the even k, high nibble the odd k;
- ``unpack_24(values [N, K/2], meta u8[N, K/8]) -> [N, K]``: 2:4 sparsity; each group of 4 along
  K keeps 2 values, whose positions (2 bits each, the lower first) fill a nibble, two groups a
  byte;
- ``fp8_bits(bits u8[N, K]) -> f32[N, K]``: e4m3 bit patterns (fp8 travels as bytes);
- ``round`` (half to even, as torch.round), pointwise;
- ``matmul_i32``: int8 x int8 products accumulated and returned in i32 (W8A8);
- ``fp8_encode(x f32) -> u8``: x rounded to float8 e4m3 (to nearest, ties to even; |x| above
  448, the largest e4m3, saturates), as its bit pattern, pointwise;
- ``matmul_f8(a u8, b u8) -> f32``: e4m3 x e4m3 (both as bit patterns) accumulated in f32; the
  GPU's fp8 tensor-core dot where it has one (sm_89 and newer);
- ``bsr_matmul(x, blocks, col_idx, row_ptr)``: x @ W.T for a block-CSR W (zero blocks skipped);
- ``lowrank_matmul(x, v, u)``: (x @ v.T) @ u.T, the rank-R intermediate kept on chip.
"""
from __future__ import annotations

import torch

from . import fp8, rules
from . import vjp as V
from .dims import evaluate
from .registry import Arg, Kind, RuleError, primitive
from .types import DType, TensorType, accumulator


def _unpack_int4_infer(types, attrs):
    (p,) = types
    if p.dtype != DType.u8 or p.rank != 2:
        raise RuleError(f"unpack_int4 needs u8[N, K/2], got {p}")
    return [TensorType(DType.u8, (p.shape[0], p.shape[1] * 2))]


def unpack_int4_ref(packed: torch.Tensor) -> torch.Tensor:
    lo = packed & 0xF
    hi = (packed >> 4) & 0xF
    return torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)


primitive("unpack_int4", Kind.SHAPE, [Arg("packed", "tensor")], internal=True,
          doc="nibbles of a u8[N, K/2] as u8[N, K] (even k low, odd k high)", vjp=V.no_grad("packed weights are frozen once bound (gradients flow to the other inputs)"))(
    infer=_unpack_int4_infer, reference=lambda ctx, ins, attrs, out, it: unpack_int4_ref(ins[0]))


def _unpack_24_infer(types, attrs):
    vals, meta = types
    if meta.dtype != DType.u8 or vals.rank != 2 or meta.rank != 2:
        raise RuleError(f"unpack_24 needs values [N, K/2] and u8 meta [N, K/8], got {vals}, {meta}")
    return [TensorType(vals.dtype, (vals.shape[0], vals.shape[1] * 2))]


def unpack_24_ref(vals: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    n, half = vals.shape
    groups = half // 2
    nib = torch.stack([meta & 0xF, (meta >> 4) & 0xF], dim=-1).reshape(n, -1)[:, :groups].long()
    i0, i1 = nib & 3, (nib >> 2) & 3
    dense = torch.zeros(n, groups, 4, dtype=vals.dtype, device=vals.device)
    v = vals.reshape(n, groups, 2)
    dense.scatter_(2, i0[..., None], v[..., :1])
    dense.scatter_(2, i1[..., None], v[..., 1:])
    return dense.reshape(n, groups * 4)


primitive("unpack_24", Kind.SHAPE, [Arg("values", "tensor"), Arg("meta", "tensor")], internal=True,
          doc="the dense [N, K] of 2:4 values [N, K/2] and 2-bit positions", vjp=V.no_grad("packed weights are frozen once bound (gradients flow to the other inputs)"))(
    infer=_unpack_24_infer, reference=lambda ctx, ins, attrs, out, it: unpack_24_ref(ins[0], ins[1]).to(
        ctx.dt(out[0].dtype)))


def convert_infer(name: str, src: DType, dst: DType, what: str):
    """The rule of a pointwise conversion: an operand of dtype ``src``, the result ``dst``."""
    def infer(types, attrs):
        (t,) = types
        if t.dtype != src:
            raise RuleError(f"{name} needs {what}, got {t}")
        return [TensorType(dst, tuple(t.shape))]
    return infer


primitive("fp8_bits", Kind.SHAPE, [Arg("bits", "tensor")], internal=True,
          doc="float8 e4m3 values from their bit patterns", vjp=V.no_grad("packed weights are frozen once bound (gradients flow to the other inputs)"))(
    infer=convert_infer("fp8_bits", DType.u8, DType.f32, "u8 bit patterns"),
    reference=lambda ctx, ins, attrs, out, it: ins[0].view(torch.float8_e4m3fn).to(ctx.dt(DType.f32)))


def _round_infer(types, attrs):
    (t,) = types
    rules.need_float(t, "round")
    return [t]


def _t_round(b, args, attrs):
    """Half to even: floor(x + 0.5), minus one where x was exactly halfway to an odd result."""
    x = b.widen(args[0])
    r = b.unary("floor", b.add(x, 0.5))
    halfway = b.binop("eq", b.sub(r, x), 0.5)
    odd = b.binop("ne", b.sub(r, b.mul(b.unary("floor", b.mul(r, 0.5)), 2.0)), 0.0)
    return b.where(b.and_(halfway, odd), b.sub(r, 1.0), r)


primitive("round", Kind.POINTWISE, [Arg("x", "tensor")], internal=True, doc="round half to even", tile=_t_round,
          vjp=V.zero_grad_inputs)(
    infer=_round_infer,
    reference=lambda ctx, ins, attrs, out, it: torch.round(ins[0].to(ctx.compute_dt(it[0].dtype))).to(ctx.dt(out[0].dtype)))


def quantized_matmul_infer(name: str, operand: DType, result: DType, operands_are: str):
    """The rule of a product of quantized operands: a matmul's shapes, both operands of dtype
    ``operand``, the result in ``result``."""
    def infer(types, attrs):
        a, b = types
        if a.dtype != operand or b.dtype != operand:
            raise RuleError(f"{name} needs {operands_are} as both operands")
        from .prims_contract import matmul_infer
        (t,) = matmul_infer(types, attrs)
        return [t.with_dtype(result)]
    return infer


def _mm32_ref(ctx, inputs, attrs, out_types, in_types):
    a, b = inputs
    return torch.matmul(a.to(torch.int64), b.to(torch.int64)).to(torch.int32)


primitive("matmul_i32", Kind.CONTRACTION, [Arg("a", "tensor"), Arg("b", "tensor")], internal=True,
          doc="int8 @ int8 accumulated and returned in i32",
          vjp=V.no_grad("an integer product (W8A8's gradient is taken of the dense x @ w.T: passes/autodiff.py)"))(
    infer=quantized_matmul_infer("matmul_i32", DType.i8, DType.i32, "int8"), reference=_mm32_ref)


def fp8_encode_ref(x: torch.Tensor) -> torch.Tensor:
    return x.float().clamp(-fp8.MAX, fp8.MAX).to(torch.float8_e4m3fn).view(torch.uint8)


primitive("fp8_encode", Kind.POINTWISE, [Arg("x", "tensor")], internal=True,
          doc="x rounded to float8 e4m3 (saturating at 448), as bit patterns",
          vjp=V.no_grad("an encoding to bit patterns"),
          tile=lambda b, args, attrs: fp8.encode(b, args[0]))(
    infer=convert_infer("fp8_encode", DType.f32, DType.u8, "f32 values"), reference=lambda ctx, ins, attrs, out, it: fp8_encode_ref(ins[0]))


def _mmf8_ref(ctx, inputs, attrs, out_types, in_types):
    a, b = (t.view(torch.float8_e4m3fn).to(torch.float64) for t in inputs)
    return torch.matmul(a, b).to(ctx.dt(DType.f32))


primitive("matmul_f8", Kind.CONTRACTION, [Arg("a", "tensor"), Arg("b", "tensor")], internal=True,
          doc="e4m3 @ e4m3 (bit patterns) accumulated and returned in f32",
          vjp=V.no_grad("a product of bit patterns (W8A8's gradient is taken of the dense x @ w.T)"))(
    infer=quantized_matmul_infer("matmul_f8", DType.u8, DType.f32, "e4m3 bit patterns (u8)"), reference=_mmf8_ref)


def _bsr_infer(types, attrs):
    x, blocks, col_idx, row_ptr = types
    n = attrs["n"]
    return [TensorType(x.dtype, tuple(x.shape[:-1]) + (n,))]


def bsr_dense(blocks, col_idx, row_ptr, n: int, k: int) -> torch.Tensor:
    """The dense [n, k] weight of a block-CSR storage (padding cropped)."""
    bs = blocks.shape[-1]
    nb = row_ptr.numel() - 1
    kb = -(-k // bs)
    dense = torch.zeros(nb * bs, kb * bs, dtype=blocks.dtype, device=blocks.device)
    rp = row_ptr.tolist()
    ci = col_idx.tolist()
    for r in range(nb):
        for p in range(rp[r], rp[r + 1]):
            c = ci[p]
            dense[r * bs:(r + 1) * bs, c * bs:(c + 1) * bs] = blocks[p]
    return dense[:n, :k]


def _bsr_ref(ctx, inputs, attrs, out_types, in_types):
    x, blocks, col_idx, row_ptr = inputs
    n, k = evaluate(attrs["n"], ctx.bindings), x.shape[-1]
    w = bsr_dense(blocks, col_idx, row_ptr, n, k)
    acc = ctx.dt(accumulator(in_types[0].dtype))
    return torch.matmul(x.to(acc), w.to(acc).T).to(ctx.dt(out_types[0].dtype))


primitive("bsr_matmul", Kind.CONTRACTION, [Arg("x", "tensor"), Arg("blocks", "tensor"), Arg("col_idx", "tensor"),
                                           Arg("row_ptr", "tensor")], internal=True,
          doc="x @ W.T for W stored as block-CSR (only the non-zero blocks are read)",
          vjp=V.no_grad("the gradient through a block-sparse weight is not built yet"))(
    infer=_bsr_infer, reference=_bsr_ref)


def _lowrank_infer(types, attrs):
    x, v, u = types
    if v.shape[1] != x.shape[-1] or u.shape[1] != v.shape[0]:
        raise RuleError(f"lowrank_matmul: x {x}, v {v}, u {u} do not fit")
    return [TensorType(x.dtype, tuple(x.shape[:-1]) + (u.shape[0],))]


def _lowrank_vjp(e, node, cts):
    """dx = (dy @ u) @ v: the same two-step product over the transposed factors (frozen)."""
    (dy,) = cts
    x, v, u = node.inputs
    if dy is None or not V.differentiable(x):
        return [None, None, None]
    return [e("lowrank_matmul", [dy, e("transpose", [u], {"a": 0, "b": 1}), e("transpose", [v], {"a": 0, "b": 1})]),
            None, None]


def _lowrank_ref(ctx, inputs, attrs, out_types, in_types):
    x, v, u = inputs
    dt = in_types[0].dtype
    acc = ctx.dt(accumulator(dt))
    t = torch.matmul(x.to(acc), v.to(acc).T).to(ctx.dt(dt))
    return torch.matmul(t.to(acc), u.to(acc).T).to(ctx.dt(out_types[0].dtype))


primitive("lowrank_matmul", Kind.CONTRACTION, [Arg("x", "tensor"), Arg("v", "tensor"), Arg("u", "tensor")],
          internal=True, doc="(x @ v.T) @ u.T in one kernel, the rank-R product kept on chip", vjp=_lowrank_vjp)(
    infer=_lowrank_infer, reference=_lowrank_ref)
