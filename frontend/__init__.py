"""The front end: spec text -> AST with spans -> checked level-1 graphs (one per op)."""
from __future__ import annotations

import re
from pathlib import Path

from ..ir.graph import Program, Source
from .build import build_program
from .diagnostics import SpecError
from .parser import parse

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
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise SpecError(f"{path} is not UTF-8 text (byte {e.start})", None) from None
        except OSError as e:
            raise SpecError(f"cannot read {path}: {e.strerror or e}", None) from None
        return Source(str(path_or_source), text), _identifier(path.stem)
    return Source("<string>", path_or_source), "opforge_spec"


def _shorten(text: str, n: int = 200) -> str:
    return text if len(text) <= n else text[:n] + "..."


def _identifier(stem: str) -> str:
    name = re.sub(r"\W", "_", stem)
    return name if name and not name[0].isdigit() else f"ns_{name}"


def load_program(path_or_source: str | Path, namespace: str | None = None) -> Program:
    """Parse and check a spec; every mistake is a SpecError pointing at the text."""
    source, default_ns = load_source(path_or_source)
    module = parse(source)
    return build_program(module, source, namespace or default_ns)


def get_op(program: Program, name: str):
    """The op's graph; an unknown name is a SpecError naming the closest op."""
    from .diagnostics import did_you_mean
    if name not in program.graphs:
        raise SpecError(f"{program.source.name} has no op '{name}'", None,
                        did_you_mean(name, program.graphs) or f"its ops are {', '.join(program.graphs)}")
    return program.graphs[name]
