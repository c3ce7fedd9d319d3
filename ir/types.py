"""Data types and value types of level 1.

A :class:`TensorType` is a dtype and a shape of sizes (ints and symbols, see dims.py). A scalar
(a literal, a scalar parameter, a symbolic size used as a value, or an expression of those only)
is a :class:`ScalarType`: it has a dtype and adopts the dtype of a tensor it meets, as 0-d values
do in PyTorch.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from .dims import Dim, format_shape


class DType(enum.Enum):
    f32 = ("f32", "float", 32)
    f16 = ("f16", "float", 16)
    bf16 = ("bf16", "float", 16)
    f8e4m3 = ("f8e4m3", "float", 8)
    f64 = ("f64", "float", 64)  # the reference executor's checking precision; not in the language
    i64 = ("i64", "int", 64)
    i32 = ("i32", "int", 32)
    i8 = ("i8", "int", 8)
    u8 = ("u8", "int", 8)
    bool = ("bool", "bool", 8)

    def __init__(self, text: str, category: str, bits: int):
        self.text = text
        self.category = category
        self.bits = bits

    @property
    def is_float(self) -> bool:
        return self.category == "float"

    @property
    def is_int(self) -> bool:
        return self.category == "int"

    @property
    def is_bool(self) -> bool:
        return self.category == "bool"

    @property
    def itemsize(self) -> int:
        return max(1, self.bits // 8)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"DType.{self.name}"


# The names a spec may write (f64 is internal).
SPEC_DTYPES = {d.text: d for d in DType if d is not DType.f64}


def dtype_from_name(name: str) -> DType | None:
    return SPEC_DTYPES.get(name)


def accumulator(dtype: DType) -> DType:
    """Matmuls and reductions accumulate in f32 (i32 for integers), as PyTorch does on GPUs."""
    if dtype is DType.f64:
        return DType.f64
    if dtype.is_float:
        return DType.f32
    if dtype is DType.i64:
        return DType.i64
    return DType.i32


@dataclass(frozen=True)
class TensorType:
    dtype: DType
    shape: tuple[Dim, ...]

    @property
    def rank(self) -> int:
        return len(self.shape)

    def with_dtype(self, dtype: DType) -> "TensorType":
        return TensorType(dtype, self.shape)

    def with_shape(self, shape) -> "TensorType":
        return TensorType(self.dtype, tuple(shape))

    def __str__(self) -> str:
        return f"{self.dtype}{format_shape(self.shape)}"


@dataclass(frozen=True)
class ScalarType:
    dtype: DType

    rank = 0
    shape: tuple = ()

    def with_dtype(self, dtype: DType) -> "ScalarType":
        return ScalarType(dtype)

    def __str__(self) -> str:
        return str(self.dtype)


Type = TensorType | ScalarType


def is_scalar(t: Type) -> bool:
    return isinstance(t, ScalarType)


# the values each integer dtype holds (scalar arguments are checked against them)
INT_RANGES = {DType.i64: (-2 ** 63, 2 ** 63 - 1), DType.i32: (-2 ** 31, 2 ** 31 - 1),
              DType.i8: (-128, 127), DType.u8: (0, 255)}
