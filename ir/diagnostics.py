"""Spec errors, reported as DSL.md's Errors section says:

    FILE:LINE:COL: error: MESSAGE
    <the source line>
    <spaces>^~~~
    hint: ...
"""
from __future__ import annotations

import difflib
import re
from typing import Iterable

from .graph import Source, Span

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u2028\u2029]")


def source_line(source: Source, n: int) -> str:
    """Line ``n`` (1-based) as the lexer counts lines: only '\\n' ends a line (a '\\r' before it
    is dropped). Source.line() uses str.splitlines(), which also splits at form feeds, lone
    carriage returns and Unicode separators and would show the wrong line."""
    lines = source.text.split("\n")
    if not 0 < n <= len(lines):
        return ""
    line = lines[n - 1]
    return line[:-1] if line.endswith("\r") else line


def display_line(text: str) -> str:
    """The line as printed above the caret: one character per column (a tab is one space,
    control characters are spaces), so the caret lines up with the column lark counts."""
    return _CONTROL.sub(" ", text.replace("\t", " "))


class SpecError(ValueError):
    """A mistake in a spec. ``str(e)`` is the full report; the parts stay as attributes."""

    def __init__(self, message: str, span: Span | None = None, hint: str | None = None):
        self.message = message
        self.span = span
        self.hint = hint
        super().__init__(self.format())

    @property
    def file(self) -> str | None:
        return self.span.source.name if self.span else None

    @property
    def line(self) -> int | None:
        return self.span.line if self.span else None

    @property
    def col(self) -> int | None:
        return self.span.col if self.span else None

    def format(self) -> str:
        if self.span is None:
            out = f"error: {self.message}"
        else:
            s = self.span
            text = display_line(source_line(s.source, s.line))
            width = (s.end_col - s.col) if s.end_line == s.line else len(text) - s.col + 1
            width = max(1, min(width, len(text) - s.col + 1))
            caret = " " * (s.col - 1) + "^" + "~" * (width - 1)
            out = f"{s.source.name}:{s.line}:{s.col}: error: {self.message}\n{text}\n{caret}"
        if self.hint:
            out += f"\nhint: {self.hint}"
        return out


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The closest known name, for 'did you mean' hints."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    if not matches:
        lowered = {c.lower(): c for c in candidates}
        if name.lower() in lowered:
            return lowered[name.lower()]
    return matches[0] if matches else None


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    c = closest(name, candidates)
    return f"did you mean '{c}'?" if c else None
