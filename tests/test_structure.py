"""The package's structure (issue 13, item 10), checked from the import statements of the source
(every import, at module level or inside a function): the passes never import the front end
(SpecError and its positions live in ir/diagnostics.py); the primitive tables share helpers, never
reach into another table's private names; the cost model and the partition sit on either side of
one line (passes/groups.py holds the group records both read, passes/cost.py imports nothing of
passes/fusion.py); frontend/build.py stays one concern (statements and the op), its expressions,
calls and scans in files of their own."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imports(path: Path) -> list[tuple[str, tuple[str, ...]]]:
    """(module as written, names imported) of every import in ``path``; relative modules resolved
    to package paths (``..frontend.x`` from passes/ -> ``frontend.x``)."""
    package = path.parent.relative_to(ROOT).parts
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else ()
            module = ".".join(base + tuple((node.module or "").split("."))).strip(".")
            out.append((module, tuple(a.name for a in node.names)))
        elif isinstance(node, ast.Import):
            out += [(a.name, ()) for a in node.names]
    return out


@pytest.mark.parametrize("path", sorted((ROOT / "passes").glob("*.py")), ids=lambda p: p.name)
def test_the_passes_do_not_import_the_front_end(path):
    bad = [m for m, _ in imports(path) if m == "frontend" or m.startswith("frontend.")]
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", sorted((ROOT / "ir").glob("prims_*.py")), ids=lambda p: p.name)
def test_primitive_tables_share_no_private_helpers(path):
    bad = [(m, n) for m, names in imports(path) if m.startswith("ir.prims") for n in names if n.startswith("_")]
    assert not bad, f"{path.name} imports private names {bad}"


def test_the_cost_model_does_not_import_the_partition():
    assert not [m for m, _ in imports(ROOT / "passes" / "cost.py") if m == "passes.fusion"]
    assert not [m for m, _ in imports(ROOT / "passes" / "groups.py") if m in ("passes.fusion", "passes.cost")]
    # the partition asks the cost model (one direction)
    assert ("passes.cost", ("join_saves_bytes", "resources")) in imports(ROOT / "passes" / "fusion.py")


def test_the_front_end_builder_is_split_by_concern():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "frontend").glob("build*.py")}
    assert {"build.py", "build_calls.py", "build_scan.py"} <= set(sizes), sizes
    assert max(sizes.values()) < 700, sizes
