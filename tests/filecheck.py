"""A tiny FileCheck (after LLVM's) for golden-free tests of generated text.

``filecheck(text, checks)`` runs the directives of ``checks`` (one per line, blank lines and
lines starting with ``//`` ignored) against ``text`` from the top:

- ``CHECK: pat``       the next match of pat at or after the current position;
- ``CHECK-NEXT: pat``  a match of pat on the line right after the previous match's line;
- ``CHECK-NOT: pat``   pat must not occur between the previous match and the next positive
                       match (or the end of the text, if no positive directive follows);
- ``CHECK-COUNT-n: pat`` pat occurs *exactly* n times in the rest of the text (from the current
                       position); the position moves past the n-th. (LLVM's CHECK-COUNT-n asks
                       for at least n in a row; here "exactly" is what the tests want to say.)

A pattern is literal text, with ``{{regex}}`` for regular expressions (Python syntax, compiled
with re.MULTILINE so ``^`` and ``$`` anchor at lines); it is stripped of surrounding
whitespace and never matches across a newline. A failure raises FileCheckError (an
AssertionError) naming the directive, its line in ``checks``, and where the search began.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

DIRECTIVE = re.compile(r"^\s*CHECK(?:-(NEXT|NOT|COUNT-(\d+)))?:(.*)$")


class FileCheckError(AssertionError):
    pass


@dataclass(frozen=True)
class Directive:
    kind: str          # CHECK | NEXT | NOT | COUNT
    pattern: str
    regex: re.Pattern
    count: int
    line: int          # in the checks text, 1-based

    def __str__(self) -> str:
        kind = {"CHECK": "CHECK", "NEXT": "CHECK-NEXT", "NOT": "CHECK-NOT",
                "COUNT": f"CHECK-COUNT-{self.count}"}[self.kind]
        return f"{kind}: {self.pattern} (check line {self.line})"


def compile_pattern(pattern: str) -> re.Pattern:
    parts = []
    pos = 0
    for m in re.finditer(r"\{\{(.*?)\}\}", pattern):
        parts.append(re.escape(pattern[pos:m.start()]))
        parts.append(f"(?:{m.group(1)})")
        pos = m.end()
    parts.append(re.escape(pattern[pos:]))
    return re.compile("".join(parts), re.MULTILINE)


def parse(checks: str) -> list[Directive]:
    out = []
    for i, raw in enumerate(checks.splitlines(), 1):
        if not raw.strip() or raw.strip().startswith("//"):
            continue
        m = DIRECTIVE.match(raw)
        if not m:
            raise ValueError(f"check line {i} is not a directive: {raw!r}")
        kind, count, pattern = m.group(1), m.group(2), m.group(3).strip()
        if not pattern:
            raise ValueError(f"check line {i} has an empty pattern")
        k = "CHECK" if kind is None else "COUNT" if count else kind
        out.append(Directive(k, pattern, compile_pattern(pattern), int(count or 0), i))
    if not out:
        raise ValueError("no CHECK directives")
    return out


def _search_line_bound(d: Directive, text: str, start: int, end: int | None = None):
    """The first match of d in text[start:end] that does not cross a newline."""
    end = len(text) if end is None else end
    for m in d.regex.finditer(text, start, end):
        if "\n" not in m.group(0):
            return m
    return None


def _context(text: str, pos: int) -> str:
    line_no = text.count("\n", 0, pos) + 1
    line_start = text.rfind("\n", 0, pos) + 1
    line_end = text.find("\n", pos)
    line = text[line_start: line_end if line_end != -1 else len(text)]
    return f"line {line_no} of the input: {line!r}"


def filecheck(text: str, checks: str) -> None:
    pos = 0
    prev_end: int | None = None   # end of the previous positive match (for CHECK-NEXT)
    nots: list[Directive] = []

    def check_nots(upto: int) -> None:
        for d in nots:
            m = _search_line_bound(d, text, pos, upto)
            if m is not None:
                raise FileCheckError(f"{d}: found at {_context(text, m.start())}")
        nots.clear()

    for d in parse(checks):
        if d.kind == "NOT":
            nots.append(d)
            continue
        if d.kind == "COUNT":
            matches = []
            for m in d.regex.finditer(text, pos):
                if "\n" not in m.group(0):
                    matches.append(m)
            if len(matches) != d.count:
                where = "; ".join(_context(text, m.start()) for m in matches[:6])
                raise FileCheckError(f"{d}: {len(matches)} match(es) after {_context(text, pos)}"
                                     + (f": {where}" if where else ""))
            m = matches[-1] if matches else None
            first = matches[0].start() if matches else pos
            check_nots(first)
            if m is not None:
                pos = prev_end = m.end()
            continue
        if d.kind == "NEXT":
            if prev_end is None:
                raise FileCheckError(f"{d}: CHECK-NEXT needs a previous match")
            nl = text.find("\n", prev_end)
            if nl == -1:
                raise FileCheckError(f"{d}: the previous match is on the last line")
            line_end = text.find("\n", nl + 1)
            line_end = len(text) if line_end == -1 else line_end
            m = _search_line_bound(d, text, nl + 1, line_end)
            if m is None:
                raise FileCheckError(f"{d}: not on the next line, {_context(text, nl + 1)}")
        else:
            m = _search_line_bound(d, text, pos)
            if m is None:
                raise FileCheckError(f"{d}: no match after {_context(text, pos)}")
        check_nots(m.start())
        pos = prev_end = m.end()
    check_nots(len(text))


def split_kernels(source: str) -> dict[str, str]:
    """Generated Triton module text -> {kernel name: its text from @triton.jit to the next}."""
    out: dict[str, str] = {}
    chunks = re.split(r"(?m)^(?=@triton\.jit\s*$)", source)
    for chunk in chunks:
        m = re.search(r"(?m)^def (\w+)\(", chunk)
        if chunk.startswith("@triton.jit") and m:
            out[m.group(1)] = chunk
    return out
