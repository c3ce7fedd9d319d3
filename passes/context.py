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
    max_group_nodes: int = 64               # bounds a kernel's size (registers, compile time)
