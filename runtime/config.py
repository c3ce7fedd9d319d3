"""Choosing a launch configuration (block sizes, warps, stages) for a kernel at given sizes.

On the interpreter every free tunable takes its ``cpu`` value (it cannot time anything); a
tunable that covers an extent takes that extent's next power of two. On a GPU, without
autotuning (OPFORGE_AUTOTUNE=0) or before it has run, a heuristic picks per tunable name;
runtime/autotune.py times the space and persists the winner.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir.dims import evaluate
from ..ir.tile import TileKernel, Tunable


@dataclass(frozen=True)
class Config:
    values: tuple[tuple[str, int], ...]
    num_warps: int = 4
    num_stages: int = 1

    def as_dict(self) -> dict[str, int]:
        return dict(self.values)

    def __str__(self) -> str:
        vals = ", ".join(f"{k}={v}" for k, v in self.values)
        return f"{vals}, num_warps={self.num_warps}, num_stages={self.num_stages}"


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def covered(t: Tunable, bindings) -> int:
    if t.rule is not None:
        from ..ir.tile import TUNABLE_RULES
        name, *dims = t.rule
        return TUNABLE_RULES[name](*(evaluate(d, bindings) for d in dims))
    n = evaluate(t.covers, bindings)
    return max(t.lo, min(t.hi, next_pow2(n)))


def is_fixed(t: Tunable) -> bool:
    return t.covers is not None or t.rule is not None


def interpreter_config(k: TileKernel, bindings) -> Config:
    vals = []
    for t in k.tunables:
        vals.append((t.name, covered(t, bindings) if is_fixed(t) else t.cpu))
    return Config(tuple(vals), 4, 1)


HEURISTIC = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}


def heuristic_config(k: TileKernel, bindings) -> Config:
    """A reasonable first choice without timing: big enough tiles to use the tensor cores and
    keep memory-bound row kernels to about 4K-16K elements per program."""
    vals = {}
    for t in k.tunables:
        if is_fixed(t):
            vals[t.name] = covered(t, bindings)
    for t in k.tunables:
        if t.name in vals:
            continue
        want = HEURISTIC.get(t.name, t.candidates[len(t.candidates) // 2])
        if t.name == "BLOCK_M" and "BLOCK_N" in vals:
            want = max(1, 4096 // vals["BLOCK_N"])
        vals[t.name] = min(t.candidates, key=lambda c: abs(c - want))
    elems = 1
    for name in ("BLOCK_M", "BLOCK_N"):
        elems *= vals.get(name, 1)
    if any(t.name == "BLOCK_K" for t in k.tunables):
        warps, stages = (8 if elems >= 128 * 128 else 4), max(k.stages)
    else:
        warps = 8 if elems >= 8192 else 4 if elems >= 1024 else 2
        warps = min(k.warps, key=lambda w: abs(w - warps))
        stages = k.stages[0]
    return Config(tuple(vals.items()), warps, stages)
