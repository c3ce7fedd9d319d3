"""The GPUs that kernels are compiled for without one (runtime/native.py), by name.

One row per target: Triton's compute capability (sm_90 compiles as sm_90a, with wgmma and
TMA), the most shared memory one block may use (the opt-in maximum of the product named) and
the tensor-core instructions its dot kernels should use at prefill shapes. Adding a GPU
(sm_100) is one row; its SASS kinds are then read from its cubins like the others'.
"""
from __future__ import annotations

from dataclasses import dataclass

from .binding import CallError


@dataclass(frozen=True)
class Target:
    name: str
    capability: int                # Triton's GPUTarget arch: 80, 89, 90, 100
    shared_memory: int             # bytes per block, opt-in maximum
    product: str                   # the GPU the limits are taken from
    dot_kinds: tuple[str, ...]     # SASS tensor-core opcodes a 16-bit dot should compile to
    registers_per_thread: int = 255

    @property
    def has_fp8(self) -> bool:
        """Triton's float8e4nv exists from sm_89 on (older GPUs decode e4m3 with integers)."""
        return self.capability >= 89


TARGETS = {
    "sm_80": Target("sm_80", 80, 163 * 1024, "A100", ("HMMA",)),
    "sm_89": Target("sm_89", 89, 99 * 1024, "L4 / RTX 4090", ("HMMA",)),
    "sm_90a": Target("sm_90a", 90, 227 * 1024, "H100", ("HGMMA",)),
}
ALIASES = {"sm_90": "sm_90a", "h100": "sm_90a", "a100": "sm_80", "l4": "sm_89"}


def target(name: str) -> Target:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in TARGETS:
        raise CallError(f"unknown target '{name}'; the targets are {', '.join(TARGETS)}")
    return TARGETS[key]


def device_target() -> Target:
    """The target of the GPU this process runs on (its row of TARGETS, or one made from its
    compute capability and shared memory)."""
    import torch
    major, minor = torch.cuda.get_device_capability()
    cap = 10 * major + minor
    for t in TARGETS.values():
        if t.capability == cap:
            return t
    p = torch.cuda.get_device_properties(0)
    smem = int(getattr(p, "shared_memory_per_block_optin", 0) or 48 * 1024)
    return Target(f"sm_{cap}", cap, smem, torch.cuda.get_device_name(), ())
