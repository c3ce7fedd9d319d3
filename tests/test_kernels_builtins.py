"""Every built-in of DSL.md's table, and the operators, through the compiled kernels (Triton's
interpreter here) against the float64 reference executor.

Each case is a small spec template (``$T`` is the working float dtype) run in f32, f16 and
bf16 (through opforge's bf16 corrections of the interpreter, runtime/interpreter_patches.py) at
awkward sizes (1, 7, 33, 130 where the spec allows). Outputs start poisoned (NaN, or sentinels
for integers and bools, see kernel_helpers), so every element must be written; integer and bool
results must match exactly, floats within ``tolerance_for(graph)``.

Cases that hit a known compiler bug are strict xfails (KNOWN_BUGS below, each with the
reproducer's symptom): they fail loudly once the bug is fixed, asking for the marker to go.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

from .kernel_helpers import compiled, run_case, typed

DTYPES = ("f32", "f16", "bf16")


@dataclass
class Case:
    name: str
    template: str
    sizes: list[dict]
    prepare: Callable | None = None     # ins -> ins (positive inputs, ties, zeros)
    dtypes: tuple = DTYPES
    seeds: tuple = (0,)
    ops: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.ops = re.findall(r"^\s*op\s+(\w+)\s*\(", self.template, re.MULTILINE)


# -- input transformations ----------------------------------------------------------------------
def positive(*names, lo=0.05):
    def prep(ins):
        out = dict(ins)
        for n in [n for n in names if n in ins]:
            out[n] = (ins[n].abs() + lo).to(ins[n].dtype)
        return out
    return prep


def scaled(factor, *names):
    def prep(ins):
        out = dict(ins)
        for n in names:
            if n in ins:
                out[n] = (ins[n].float() * factor).to(ins[n].dtype)
        return out
    return prep


def quantized(step=0.5, *names):
    """Round floats to a coarse grid so comparisons see equal operands."""
    def prep(ins):
        out = dict(ins)
        for n, v in ins.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and (not names or n in names):
                out[n] = (torch.round(v.float() / step) * step).to(v.dtype)
        return out
    return prep


def with_zeros(*names):
    def prep(ins):
        out = dict(ins)
        for n in names:
            if n not in ins:
                continue
            v = ins[n].clone()
            v.view(-1)[::3] = 0
            out[n] = v
        return out
    return prep


def ties(*names):
    """Few distinct values (from the seeded inputs): many equal elements per row, for top-k
    ties. Floats become floor(1.5 x) in [-2, 2], integers x mod 3."""
    def prep(ins):
        out = dict(ins)
        for n in names:
            if n not in ins:
                continue
            v = ins[n]
            if v.is_floating_point():
                out[n] = torch.floor(v.float() * 1.5).clamp(-2, 2).to(v.dtype)
            else:
                out[n] = torch.remainder(v, 3).to(v.dtype)
        return out
    return prep


def chain(*preps):
    def prep(ins):
        for p in preps:
            ins = p(ins)
        return ins
    return prep


# -- sizes --------------------------------------------------------------------------------------
MN = [dict(M=1, N=1), dict(M=7, N=33), dict(M=33, N=130), dict(M=130, N=7)]
ABC = [dict(A=1, B=1, C=1), dict(A=2, B=7, C=33), dict(A=3, B=1, C=130), dict(A=1, B=33, C=7)]

CASES = [
    # ---- elementwise unary ----
    Case("unary", """
op u_abs(x: $T[M, N]) -> $T[M, N] { return abs(x) }
op u_neg(x: $T[M, N]) -> $T[M, N] { return -x }
op u_exp(x: $T[M, N]) -> $T[M, N] { return exp(x) }
op u_sin(x: $T[M, N]) -> $T[M, N] { return sin(x) }
op u_cos(x: $T[M, N]) -> $T[M, N] { return cos(x) }
op u_tanh(x: $T[M, N]) -> $T[M, N] { return tanh(x) }
op u_sigmoid(x: $T[M, N]) -> $T[M, N] { return sigmoid(x) }
op u_relu(x: $T[M, N]) -> $T[M, N] { return relu(x) }
op u_silu(x: $T[M, N]) -> $T[M, N] { return silu(x) }
op u_gelu(x: $T[M, N]) -> $T[M, N] { return gelu(x) }
op u_gelu_none(x: $T[M, N]) -> $T[M, N] { return gelu(x, approximate="none") }
op u_gelu_tanh(x: $T[M, N]) -> $T[M, N] { return gelu(x, approximate="tanh") }
op u_softplus(x: $T[M, N]) -> $T[M, N] { return softplus(x) }
""", MN),
    # softplus above its threshold (x > 20 returns x), tanh/sigmoid/exp far from 0
    Case("unary_wide", """
op w_softplus(x: $T[M, N]) -> $T[M, N] { return softplus(x) }
op w_tanh(x: $T[M, N]) -> $T[M, N] { return tanh(x) }
op w_sigmoid(x: $T[M, N]) -> $T[M, N] { return sigmoid(x) }
op w_gelu(x: $T[M, N]) -> $T[M, N] { return gelu(x) + gelu(x, approximate="tanh") }
""", MN[1:3], prepare=scaled(9.0, "x")),
    Case("unary_positive", """
op p_log(x: $T[M, N]) -> $T[M, N] { return log(x) }
op p_sqrt(x: $T[M, N]) -> $T[M, N] { return sqrt(x) }
op p_rsqrt(x: $T[M, N]) -> $T[M, N] { return rsqrt(x) }
op p_pow_half(x: $T[M, N]) -> $T[M, N] { return x ** 0.5 }
op p_pow_m1(x: $T[M, N]) -> $T[M, N] { return x ** -1 }
op p_pow_2(x: $T[M, N]) -> $T[M, N] { return x ** 2 }
op p_pow_3(x: $T[M, N]) -> $T[M, N] { return (x - 1) ** 3 }
""", MN, prepare=positive("x")),
    Case("pow_signed", """
op s_pow_2(x: $T[M, N]) -> $T[M, N] { return x ** 2 }
op s_pow_2_sum(x: $T[M, N], y: $T[N]) -> $T[M, N] { return (x + y) ** 2 - y ** 2 }
""", MN),
    # ---- elementwise binary, broadcasting, scalars ----
    Case("binary", """
op b_add(x: $T[M, N], y: $T[N]) -> $T[M, N] { return x + y }
op b_sub(x: $T[M, 1], y: $T[N]) -> $T[M, N] { return x - y }
op b_mul(x: $T[B, 1, N], y: $T[M, 1]) -> $T[B, M, N] { return x * y }
op b_div(x: $T[M, N], y: $T[M, N]) -> $T[M, N] { return x / (abs(y) + 0.5) }
op b_div_bcast(x: $T[N], y: $T[M, 1]) -> $T[M, N] { return x / (y * y + 1) }
op b_scalars(x: $T[M, N], s: f32 = 0.75) -> $T[M, N] { return 2 * x - 1 + x * s + s / 4 }
op b_scalar_param(x: $T[M, N], s: f32) -> $T[M, N] { return (x - s) * s }
op b_int_scalar(x: $T[M, N], k: i32 = 3) -> $T[M, N] { return x * k + k }
op b_size_scalar(x: $T[M, N]) -> $T[M, N] { return x * rsqrt(cast(N, f32)) + M }
op b_chain(x: $T[M, N], y: $T[M, N], z: $T[N]) -> $T[M, N] { return (x - y) * (x + y) / (z * z + 1) - x }
""", [dict(M=1, N=1, B=1), dict(M=7, N=33, B=2), dict(M=33, N=130, B=1), dict(M=1, N=7, B=3)]),
    # scalars of the working dtype (f16 scalar parameters and sizes cast to f16)
    Case("scalar_dtype", """
op sd_param(x: $T[M, N], s: $T = 0.5) -> $T[M, N] { return x + s }
op sd_size(x: $T[M, N]) -> $T[M, N] { return x * cast(N, $T) }
""", MN[1:3]),
    # parameters with only size-1 axes, broadcast against full tensors; reductions over every axis
    Case("degenerate_axes", """
op dg_one_one(x: $T[M, N], y: $T[1, 1]) -> $T[M, N] { return x + y }
op dg_one(x: $T[M, N], y: $T[1]) -> $T[M, N] { return x * y }
op dg_center_all(x: $T[M, N]) -> $T[M, N] { return x - sum(x, axis=(0, 1), keepdim=true) }
op dg_softmax_vec(x: $T[M, N], y: $T[N]) -> $T[M, N] { return x + softmax(y, axis=0) }
op dg_stored_one_one(x: $T[M, N], y: $T[M, 1]) -> $T[M, N] { return x + sum(y, axis=0, keepdim=true) }
op dg_global_max_then_rows(x: $T[M, N]) -> $T[M, N] {
    return x - max(x, axis=(0, 1), keepdim=true) + min(x, axis=-1, keepdim=true)
}
""", MN[1:3]),
    Case("int_arith", """
op i_add(a: i32[M, N], b: i32[N]) -> i32[M, N] { return a + b * 2 - 1 }
op i_mul(a: i32[M, N], b: i32[M, N]) -> i32[M, N] { return a * b }
op i_max(a: i32[M, N], b: i32[M, N]) -> i32[M, N] { return maximum(a, b) - minimum(a, 0) }
op i_abs(a: i64[M, N]) -> i64[M, N] { return abs(a) + relu(a) }
op i_div(a: i32[M, N], b: i32[M, N]) -> f32[M, N] { return a / (abs(b) + 1) }
""", MN, dtypes=("int",)),
    Case("maximum_minimum_where", """
op m_max(x: $T[M, N], y: $T[N]) -> $T[M, N] { return maximum(x, y) }
op m_min(x: $T[M, N], y: $T[M, 1]) -> $T[M, N] { return minimum(x, y) }
op m_max_scalar(x: $T[M, N]) -> $T[M, N] { return maximum(x, 0.25) + minimum(x, -0.25) }
op m_where(x: $T[M, N], y: $T[M, N]) -> $T[M, N] { return where(x > y, x, y * 2) }
op m_where_scalar(x: $T[M, N]) -> $T[M, N] { return where(x > 0, x, 0.1 * x) }
op m_where_bcast(c: bool[M, 1], x: $T[N], y: $T[M, N]) -> $T[M, N] { return where(c, x, -y) }
op m_where_inf(x: $T[M, N]) -> $T[M, N] { return exp(where(x < 0.5, x, -inf)) }
""", MN),
    Case("compare", """
op c_lt(x: $T[M, N], y: $T[N]) -> bool[M, N] { return x < y }
op c_le(x: $T[M, N]) -> bool[M, N] { return x <= 0.5 }
op c_gt(x: $T[M, N], y: $T[M, N]) -> bool[M, N] { return x > y }
op c_ge(x: $T[M, N], y: $T[M, 1]) -> bool[M, N] { return x >= y }
op c_eq(x: $T[M, N], y: $T[M, N]) -> bool[M, N] { return x == y }
op c_ne(x: $T[M, N], y: $T[N]) -> bool[M, N] { return x != y }
op c_bools(x: $T[M, N], y: $T[M, N]) -> bool[M, N] { return (x < y) == (y > 0) }
op c_int(a: i32[M, N], b: i32[N]) -> bool[M, N] { return a >= b }
op c_mixed(x: $T[M, N], y: $T[M, N]) -> $T[M, N] { return cast(x > y, $T) * x + cast(x == y, $T) }
""", MN, prepare=quantized(0.5)),
    # ---- cast ----
    Case("cast", """
op k_i32(x: $T[M, N]) -> i32[M, N] { return cast(x * 4, i32) }
op k_i64(x: $T[M, N]) -> i64[M, N] { return cast(x * 16, i64) }
op k_i8(x: $T[M, N]) -> i8[M, N] { return cast(x * 16, i8) }
op k_u8(x: $T[M, N]) -> u8[M, N] { return cast(abs(x) * 32, u8) }
op k_bool(x: $T[M, N]) -> bool[M, N] { return cast(x, bool) }
op k_f16(x: $T[M, N]) -> f16[M, N] { return cast(x * 3, f16) }
op k_f32(x: $T[M, N]) -> f32[M, N] { return cast(x, f32) * 3 }
op k_roundtrip(x: $T[M, N]) -> $T[M, N] { return cast(cast(x, f16), $T) + cast(cast(x * 4, i32), $T) }
op k_from_i32(a: i32[M, N]) -> $T[M, N] { return cast(a, $T) * 0.5 }
op k_from_bool(c: bool[M, N], x: $T[M, N]) -> $T[M, N] { return cast(c, $T) + x }
op k_int_to_bool(a: i32[M, N]) -> bool[M, N] { return cast(a, bool) }
op k_bool_to_int(c: bool[M, N]) -> i32[M, N] { return cast(c, i32) * 3 }
op k_i32_to_i8(a: i32[M, N]) -> i8[M, N] { return cast(a, i8) }
""", MN, prepare=chain(with_zeros("x"), quantized(1 / 64, "x"))),
    # ---- reductions ----
    Case("reduce", """
op r_sum_last(x: $T[A, B, C]) -> $T[A, B] { return sum(x, axis=-1) }
op r_sum_keep(x: $T[A, B, C]) -> $T[A, B, 1] { return sum(x, axis=2, keepdim=true) }
op r_sum_first(x: $T[A, B, C]) -> $T[B, C] { return sum(x, axis=0) }
op r_sum_mid_keep(x: $T[A, B, C]) -> $T[A, 1, C] { return sum(x, axis=1, keepdim=true) }
op r_mean_last(x: $T[A, B, C]) -> $T[A, B] { return mean(x, axis=-1) }
op r_mean_mid(x: $T[A, B, C]) -> $T[A, C] { return mean(x, axis=-2) }
op r_mean_tuple_keep(x: $T[A, B, C]) -> $T[1, B, 1] { return mean(x, axis=(0, 2), keepdim=true) }
op r_max_last_keep(x: $T[A, B, C]) -> $T[A, B, 1] { return max(x, axis=-1, keepdim=true) }
op r_max_first(x: $T[A, B, C]) -> $T[B, C] { return max(x, axis=0) }
op r_max_tuple(x: $T[A, B, C]) -> $T[B] { return max(x, axis=(0, 2)) }
op r_min_last(x: $T[A, B, C]) -> $T[A, B] { return min(x, axis=2) }
op r_min_tuple(x: $T[A, B, C]) -> $T[A] { return min(x, axis=(1, 2)) }
op r_min_mid_keep(x: $T[A, B, C]) -> $T[A, 1, C] { return min(x, axis=1, keepdim=true) }
op r_sum_all_keep(x: $T[A, B, C]) -> $T[1, 1, 1] { return sum(x, axis=(0, 1, 2), keepdim=true) }
op r_fused_norm(x: $T[A, B, C], w: $T[C]) -> $T[A, B, C] {
    xf = cast(x, f32)
    ms = mean(xf * xf, axis=-1, keepdim=true)
    return cast(xf * rsqrt(ms + 1e-5), $T) * w
}
op r_center(x: $T[A, B, C]) -> $T[A, B, C] { return x - mean(x, axis=-1, keepdim=true) }
op r_center_mid(x: $T[A, B, C]) -> $T[A, B, C] { return x - max(x, axis=1, keepdim=true) }
op r_two_outputs(x: $T[A, B, C]) -> ($T[A, B], $T[A, B, C]) {
    s = sum(exp(x), axis=-1)
    return s, x * 2
}
""", ABC),
    Case("reduce_int", """
op ri_sum(a: i32[A, B, C]) -> i32[A, B] { return sum(a, axis=-1) }
op ri_sum_first(a: i32[A, B, C]) -> i32[B, C] { return sum(a, axis=0) }
op ri_max(a: i32[A, B, C]) -> i32[A, C] { return max(a, axis=1) }
op ri_min_keep(a: i32[A, B, C]) -> i32[A, B, 1] { return min(a, axis=-1, keepdim=true) }
op ri_bool_count(x: f32[A, B, C]) -> i32[A, B] { return sum(cast(x > 0, i32), axis=-1) }
""", ABC, dtypes=("int",)),
    Case("softmax", """
op sm_last(x: $T[A, B, C]) -> $T[A, B, C] { return softmax(x, axis=-1) }
op sm_default(x: $T[A, B, C]) -> $T[A, B, C] { return softmax(x) }
op sm_mid(x: $T[A, B, C]) -> $T[A, B, C] { return softmax(x, axis=1) }
op sm_first(x: $T[A, B, C]) -> $T[A, B, C] { return softmax(x, axis=0) }
op lsm_last(x: $T[A, B, C]) -> $T[A, B, C] { return log_softmax(x, axis=-1) }
op lsm_default(x: $T[A, B, C]) -> $T[A, B, C] { return log_softmax(x) }
op lsm_mid(x: $T[A, B, C]) -> $T[A, B, C] { return log_softmax(x, axis=1) }
op sm_scaled(x: $T[A, B, C], t: f32 = 0.5) -> $T[A, B, C] { return softmax(x * t + 1, axis=-1) * 3 }
op sm_of_f32(x: $T[A, B, C]) -> $T[A, B, C] { return cast(softmax(cast(x, f32), axis=-1), $T) }
""", ABC),
    Case("cumsum", """
op cs_last(x: $T[A, B, C]) -> $T[A, B, C] { return cumsum(x, axis=-1) }
op cs_first(x: $T[A, B, C]) -> $T[A, B, C] { return cumsum(x, axis=0) }
op cs_mid(x: $T[A, B, C]) -> $T[A, B, C] { return cumsum(x, axis=1) }
op cs_computed(x: $T[A, B, C]) -> $T[A, B, C] { return cumsum(exp(x) * 0.5, axis=2) - x }
op cs_int(a: i32[A, B, C]) -> i32[A, B, C] { return cumsum(a, axis=-1) }
op cs_int_mid(a: i32[A, B, C]) -> i32[A, B, C] { return cumsum(a, axis=1) }
""", ABC),
    # ---- shape ----
    Case("reshape", """
op rs_flat(x: $T[M, D]) -> $T[M * D] { return reshape(x, [-1]) }
op rs_flat_computed(x: $T[M, D]) -> $T[M * D] { return reshape(exp(x), [-1]) * 2 }
op rs_split(x: $T[M, D]) -> $T[M, D / 4, 4] { return reshape(x, [M, -1, 4]) }
op rs_split_sym(x: $T[M, D], e: $T[E]) -> $T[M, D / E, E] { return reshape(sigmoid(x), [M, D / E, E]) * e }
op rs_merge(x: $T[M, D], e: $T[E]) -> $T[M, D] {
    y = reshape(x, [M, -1, E]) + e
    return reshape(y, [M, D])
}
op rs_merge_first(x: $T[M, D]) -> $T[D * M] { return reshape(x.T, [-1]) + 1 }
op rs_unit(x: $T[M, D]) -> $T[M, 1, D, 1] { return reshape(x, [M, 1, D, 1]) * 2 }
op rs_reduce(x: $T[M, D], e: $T[E]) -> $T[M, D / E] { return sum(reshape(x, [M, D / E, E]) * e, axis=-1) }
""", [dict(M=1, D=4, E=1), dict(M=7, D=132, E=4), dict(M=33, D=12, E=12), dict(M=2, D=28, E=2)]),
    Case("permute_transpose", """
op pt_perm(x: $T[A, B, C]) -> $T[C, A, B] { return permute(x, [2, 0, 1]) }
op pt_perm_computed(x: $T[A, B, C]) -> $T[B, C, A] { return permute(x * 2, [1, 2, 0]) + 1 }
op pt_perm_neg(x: $T[A, B, C]) -> $T[A, C, B] { return permute(x, [0, -1, -2]) }
op pt_transpose(x: $T[A, B, C]) -> $T[C, B, A] { return transpose(x, 0, 2) }
op pt_transpose_neg(x: $T[A, B, C]) -> $T[A, C, B] { return exp(transpose(x, -1, 1)) }
op pt_T(x: $T[A, B, C]) -> $T[A, C, B] { return x.T }
op pt_T_add(x: $T[A, B, C], y: $T[A, C, B]) -> $T[A, C, B] { return x.T + y }
op pt_TT(x: $T[A, B, C]) -> $T[A, B, C] { return x.T.T * 2 }
op pt_perm_reduce(x: $T[A, B, C]) -> $T[C, A] { return sum(permute(x, [2, 0, 1]), axis=-1) }
""", ABC),
    Case("concat", """
op cc_two(x: $T[M, N], y: $T[M, K]) -> $T[M, N + K] { return concat(x, y, axis=1) }
op cc_two_neg_axis(x: $T[M, N], y: $T[M, K]) -> $T[M, N + K] { return concat(x * 2, exp(y), axis=-1) }
op cc_three(x: $T[M, N], y: $T[K, N], z: $T[M, N]) -> $T[M + K + M, N] {
    return concat(x, sigmoid(y), z * 2 - x, axis=0)
}
op cc_default_axis(x: $T[M, N], y: $T[K, N]) -> $T[M + K, N] { return concat(x, y) }
op cc_consumed(x: $T[M, N], y: $T[M, K]) -> $T[M] { return sum(concat(x, -y, axis=1), axis=-1) }
op cc_self(x: $T[M, N]) -> $T[M, N + N + N] { return concat(x, -x, x * x, axis=-1) }
op cc_three_consumed(x: $T[M, N], y: $T[K, N], z: $T[M, N]) -> $T[M + K + M, N] {
    return concat(x, sigmoid(y), z * 2 - x, axis=0) * 2
}
op cc_two_computed_consumed(x: $T[M, N], y: $T[M, K]) -> $T[M, N + K] {
    return exp(concat(x * 2, -y, axis=1)) + 1
}
""", [dict(M=1, N=1, K=1), dict(M=7, N=33, K=5), dict(M=33, N=7, K=130), dict(M=2, N=130, K=1)]),
    # ---- selection ----
    Case("topk", """
op tk1(x: $T[M, N]) -> ($T[M, 1], i32[M, 1]) {
    v, i = topk(x, k=1)
    return v, i
}
op tk2(x: $T[M, N]) -> ($T[M, 2], i32[M, 2]) {
    v, i = topk(x, k=2)
    return v, i
}
op tk5(x: $T[M, N]) -> ($T[M, 5], i32[M, 5]) {
    v, i = topk(x, k=5, axis=-1)
    return v, i
}
op tk_axis0(x: $T[N, M]) -> ($T[2, M], i32[2, M]) {
    v, i = topk(x, k=2, axis=0)
    return v, i
}
op tk_computed(x: $T[M, N], y: $T[N]) -> ($T[M, 2], i32[M, 2]) {
    v, i = topk(x * y - 1, k=2)
    return v, i
}
op tk_int(a: i32[M, N]) -> (i32[M, 5], i32[M, 5]) {
    v, i = topk(a, k=5)
    return v, i
}
op tk_then(x: $T[M, N]) -> $T[M, 5] {
    v, i = topk(x, k=5)
    return softmax(v, axis=-1) + cast(i, $T)
}
""", [dict(M=1, N=5), dict(M=7, N=33), dict(M=33, N=130), dict(M=3, N=7)],
         prepare=ties("x", "a"), seeds=(0, 1)),
    Case("topk_distinct", """
op tkd2(x: $T[M, N]) -> ($T[M, 2], i32[M, 2]) {
    v, i = topk(x, k=2)
    return v, i
}
op tkd5(x: $T[B, M, N]) -> ($T[B, M, 5], i32[B, M, 5]) {
    v, i = topk(x, k=5)
    return v, i
}
op tkd_returned(x: $T[B, M, N]) -> ($T[B, M, 2], i32[B, M, 2]) { return topk(x, k=2) }
op tkd_returned_among(x: $T[B, M, N]) -> ($T[B, M, N], $T[B, M, 3], i32[B, M, 3], $T[B, M]) {
    return x * 2, topk(exp(x), k=3), sum(x, axis=-1)
}
""", [dict(B=1, M=1, N=5), dict(B=2, M=7, N=130)]),
    Case("causal", """
op ca_where(x: $T[S, T]) -> $T[S, T] { return where(causal(S, T), x, 0.0) }
op ca_mask(x: $T[S, T]) -> bool[S, T] { return causal(S, T) }
op ca_square(x: $T[S, S]) -> $T[S, S] { return where(causal(S, S), x, x * 2) }
op ca_batched(x: $T[B, S, T]) -> $T[B, S, T] { return where(causal(S, T), x, -1.5) }
""", [dict(S=7, T=33, B=2), dict(S=1, T=130, B=1), dict(S=5, T=5, B=2)]),
    # more queries than keys: T - S < 0
    Case("causal_tall", """
op cat_where(x: $T[S, T]) -> $T[S, T] { return where(causal(S, T), x, 0.0) }
op cat_mask(x: $T[S, T]) -> bool[S, T] { return causal(S, T) }
""", [dict(S=33, T=7), dict(S=130, T=1)]),
    Case("causal_softmax", """
op cs_softmax(x: $T[S, T]) -> $T[S, T] { return softmax(where(causal(S, T), x, -inf), axis=-1) }
""", [dict(S=7, T=33), dict(S=1, T=130), dict(S=33, T=33)]),
    Case("expert_matmul", """
op em_2d(x: $T[T, K], w: $T[E, N, K], idx: i32[T, J]) -> $T[T, J, N] { return expert_matmul(x, w, idx) }
op em_3d(x: $T[T, J, K], w: $T[E, N, K], idx: i32[T, J]) -> $T[T, J, N] { return expert_matmul(x, w, idx) }
op em_epilogue(x: $T[T, K], w: $T[E, N, K], idx: i32[T, J]) -> $T[T, J, N] {
    return silu(expert_matmul(x * 2, w, idx)) + 1
}
""", [dict(T=1, K=1, E=1, N=1, J=1), dict(T=7, K=33, E=4, N=5, J=2), dict(T=3, K=130, E=3, N=33, J=3)]),
    # ---- indexing ----
    Case("indexing", """
op ix_steps(x: $T[M, N]) -> $T[3, N / 3] { return x[1:7:2, ::3] }
op ix_steps_offset(x: $T[M, N]) -> $T[M - 1, N / 3] { return x[1:, 2::3] * 2 }
op ix_negative(x: $T[M, N]) -> $T[N] { return x[-1] }
op ix_negative_slice(x: $T[M, N]) -> $T[M, 2] { return x[:, -3:-1] }
op ix_int_mid(x: $T[M, N]) -> $T[M] { return x[:, 2] + x[:, -1] }
op ix_none(x: $T[M, N]) -> $T[M, 1, N] { return x[:, None] }
op ix_none_bcast(x: $T[M, N]) -> $T[M, M, N] { return x[:, None] - x[None, :] }
op ix_ellipsis(x: $T[B, M, N]) -> $T[B, M, 2] { return x[..., 1:3] }
op ix_ellipsis_none(x: $T[B, M, N]) -> $T[B, M, N, 1] { return exp(x[..., None]) }
op ix_ellipsis_int(x: $T[B, M, N]) -> $T[B, N] { return x[..., 0, :] }
op ix_first_half(x: $T[M, N]) -> $T[M, N / 3] { return x[:, :N/3] + x[:, N/3:2*N/3] }
op ix_negative_bcast(x: $T[M, N]) -> $T[M, N] { return x * x[-1] - x[:, -1:] }
op ix_negative_start(x: $T[B, M, N]) -> $T[B, 2, N] { return x[:, -3:-1] * 2 }
op ix_steps_consumed(x: $T[M, N]) -> $T[M] { return sum(x[:, 1::3], axis=-1) }
""", [dict(M=7, N=3, B=1), dict(M=9, N=33, B=2), dict(M=130, N=6, B=1)]),
    Case("gather", """
op g_rows(emb: $T[V, D], ids: i32[T]) -> $T[T, D] { return emb[ids] }
op g_rows_2d(emb: $T[V, D], ids: i64[B, T]) -> $T[B, T, D] { return emb[ids] * 2 }
op g_rows_computed(emb: $T[V, D], ids: i32[T], w: $T[D]) -> $T[T] { return sum(emb[ids] * w, axis=-1) }
""", [dict(V=1, D=1, T=1, B=1), dict(V=7, D=33, T=5, B=2), dict(V=130, D=7, T=33, B=1)]),
    # ---- results that are parameters, repeats, views of parameters or of computed values ----
    Case("results", """
op o_param(x: $T[M, N]) -> $T[M, N] { return x }
op o_param_view(x: $T[M, N]) -> $T[N, M] { return x.T }
op o_repeat(x: $T[M, N]) -> ($T[M, N], $T[M, N]) {
    y = x * 2
    return y, y
}
op o_value_and_view(x: $T[M, N]) -> ($T[M, N], $T[N, M]) {
    y = x * 2
    return y, y.T
}
op o_param_and_value(x: $T[M, N]) -> ($T[M, N], $T[M, N]) { return x, exp(x) }
op o_reduced_and_full(x: $T[M, N]) -> ($T[M], $T[M, N]) {
    s = sum(exp(x), axis=-1)
    return s, exp(x) / s[:, None]
}
op o_keepdim_and_softmax(x: $T[M, N]) -> ($T[M, 1], $T[M, N]) {
    m = max(x, axis=-1, keepdim=true)
    return m, softmax(x, axis=-1)
}
op o_view_of_reduction(x: $T[M, N]) -> $T[N, M] { return softmax(x, axis=-1).T }
op o_view_of_matmul(x: $T[M, N], w: $T[N, N]) -> $T[N, M] { return (x @ w).T }
op o_permute_of_matmul(x: $T[B, M, N], w: $T[N, N]) -> $T[M, B, N] { return permute(x @ w, [1, 0, 2]) }
""", [dict(M=1, N=1, B=1), dict(M=7, N=33, B=2), dict(M=33, N=7, B=1)]),
    Case("results_topk", """
op o_topk_values_only(x: $T[M, N]) -> $T[M, 2] {
    v, i = topk(exp(x), k=2)
    return v * 2
}
op o_topk_indices_only(x: $T[M, N]) -> i32[M, 3] {
    v, i = topk(x, k=3)
    return i
}
""", [dict(M=1, N=3), dict(M=7, N=33)], prepare=ties("x")),
    # ---- matmul ----
    Case("matmul", """
op mm_2d(a: $T[M, K], b: $T[K, N]) -> $T[M, N] { return a @ b }
op mm_wT(a: $T[M, K], w: $T[N, K]) -> $T[M, N] { return a @ w.T }
op mm_batched(a: $T[B, M, K], b: $T[B, K, N]) -> $T[B, M, N] { return a @ b }
op mm_bcast(a: $T[B, 1, M, K], b: $T[H, K, N]) -> $T[B, H, M, N] { return a @ b }
op mm_bcast_2d(a: $T[B, M, K], w: $T[K, N]) -> $T[B, M, N] { return a @ w }
op mm_vec_right(a: $T[M, K], v: $T[K]) -> $T[M] { return a @ v }
op mm_vec_left(v: $T[K], b: $T[K, N]) -> $T[N] { return v @ b }
op mm_vec_vec(u: $T[K], v: $T[K]) -> $T[] { return u @ v }
op mm_vec_batched(v: $T[K], b: $T[B, K, N]) -> $T[B, N] { return v @ b }
op mm_epilogue(a: $T[M, K], w: $T[N, K], bias: $T[N]) -> $T[M, N] { return silu(a @ w.T + bias) }
op mm_prologue(a: $T[M, K], b: $T[K, N]) -> $T[M, N] { return exp(a * 0.5) @ b }
""", [dict(M=1, K=1, N=1, B=1, H=1), dict(M=7, K=33, N=5, B=2, H=3), dict(M=33, K=130, N=17, B=1, H=2)]),
    Case("matmul_int", """
op mmi(a: i32[M, K], b: i32[K, N]) -> i32[M, N] { return a @ b }
""", [dict(M=7, K=33, N=5), dict(M=17, K=16, N=16)], dtypes=("int",)),
]

CASE_BY_NAME = {c.name: c for c in CASES}

# -- known compiler bugs (reported with reproducers); strict, so a fix turns them into failures
# that ask for the marker to go --------------------------------------------------------------
KNOWN_BUGS: dict[str, str] = {}   # case name -> reason; empty: every case passes


def params():
    out = []
    for c in CASES:
        for dt in c.dtypes:
            for op in c.ops:
                bug = KNOWN_BUGS.get(f"{op}@{dt}", KNOWN_BUGS.get(op))
                marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
                out.append(pytest.param(c.name, dt, op, id=f"{c.name}-{dt}-{op}", marks=marks))
    return out


@pytest.mark.parametrize("case_name, dtype, op_name", params())
def test_builtin(case_name, dtype, op_name):
    case = CASE_BY_NAME[case_name]
    src = case.template if dtype == "int" else typed(case.template, dtype)
    op = getattr(compiled(src, case_name, ops=[op_name]), op_name)
    for sizes in case.sizes:
        b = {s: v for s, v in sizes.items() if s in op.graph.symbols}
        for seed in case.seeds:
            run_case(op, b, seed=seed, prepare=case.prepare, what=f" [{dtype}]")


# -- long rows: the looped reduction and scan kernels (inner extent > 16384) --------------------
LONG = """
op l_softmax(x: f32[M, N]) -> f32[M, N] { return softmax(x, axis=-1) }
op l_sum(x: f32[M, N]) -> f32[M] { return sum(x * 2, axis=-1) }
op l_cumsum(x: f32[M, N]) -> f32[M, N] { return cumsum(x, axis=-1) }
op l_norm(x: f16[M, N], w: f16[N]) -> (f16[M, N], f32[M, 1]) {
    xf = cast(x, f32)
    ms = mean(xf * xf, axis=-1, keepdim=true)
    return cast(xf * rsqrt(ms + 1e-5), f16) * w, ms
}
op l_log_softmax_f16(x: f16[M, N]) -> f16[M, N] { return log_softmax(x, axis=-1) }
op l_softmax_first(x: f32[N, M]) -> f32[N, M] { return softmax(x, axis=0) }
op l_max_min(x: f32[M, N]) -> f32[M, 1] { return max(x, axis=-1, keepdim=true) - min(x, axis=-1, keepdim=true) }
op l_cumsum_int(a: i32[M, N]) -> i32[M, N] { return cumsum(a, axis=1) }
"""
LONG_OPS = re.findall(r"^op (\w+)", LONG, re.MULTILINE)


@pytest.mark.parametrize("op_name", LONG_OPS)
def test_long_rows_take_the_looped_kernels(op_name):
    from opforge.runtime.executor import choose
    op = getattr(compiled(LONG, "long", ops=[op_name]), op_name)
    b = {"M": 2, "N": 16500}
    chosen = [choose(step, b).kernel.name for step in op.plan.steps]
    assert any(n.endswith("_looped") for n in chosen), chosen
    assert not any(n.endswith("_looped") for n in (choose(step, {"M": 2, "N": 16384}).kernel.name
                                                   for step in op.plan.steps))
    run_case(op, b, seed=1)


def test_outputs_are_poisoned_before_launch():
    """The premise of every test here: an output element no kernel writes is NaN (or a
    sentinel), never a stale or zero value that could match the reference."""
    import os

    from opforge.runtime.executor import allocate
    assert os.environ.get("OPFORGE_POISON") == "1"
    assert torch.isnan(allocate([3, 5], torch.float16, "cpu")).all()
    assert (allocate([4], torch.int32, "cpu") == -1234567).all()
    assert allocate([4], torch.bool, "cpu").all()
