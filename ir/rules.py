"""Shared pieces of the shape and dtype rules: NumPy broadcasting over symbolic sizes, the
scalar-adoption dtype rule of DSL.md, and axis normalisation.

Hints may name operands as ``{0}``, ``{1}``...; the front end fills them with the operands'
source text, so a hint reads ``cast(b, f16)`` with the user's own expression.
"""
from __future__ import annotations

from typing import Sequence

from .dims import Dim, format_shape
from .registry import RuleError
from .types import DType, ScalarType, TensorType, Type


def broadcast_shapes(shapes: Sequence[tuple[Dim, ...]], who: Sequence[int] | None = None) -> tuple[Dim, ...]:
    """NumPy broadcasting. Two different symbols never broadcast: sizes bound independently
    are different sizes as far as a spec can know."""
    rank = max((len(s) for s in shapes), default=0)
    out: list[Dim] = []
    for i in range(rank):
        d: Dim = 1
        owner = None
        for j, s in enumerate(shapes):
            k = i - (rank - len(s))
            if k < 0:
                continue
            e = s[k]
            if e == 1:
                continue
            if d == 1:
                d, owner = e, j
            elif e != d:
                a, b = (who[owner], who[j]) if who else (owner, j)
                raise RuleError(
                    f"shapes {format_shape(shapes[owner])} and {format_shape(s)} do not broadcast: "
                    f"{d} against {e} in axis {i - rank}",
                    hint=_bcast_hint(d, e), arg=b)
        out.append(d)
    return tuple(out)


def _bcast_hint(a: Dim, b: Dim) -> str:
    if isinstance(a, int) and isinstance(b, int):
        return "sizes must be equal or 1"
    return (f"{a} and {b} are sized independently (symbols bind separately at call time); "
            f"use one symbol for both if they must be equal")


def result_dtype(types: Sequence[Type], op: str) -> DType:
    """The dtype of an elementwise operation: tensors must agree; scalars adopt the tensors'
    dtype (a float scalar cannot adopt an integer dtype); scalars alone promote among themselves."""
    tensors = [(i, t) for i, t in enumerate(types) if isinstance(t, TensorType)]
    if tensors:
        i0, t0 = tensors[0]
        for i, t in tensors[1:]:
            if t.dtype != t0.dtype:
                raise RuleError(
                    f"operands of '{op}' have different dtypes {t0.dtype} and {t.dtype}",
                    hint=f"make them equal with a cast, e.g. cast({{{i}}}, {t0.dtype})", arg=i)
        for i, t in enumerate(types):
            if isinstance(t, ScalarType) and not _adopts(t.dtype, t0.dtype):
                raise RuleError(
                    f"a {t.dtype} scalar cannot adopt the tensor dtype {t0.dtype} in '{op}'",
                    hint=f"cast the tensor, e.g. cast({{{i0}}}, {t.dtype})", arg=i)
        return t0.dtype
    return promote_scalars([t.dtype for t in types])


def _adopts(scalar: DType, tensor: DType) -> bool:
    if scalar == tensor:
        return True
    if tensor.is_float:
        return not scalar.is_bool
    if tensor.is_int:
        return scalar.is_int
    return scalar.is_bool


def promote_scalars(dtypes: Sequence[DType]) -> DType:
    floats = [d for d in dtypes if d.is_float]
    if floats:
        return max(floats, key=lambda d: d.bits)
    ints = [d for d in dtypes if d.is_int]
    if ints:
        return max(ints, key=lambda d: d.bits)
    return DType.bool


def elementwise(types: Sequence[Type], op: str) -> tuple[DType, tuple[Dim, ...] | None]:
    """(dtype, shape) of an elementwise op; shape None means the result is a scalar."""
    dtype = result_dtype(types, op)
    tensor_idx = [i for i, t in enumerate(types) if isinstance(t, TensorType)]
    if not tensor_idx:
        return dtype, None
    shape = broadcast_shapes([types[i].shape for i in tensor_idx], who=tensor_idx)
    return dtype, shape


def make_type(dtype: DType, shape: tuple[Dim, ...] | None) -> Type:
    return ScalarType(dtype) if shape is None else TensorType(dtype, shape)


def need_tensor(t: Type, op: str, arg: int = 0) -> TensorType:
    if not isinstance(t, TensorType):
        raise RuleError(f"'{op}' needs a tensor, got the scalar {t}", arg=arg)
    return t


def need_float(t: Type, op: str, arg: int = 0) -> None:
    if not t.dtype.is_float:
        raise RuleError(f"'{op}' needs a floating-point operand, got {t}",
                        hint=f"cast it first: {op}(cast({{{arg}}}, f32))", arg=arg)


def need_numeric(t: Type, op: str, arg: int = 0) -> None:
    if t.dtype.is_bool:
        raise RuleError(f"'{op}' needs a numeric operand, got {t}",
                        hint=f"cast it first: cast({{{arg}}}, f32)", arg=arg)


def norm_axis(axis: int, rank: int, op: str, attr: str = "axis") -> int:
    if not -rank <= axis < rank:
        raise RuleError(f"axis {axis} is out of range for a tensor of rank {rank} in '{op}'",
                        hint=f"axes run from {-rank} to {rank - 1}" if rank else "a rank-0 tensor has no axes",
                        arg=attr)
    return axis % rank


def norm_axes(axis, rank: int, op: str, attr: str = "axis") -> tuple[int, ...]:
    if axis is None:
        return tuple(range(rank))
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    out = tuple(sorted(norm_axis(a, rank, op, attr) for a in axes))
    if len(set(out)) != len(out):
        raise RuleError(f"axis {tuple(axes)} names an axis twice in '{op}'", arg=attr)
    return out
