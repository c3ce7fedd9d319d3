"""The front end: spec text -> AST with spans -> checked level-1 graphs (one per op)."""
from __future__ import annotations

import re
from pathlib import Path

from ..ir.graph import Program, Source, Span
from .diagnostics import SpecError

__all__ = ["load_program", "load_source", "get_op", "SpecError"]


def load_source(path_or_source: str | Path) -> tuple[Source, str]:
    """(Source, default namespace). A string with a newline or a '{' is spec text; anything
    else is a path, whose stem is the namespace."""
    if isinstance(path_or_source, Path) or ("\n" not in path_or_source and "{" not in path_or_source):
        path = Path(path_or_source)
        try:
            is_file = path.is_file()
        except (OSError, ValueError):  # a name too long for the file system, a NUL byte...
            is_file = False
        if not is_file:
            raise SpecError(f"no such spec file: {_shorten(str(path))}", None,
                            "pass a path to a .opf file, or the spec text itself")
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise SpecError(f"cannot read {path}: {e.strerror or e}", None) from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _not_utf8(str(path_or_source), raw, e) from None
        return Source(str(path_or_source), text), _identifier(path.stem)
    return Source("<string>", path_or_source), "opforge_spec"


def _not_utf8(name: str, raw: bytes, e: UnicodeDecodeError) -> SpecError:
    """FILE:LINE:COL of the first byte that is not UTF-8, with the line shown (each bad byte as
    U+FFFD) and a caret under it."""
    line = raw.count(b"\n", 0, e.start) + 1
    start = raw.rfind(b"\n", 0, e.start) + 1
    col = len(raw[start:e.start].decode("utf-8")) + 1      # the bytes before it are valid
    source = Source(name, raw.decode("utf-8", errors="replace"))
    bad = raw[e.start:e.end]
    return SpecError(f"the file is not UTF-8 text: byte{'s' * (len(bad) > 1)} {bad.hex(' ')} cannot be decoded",
                     Span(source, line, col, line, col + 1), "save the spec as UTF-8")


def _shorten(text: str, n: int = 200) -> str:
    return text if len(text) <= n else text[:n] + "..."


def _identifier(stem: str) -> str:
    name = re.sub(r"\W", "_", stem)
    return name if name and not name[0].isdigit() else f"ns_{name}"


def load_program(path_or_source: str | Path, namespace: str | None = None) -> Program:
    """Parse and check a spec; every mistake is a SpecError pointing at the text."""
    from .build import build_program      # here: the parser (lark) is loaded only to parse
    from .parser import parse
    source, default_ns = load_source(path_or_source)
    module = parse(source)
    return build_program(module, source, namespace or default_ns)


def get_op(program: Program, name: str):
    """The op's graph (of a dtype-generic op, its first binding's); an unknown name is a
    SpecError naming the closest op."""
    return program.graphs[graph_name(program, name)]


def graph_name(program: Program, name: str, dtype=None) -> str:
    """The graph the tools (``opforge show``, ``run``) take for an op: its own, or for a
    dtype-generic op the binding of ``dtype`` (every variable bound to it), or without
    ``dtype`` its first binding; a ``dtype`` it has no binding of is a SpecError naming the
    admitted dtypes (never another binding in its place). An unknown name is a SpecError
    naming the closest op."""
    from .diagnostics import did_you_mean
    info = program.generics.get(name)
    if info is not None:
        if dtype is None:
            return program.graph_of(name)
        chosen = program.binding(name, dtype)
        if chosen is None:
            raise SpecError(f"{name} is dtype-generic and has no binding with every variable {dtype}", None,
                            f"it admits {info.admitted()}: pass one of those with --dtype")
        return chosen
    if name not in program.graphs:
        ops = program.op_names
        raise SpecError(f"{program.source.name} has no op '{name}'", None,
                        did_you_mean(name, ops) or f"its ops are {', '.join(ops)}")
    return name
