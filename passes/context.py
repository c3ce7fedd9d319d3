"""Options that travel through the pass pipeline (never globals)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..ir.graph import Program


def checks_enabled() -> bool:
    return os.environ.get("OPFORGE_CHECKS", "0") not in ("", "0")


@dataclass(frozen=True)
class PassContext:
    program: Program | None = None          # for inlining calls of other ops of the file
    verify: bool = field(default_factory=checks_enabled)   # run the verifier after every pass
    fuse_contractions: bool = True          # matmul prologues, epilogues and shared-A matmuls
    max_group_nodes: int = 64               # bounds a kernel's size (compile time)
    # the cost model's budgets (passes/cost.py): full tiles a kernel keeps in registers at once
    # (distinct tensors it loads at the tile's size plus accumulators), and the shared memory
    # of a GEMM's operand tiles at its smallest preset (64 x 32 tiles of 2 bytes, 3 stages)
    max_live_tiles: int = 24
    max_shared_bytes: int = 160 * 1024
    # results passes may reuse for every graph compiled with this context (inline.py keeps the
    # templates of inlined callees here); not an option, so not compared or hashed
    memo: dict = field(default_factory=dict, compare=False, repr=False)
