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


def resolve_shapes(graph, path, given: str | None) -> dict[str, int]:
    sizes = {**file_shapes(path), **parse_shapes(given)}
    missing = [s for s in graph.symbols if s not in sizes]
    if missing:
        raise CallError(f"{graph.name}: give the sizes {', '.join(missing)} with --shape "
                        f"{','.join(f'{s}=...' for s in graph.symbols)}")
    return {s: sizes[s] for s in graph.symbols}
