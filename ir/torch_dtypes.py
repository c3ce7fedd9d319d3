"""The one mapping between opforge dtypes and torch dtypes, and the reference executor's
context (which decides whether floats run in the spec's dtype or in float64 for checking)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .types import DType

TORCH_DTYPES: dict[DType, torch.dtype] = {
    DType.f32: torch.float32,
    DType.f16: torch.float16,
    DType.bf16: torch.bfloat16,
    DType.f8e4m3: torch.float8_e4m3fn,
    DType.f64: torch.float64,
    DType.i64: torch.int64,
    DType.i32: torch.int32,
    DType.i8: torch.int8,
    DType.u8: torch.uint8,
    DType.bool: torch.bool,
}
FROM_TORCH: dict[torch.dtype, DType] = {v: k for k, v in TORCH_DTYPES.items()}


def to_torch(d: DType) -> torch.dtype:
    return TORCH_DTYPES[d]


def from_torch(d: torch.dtype) -> DType | None:
    return FROM_TORCH.get(d)


@dataclass(frozen=True)
class RefCtx:
    """``check=True`` runs every floating-point value in float64 (the oracle for tests);
    otherwise values keep the spec's dtypes and arithmetic happens in f32 before rounding,
    as GPU kernels (and PyTorch's own GPU kernels) do."""
    check: bool = False
    device: str | torch.device = "cpu"
    bindings: dict = field(default_factory=dict)  # size symbol -> int, for `dim` values

    def dt(self, d: DType) -> torch.dtype:
        if self.check and d.is_float:
            return torch.float64
        return TORCH_DTYPES[d]

    def compute_dt(self, d: DType) -> torch.dtype:
        """Where arithmetic in dtype ``d`` happens: f32 for 16- and 8-bit floats."""
        if self.check and d.is_float:
            return torch.float64
        if d in (DType.f16, DType.bf16, DType.f8e4m3):
            return torch.float32
        return TORCH_DTYPES[d]

    def tensor(self, x, d: DType) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return x.to(self.dt(d))
        return torch.tensor(x, dtype=self.dt(d), device=self.device)
