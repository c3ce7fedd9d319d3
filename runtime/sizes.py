"""Sizes given on the command line (``--shape M=128,D=256``) or in a spec file's
``# shapes: M=64, D=256`` line, which gives default sizes for ``opforge run`` and the demo."""
from __future__ import annotations

import re
from pathlib import Path

from .binding import CallError

SHAPES_DIRECTIVE = re.compile(r"^\s*#\s*shapes:\s*(.+)$", re.MULTILINE)


def parse_shapes(text: str | None) -> dict[str, int]:
    """'M=128,D=256' (commas or spaces) -> {'M': 128, 'D': 256}."""
    out: dict[str, int] = {}
    if not text:
        return out
    for part in re.split(r"[,\s]+", text.strip()):
        if not part:
            continue
        m = re.fullmatch(r"([A-Za-z_]\w*)=(\d+)", part)
        if not m:
            raise CallError(f"--shape: '{part}' is not NAME=INTEGER (for example M=128,D=256)")
        out[m.group(1)] = int(m.group(2))
    return out


def file_shapes(path) -> dict[str, int]:
    p = Path(path)
    out: dict[str, int] = {}
    if p.is_file():
        for m in SHAPES_DIRECTIVE.finditer(p.read_text()):
            out.update(parse_shapes(m.group(1)))
    return out


def file_directive(path, name: str) -> dict[str, int]:
    """The sizes of a ``# NAME: M=1, K=4096`` line (``# decode:``, ``# prefill:``), or {}."""
    p = Path(path)
    out: dict[str, int] = {}
    if p.is_file():
        for m in re.finditer(rf"^\s*#\s*{re.escape(name)}:\s*(.+)$", p.read_text(), re.MULTILINE):
            out.update(parse_shapes(m.group(1)))
    return out


def resolve_shapes(graph, path, given: str | None, op: str | None = None) -> dict[str, int]:
    """The op's sizes: --shape over the file's ``# shapes:`` line. A --shape symbol the op does
    not have is an error naming the closest one (the file's line may hold other ops' sizes).
    ``op``: the name the user gave (a dtype-generic op's, not its binding graph's)."""
    op = op or graph.name
    explicit = parse_shapes(given)
    # integer parameters used as sizes count as sizes: --shape heads=8 (else their default)
    defaults = {p.name: p.default for p in graph.params if p.name in graph.size_params and p.has_default}
    names = list(graph.symbols) + [n for n in graph.size_params if n not in graph.symbols]
    unknown = [s for s in explicit if s not in names]
    if unknown:
        from ..frontend.diagnostics import closest
        have = ", ".join(names) or "none"
        s = unknown[0]
        near = closest(s, names) or _nearest(s, names)
        hint = f"; did you mean '{near}'?" if near else ""
        raise CallError(f"{op}: --shape {s}={explicit[s]}: the op has no size '{s}'{hint} "
                        f"(its sizes: {have})")
    sizes = {**defaults, **file_shapes(path), **explicit}
    missing = [s for s in names if s not in sizes]
    if missing:
        raise CallError(f"{op}: give the sizes {', '.join(missing)} with --shape "
                        f"{','.join(f'{s}=...' for s in names)}")
    return {s: sizes[s] for s in names}


def _nearest(name: str, candidates) -> str | None:
    """The candidate with the fewest edits from ``name`` (ties: the first), for names too short
    for difflib's cutoff (Q against B, S, D)."""
    def edits(a: str, b: str) -> int:
        row = list(range(len(b) + 1))
        for i, ca in enumerate(a, 1):
            prev, row[0] = row[0], i
            for j, cb in enumerate(b, 1):
                prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca.lower() != cb.lower()))
        return row[-1]
    cands = list(candidates)
    return min(cands, key=lambda c: edits(name, c)) if cands else None


def size_bindings(graph, sizes: dict) -> dict[str, int]:
    """The bindings of a call at ``sizes``: every size symbol, and every integer parameter used
    as a size (``heads``: from ``sizes`` if given, else its default)."""
    out = {s: sizes[s] for s in graph.symbols}
    for p in graph.params:
        if p.name in graph.size_params and p.name not in out:
            if p.name in sizes:
                out[p.name] = sizes[p.name]
            elif p.has_default:
                out[p.name] = p.default
    return out
