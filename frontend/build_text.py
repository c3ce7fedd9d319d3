"""The source text a diagnostic quotes (snippets, cast hints), and the checks of names and
dtypes the builder and the generic ops share."""
from __future__ import annotations

import re

from ..ir.graph import Span
from ..ir.types import INT_RANGES, SPEC_DTYPES, DType
from . import ast as A
from .diagnostics import SpecError, did_you_mean, source_line


DTYPE_ALIASES = {"float32": "f32", "float": "f32", "float16": "f16", "half": "f16", "bfloat16": "bf16",
                 "float64": "f32", "double": "f32", "int32": "i32", "int64": "i64", "int": "i64",
                 "int8": "i8", "uint8": "u8", "fp8": "f8e4m3", "float8": "f8e4m3", "f64": "f32"}


def int_range_text(dtype: DType) -> str:
    lo, hi = INT_RANGES[dtype]
    show = {-2 ** 63: "-2**63", 2 ** 63 - 1: "2**63 - 1", -2 ** 31: "-2**31", 2 ** 31 - 1: "2**31 - 1"}
    return f"{dtype} holds {show.get(lo, lo)} to {show.get(hi, hi)}"


def fits(value, dtype: DType) -> bool:
    """Whether an integer value is representable in an integer dtype (other dtypes: True)."""
    if dtype not in INT_RANGES or isinstance(value, bool) or not isinstance(value, int):
        return True
    lo, hi = INT_RANGES[dtype]
    return lo <= value <= hi


def snippet(span: Span) -> str:
    """The source text of a span; a span over several lines is joined into one line."""
    lines = span.source.text.split("\n")
    first = source_line(span.source, span.line)
    if span.end_line == span.line:
        return first[span.col - 1:span.end_col - 1]
    parts = [first[span.col - 1:]] + lines[span.line:span.end_line - 1] + \
        [source_line(span.source, span.end_line)[:span.end_col - 1]]
    parts = [re.sub(r"#[^\"]*$", "", p).strip() for p in parts]
    text = " ".join(p for p in parts if p)
    return re.sub(r"([(\[]) | ([)\]])", r"\1\2", text)


def cast_text(e: A.Expr, dtype) -> str:
    """``cast(E, dtype)`` for an expression; when E is itself a cast, change its dtype instead of
    wrapping it (the hint for cast(b, f32) meeting f16 is cast(b, f16), not cast(cast(b, f32), f16))."""
    return f"cast({cast_operand(e)}, {dtype})"


def cast_operand(e: A.Expr) -> str:
    if isinstance(e, A.Call) and e.func.text == "cast" and e.args:
        return snippet(e.args[0].span)
    return snippet(e.span)


_PLACEHOLDER = re.compile(r"(cast\()?\{(\d+)\}")


def fill_hint(hint: str | None, operand_exprs: list) -> str | None:
    """Fill a rule's hint placeholders ({0}, {1}...) with the operands' source text. Only the
    placeholders are replaced (str.format would trip on any other brace)."""
    if not hint:
        return hint

    def sub(m):
        i = int(m.group(2))
        if i >= len(operand_exprs):
            return m.group(0)
        e = operand_exprs[i]
        return ("cast(" + cast_operand(e)) if m.group(1) else snippet(e.span)

    return _PLACEHOLDER.sub(sub, hint)


KEYWORDS = ("op", "return", "true", "false", "inf", "scan", "in", "with")


def check_not_keyword(ident: A.Ident, what: str) -> None:
    """Keywords are reserved (DSL.md); the contextual lexer reads one as a name where no keyword
    can stand (``true = x``), which would make the name unusable later (``return true``)."""
    if ident.text in KEYWORDS:
        raise SpecError(f"'{ident.text}' is a keyword and cannot name {what}", ident.span,
                        "choose another name")


def parse_dtype(ident: A.Ident) -> DType:
    d = SPEC_DTYPES.get(ident.text)
    if d is None:
        alias = DTYPE_ALIASES.get(ident.text)
        hint = f"did you mean '{alias}'?" if alias else did_you_mean(ident.text, SPEC_DTYPES) or \
            f"dtypes are {' '.join(SPEC_DTYPES)}"
        raise SpecError(f"unknown dtype '{ident.text}'", ident.span, hint)
    return d
