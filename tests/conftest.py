"""Shared test setup. OPFORGE_CHECKS=1 makes the IR verifier run after every pass in tests."""
from __future__ import annotations

import os

os.environ.setdefault("OPFORGE_CHECKS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import opforge  # noqa: E402

PACKAGE = Path(opforge.__file__).resolve().parent
EXAMPLES = PACKAGE / "examples"
GOLDEN = Path(__file__).resolve().parent / "golden"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.opf"))


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    return EXAMPLES


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN


@pytest.fixture
def compile_op():
    """Source text -> the canonical (inlined, canonicalised, verified) graph of one op
    (the last op of the text unless named)."""
    from opforge.frontend import load_program
    from opforge.passes.pipeline import canonical_graph

    def build(src: str, name: str | None = None):
        program = load_program(src)
        return canonical_graph(program, name or list(program.graphs)[-1])

    return build


# ---- kernel tests (issue 3) -------------------------------------------------------------------
# Before anything compiles: OPFORGE_POISON=1 (outputs start as NaN/sentinels, so an element no
# kernel writes fails) and OPFORGE_CACHE_DIR = a fresh per-session directory, shared with the
# xdist workers and removed at exit. See tests/kernel_helpers.py.
from .kernel_helpers import setup_test_environment  # noqa: E402

setup_test_environment()
# ---- end of kernel tests block ------------------------------------------------------------------
