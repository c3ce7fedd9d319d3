"""float8 e4m3 at tile level: decoding bit patterns, encoding values, and the operands of an
fp8 dot, for the layouts that store e4m3 (``@quant(fp8)``, ``@quant(fp8, act=fp8)``).

e4m3 ("fn": no infinities) has a sign, 4 exponent bits (bias 7) and 3 mantissa bits; its
largest value is 448, its smallest normal 2^-6, and below that the step is 2^-9. Packed e4m3
travels as u8 bit patterns, so buffers never need a float8 torch dtype.

Triton's e4m3 type (``tl.float8e4nv``) exists on NVIDIA GPUs of sm_89 (Ada) and newer, and in
Triton's interpreter; older GPUs (A100, sm_80) reject it when compiling. So the lowering asks
:func:`native` once: where the type exists, conversions are the hardware's and the dot takes
e4m3 operands (the fp8 tensor cores); elsewhere e4m3 is decoded and encoded with integer bit
arithmetic and the dot takes f16 operands, which hold every e4m3 value exactly (the products,
and so the results, are the same up to the order of the f32 sums).

Encoding never trusts a conversion to round: the value is first rounded to e4m3 in f32
arithmetic (ties to even, saturating at 448), then converted exactly. Triton's interpreter
drops the carry when rounding moves a value up to the next power of two (1.94 -> 1.0).
"""
from __future__ import annotations

import contextlib
import functools
import os

from .types import DType

MAX = 448.0
MIN_NORMAL = 2.0 ** -6
SUBNORMAL_STEP = 2.0 ** -9
# x + C - C rounds x to a multiple of 2^-9 in f32 (ties to even): C = 1.5 * 2^14
SUBNORMAL_ROUNDER = 24576.0
F32_BIAS_DIFF = 127 - 7


_target_native: list = []     # set while lowering for a named GPU (runtime/sweep.py)


def native() -> bool:
    """Whether generated kernels may use tl.float8e4nv. While lowering for a named target
    (``for_target``), that target's answer; else ``OPFORGE_FP8=native|emulate``; else: on a CUDA
    GPU of compute capability 8.9 or newer, or with no GPU (the interpreter runs the kernels)."""
    return _target_native[-1] if _target_native else _detected()


@contextlib.contextmanager
def for_target(has_fp8: bool):
    """Lower as for a GPU that has (sm_89+) or lacks (sm_80) the fp8 type, whatever this
    machine is: the native check compiles the kernels that GPU would get."""
    _target_native.append(has_fp8)
    try:
        yield
    finally:
        _target_native.pop()


@functools.lru_cache(maxsize=1)
def _detected() -> bool:
    forced = os.environ.get("OPFORGE_FP8", "")
    if forced in ("native", "emulate"):
        return forced == "native"
    import torch
    if os.environ.get("OPFORGE_INTERPRET", "") not in ("", "0") or not torch.cuda.is_available():
        return True
    return torch.cuda.get_device_capability() >= (8, 9)


native.cache_clear = _detected.cache_clear     # tests switch OPFORGE_FP8 and clear the detection


class FP8Unsupported(ValueError):
    """An f8e4m3 tensor value in a kernel where Triton has no e4m3 type (GPUs older than sm_89,
    or OPFORGE_FP8=emulate)."""


def require_native(what: str) -> None:
    if not native():
        raise FP8Unsupported(
            f"{what} needs Triton's float8 e4m3 type, which this target lacks (GPUs before sm_89, "
            f"or OPFORGE_FP8=emulate); on such GPUs e4m3 is available as a weight layout, "
            f"@quant(fp8), which decodes it with integer arithmetic")


def decode(b, bits):
    """f32 values of u8 e4m3 bit patterns (the pattern 0x7f / 0xff, e4m3's NaN, which packing
    never writes, reads as NaN natively and as 480 emulated)."""
    if native():
        return b.cast(b.bitcast(bits, DType.f8e4m3), DType.f32)
    v = b.let(b.cast(bits, DType.i32), "e4m3")
    exp = b.let(b.bitand(b.shr(v, 3), 15), "e4m3_exp")
    mant = b.let(b.bitand(v, 7), "e4m3_mant")
    normal = b.bitcast(b.bitor(b.shl(b.add(exp, F32_BIAS_DIFF), 23), b.shl(mant, 20)), DType.f32)
    subnormal = b.mul(b.cast(mant, DType.f32), SUBNORMAL_STEP)
    mag = b.let(b.where(b.binop("eq", exp, 0), subnormal, normal), "e4m3_abs")
    return b.where(b.binop("ne", b.bitand(v, 128), 0), b.unary("neg", mag), mag)


def round_to_e4m3(b, x):
    """x (f32) rounded to the nearest e4m3 value, ties to even, saturating at +-448; the result
    is an f32 that e4m3 holds exactly. Normal range: the f32 bits rounded to 3 mantissa bits
    (a carry moves into the exponent, as it should); below 2^-6, to a multiple of 2^-9."""
    x = b.let(b.minimum(b.maximum(b.widen(x), -MAX), MAX), "sat")
    bits = b.let(b.bitcast(x, DType.i32), "sat_bits")
    lsb = b.bitand(b.shr(bits, 20), 1)
    normal = b.bitcast(b.bitand(b.add(b.add(bits, 0x7FFFF), lsb), -(1 << 20)), DType.f32)
    small = b.sub(b.add(x, SUBNORMAL_ROUNDER), SUBNORMAL_ROUNDER)
    return b.let(b.where(b.binop("lt", b.unary("abs", x), MIN_NORMAL), small, normal), "e4m3_value")


def encode(b, x):
    """u8 e4m3 bit patterns of f32 values (rounded as :func:`round_to_e4m3`). Emulated, a
    negative value that rounds to zero (and -0.0) encodes as +0 (0x00, where torch writes 0x80):
    the same number in any product."""
    y = round_to_e4m3(b, x)
    if native():
        return b.bitcast(b.convert(y, DType.f8e4m3), DType.u8)
    bits = b.let(b.bitcast(y, DType.i32), "e4m3_value_bits")
    mag = b.let(b.bitand(bits, 0x7FFFFFFF), "e4m3_value_abs")
    f32_exp = b.let(b.shr(mag, 23), "f32_exp")
    normal = b.bitor(b.shl(b.sub(f32_exp, F32_BIAS_DIFF), 3), b.bitand(b.shr(mag, 20), 7))
    subnormal = b.cast(b.mul(b.unary("abs", y), 1.0 / SUBNORMAL_STEP), DType.i32)   # exact: 0..8
    code = b.where(b.binop("ge", f32_exp, F32_BIAS_DIFF + 1), normal, subnormal)
    sign = b.bitand(b.shr(bits, 24), 128)        # bit 31 -> bit 7 (the shift is arithmetic; masked)
    return b.cast(b.bitor(code, sign), DType.u8)


def dot_operand(b, bits):
    """A tile of u8 e4m3 patterns as an operand of tl.dot: e4m3 itself natively (the fp8
    tensor-core dot), else f16 (exact)."""
    if native():
        return b.bitcast(bits, DType.f8e4m3)
    return b.cast(decode(b, bits), DType.f16)
