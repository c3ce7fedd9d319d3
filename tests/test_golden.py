"""Golden files: the printed canonical graph of every example op, and the front end's graph of
llama_block before inlining (with its ``call`` nodes).

Regenerate with ``OPFORGE_UPDATE_GOLDEN=1 pytest tests/test_golden.py``, then read the diff:
a golden file is a claim about the compiler's output, not a snapshot to bless blindly.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest

from opforge.frontend import load_program
from opforge.ir.printer import print_graph
from opforge.passes.pipeline import canonical_graph

from .conftest import EXAMPLE_FILES, GOLDEN

UPDATE = os.environ.get("OPFORGE_UPDATE_GOLDEN", "0") not in ("", "0")


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / f"{name}.txt"
    text = text.rstrip("\n") + "\n"
    if UPDATE:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        return
    assert path.exists(), f"no golden file {path}; create it with OPFORGE_UPDATE_GOLDEN=1"
    want = path.read_text()
    if want != text:
        diff = "".join(difflib.unified_diff(want.splitlines(True), text.splitlines(True),
                                            f"golden/{path.name}", "printed"))
        pytest.fail(f"{name} differs from its golden file (OPFORGE_UPDATE_GOLDEN=1 regenerates):\n{diff}")


def example_ops():
    return [pytest.param(f, op, id=f"{f.stem}__{op}") for f in EXAMPLE_FILES for op in load_program(f).graphs]


@pytest.mark.parametrize("path,op", example_ops())
def test_canonical_graph_golden(path: Path, op: str):
    program = load_program(path)
    text = print_graph(canonical_graph(program, op))
    # Printing is deterministic: a second build of the same file prints the same text.
    assert print_graph(canonical_graph(load_program(path), op)) == text
    assert "call(" not in text, "inlining left a call node"
    check_golden(f"{path.stem}__{op}", text)


def test_frontend_graph_of_llama_block_golden():
    path = next(f for f in EXAMPLE_FILES if f.stem == "llama")
    text = print_graph(load_program(path).graphs["llama_block"])
    # rms_norm is dtype-generic: the call is of its f16 binding
    for callee in ("rms_norm__f16", "split_heads", "rotary", "attention", "swiglu_mlp"):
        assert f'callee="{callee}"' in text
    check_golden("llama__llama_block__frontend", text)


def test_no_stale_golden_files():
    expected = {f"{f.stem}__{op}.txt" for f in EXAMPLE_FILES for op in load_program(f).graphs}
    expected.add("llama__llama_block__frontend.txt")
    expected.add("resources_sm90a.txt")       # tests/test_native_sweep.py's golden resources
    expected.add("native_known_problems.txt")  # and its known problems
    present = {p.name for p in GOLDEN.glob("*.txt")}
    if UPDATE:
        for name in present - expected:
            (GOLDEN / name).unlink()
        present &= expected
    assert present == expected, f"missing: {sorted(expected - present)}, stale: {sorted(present - expected)}"
