"""Parsing: spec text -> AST with spans (frontend/ast.py), syntax errors -> SpecError.

The grammar is LALR(1). The AST is built while lark parses, with no parse tree in between: each
grammar rule's reduction calls a method of :class:`ToAst` with the rule's children and their
extent, and the LALR loop is not recursive, so a deeply nested or very long expression (a chain
of thousands of '+') cannot overflow Python's stack. Spans follow lark's ``propagate_positions``
rule (a node spans its first to its last child, tokens such as '(' included; a parenthesised
expression keeps its own span, while the parentheses count for the node that contains it), but
are computed here, once per reduction: building lark's tree with positions and then transforming
it cost three times the parse itself. A post-lexer drops newlines inside parentheses and
brackets, so calls and shapes may span lines while statements end at a newline.
"""
from __future__ import annotations

import re
import threading
from pathlib import Path

from lark import Lark, Token
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from ..ir.graph import Source, Span, collector_paused
from . import ast as A
from .diagnostics import SpecError

GRAMMAR = Path(__file__).with_name("opf.lark")


class BracketNewlines:
    """Drop newline tokens between brackets (as Python does inside ( and [)."""
    always_accept = ("_NL",)
    OPEN = {"LPAR", "LSQB"}
    CLOSE = {"RPAR", "RSQB"}

    def process(self, stream):
        depth = 0
        for tok in stream:
            if tok.type in self.OPEN:
                depth += 1
            elif tok.type in self.CLOSE:
                depth = max(0, depth - 1)
            elif tok.type == "_NL" and depth:
                continue
            yield tok


COMPARE = {"<": "lt", "<=": "le", ">": "gt", ">=": "ge", "==": "eq", "!=": "ne"}


MAX_INT_DIGITS = 100   # far beyond any size or literal; int() of 4,300+ digits raises in Python


class ToAst:
    """Builds the AST, one method per grammar rule (or alias): ``method(ext, children)``, where
    ``children`` are the rule's kept children (placeholders None) and ``ext`` is the extent
    (line, column, end line, end column) of everything the rule matched. ``source`` is set for
    each parse (under the parser's lock)."""

    source: Source
    calls: list   # the functions called since the last op's definition (OpDecl.calls)

    def _span(self, ext) -> Span:
        return Span(self.source, *ext)

    def _tok(self, tok: Token) -> A.Ident:
        return A.Ident(str(tok), self._tok_span(tok))

    def _tok_span(self, tok: Token) -> Span:
        return Span(self.source, tok.line, tok.column, tok.end_line, tok.end_column)

    def _int(self, tok: Token) -> int:
        text = str(tok)
        if len(text) > MAX_INT_DIGITS:
            raise SpecError(f"the integer literal has {len(text)} digits", self._tok_span(tok),
                            f"integers in a spec have at most {MAX_INT_DIGITS} digits")
        return int(text)

    # -- declarations --------------------------------------------------------------------------
    def start(self, ext, children):
        return A.ModuleDecl(tuple(children))

    def op_def(self, ext, children):
        name, type_params, *rest = children
        *params, result, body = rest
        params = tuple(p for p in params if p is not None)
        results, is_tuple = result
        stmts, body_span = body
        calls, self.calls = tuple(self.calls), []
        return A.OpDecl(self._tok(name), params, results, is_tuple, stmts, self._span(ext), body_span, calls,
                        tuple(type_params or ()))

    def type_params(self, ext, children):
        return [c for c in children if c is not None]

    def type_param(self, ext, children):
        name, *dtypes = children
        dtypes = [d for d in dtypes if d is not None]
        return A.TypeParam(self._tok(name), tuple(self._tok(d) for d in dtypes) if dtypes else None, self._span(ext))

    def param(self, ext, children):
        name, dtype, shape, layout, default = children
        type_span = Span(self.source, dtype.line, dtype.column,
                         *(shape[1] if shape else (dtype.end_line, dtype.end_column)))
        ty = A.TypeDecl(self._tok(dtype), shape[0] if shape else None, type_span)
        return A.ParamDecl(self._tok(name), ty, layout, default, self._span(ext))

    def shape(self, ext, children):
        return tuple(c for c in children if c is not None), (ext[2], ext[3])

    def dim(self, ext, children):
        (x,) = children
        if isinstance(x, A.Name):
            return A.DimDecl(x.id, self._span(ext))
        if isinstance(x, A.Num) and isinstance(x.value, int):
            return A.DimDecl(x.value, self._span(ext))
        if isinstance(x, A.Neg) and isinstance(x.operand, A.Num) and isinstance(x.operand.value, int):
            return A.DimDecl(-x.operand.value, self._span(ext))
        return A.DimDecl(x, self._span(ext))      # size arithmetic, checked by the builder

    def layout(self, ext, children):
        kind, *args = children
        return A.LayoutDecl(self._tok(kind), tuple(a for a in args if a is not None), self._span(ext))

    def layout_arg(self, ext, children):
        name, value = children
        return A.LayoutArg(self._tok(name) if name is not None else None, value, self._span(ext))

    def lname(self, ext, children):
        return str(children[0])

    def lint(self, ext, children):
        return self._int(children[0])

    def lfloat(self, ext, children):
        return float(children[0])

    def lratio(self, ext, children):
        return (self._int(children[0]), self._int(children[1]))

    def result(self, ext, children):
        return (children[0],), False

    def tuple_result(self, ext, children):
        return tuple(c for c in children if c is not None), True

    def result_type(self, ext, children):
        dtype, shape = children
        return A.TypeDecl(self._tok(dtype), shape, self._span(ext))

    def result_shape(self, ext, children):
        return tuple(c for c in children if c is not None)

    def body(self, ext, children):
        span = Span(self.source, ext[2], ext[3] - 1, ext[2], ext[3])
        return tuple(c for c in children if c is not None), span

    def assign(self, ext, children):
        *targets, value = children
        return A.Assign(tuple(self._tok(t) for t in targets), value, self._span(ext))

    def scan_expr(self, ext, children):
        index, length, rev, *rest = children
        *carries, body = rest
        stmts, body_span = body
        return A.Scan(self._span(ext), self._tok(index), length, self._tok(rev) if rev is not None else None,
                      tuple(carries), stmts, body_span)

    def carry(self, ext, children):
        name, dtype, shape, init = children
        return A.Carry(self._tok(name), self._tok(dtype) if dtype is not None else None,
                       shape[0] if shape else None, init, self._span(ext))

    def return_stmt(self, ext, children):
        return A.Return(tuple(children), self._span(ext))

    # -- expressions ---------------------------------------------------------------------------
    def _bin(op):
        def f(self, ext, children):
            return A.BinOp(self._span(ext), op, children[0], children[1])
        return f

    add, sub, mul, div = _bin("add"), _bin("sub"), _bin("mul"), _bin("div")
    floordiv, matmul, pow = _bin("floordiv"), _bin("matmul"), _bin("pow")
    and_, or_ = _bin("and"), _bin("or")

    def compare(self, ext, children):
        lhs, op, rhs = children
        return A.BinOp(self._span(ext), COMPARE[str(op)], lhs, rhs)

    def neg(self, ext, children):
        return A.Neg(self._span(ext), children[0])

    def not_(self, ext, children):
        return A.Not(self._span(ext), children[0])

    def call(self, ext, children):
        name, *args = children
        pos = tuple(a for a in args if a is not None and not isinstance(a, A.Keyword))
        kws = tuple(a for a in args if isinstance(a, A.Keyword))
        func = self._tok(name)
        self.calls.append(func)
        return A.Call(self._span(ext), func, pos, kws)

    def kwarg(self, ext, children):
        name, value = children
        return A.Keyword(self._tok(name), value, self._span(ext))

    def attribute(self, ext, children):
        value, name = children
        return A.Attribute(self._span(ext), value, self._tok(name))

    def index(self, ext, children):
        value, *items = children
        return A.Index(self._span(ext), value, tuple(items))

    def slice(self, ext, children):
        start, stop, step = (children + [None, None, None])[:3]
        return A.SliceItem(self._span(ext), start, stop, step)

    def ellipsis(self, ext, children):
        return A.EllipsisItem(self._span(ext))

    def name(self, ext, children):
        return A.Name(self._span(ext), str(children[0]))

    def int_lit(self, ext, children):
        return A.Num(self._span(ext), self._int(children[0]))

    def float_lit(self, ext, children):
        return A.Num(self._span(ext), float(children[0]))

    def str_lit(self, ext, children):
        return A.Str(self._span(ext), str(children[0])[1:-1])

    def true_lit(self, ext, children):
        return A.Bool(self._span(ext), True)

    def false_lit(self, ext, children):
        return A.Bool(self._span(ext), False)

    def inf_lit(self, ext, children):
        return A.Num(self._span(ext), float("inf"))

    def tuple_lit(self, ext, children):
        return A.TupleLit(self._span(ext), tuple(c for c in children if c is not None))

    def list_lit(self, ext, children):
        return A.ListLit(self._span(ext), tuple(c for c in children if c is not None))


_lock = threading.Lock()
_parser: Lark | None = None
_builder = ToAst()


class _Splice(list):
    """The children of an inlined rule (``_sep``, lark's helper rules for ``*``), spliced into
    the rule that uses it."""


def _extent(children):
    """(line, column, end line, end column) from the first to the last child with a position;
    None for a rule that matched nothing. Children are tokens or (value, extent) pairs."""
    first = last = None
    for c in children:
        if type(c) is tuple:
            if c[1] is not None:
                first = c[1]
                break
        else:
            first = c
            break
    if first is None:
        return None
    for c in reversed(children):
        if type(c) is tuple:
            if c[1] is not None:
                last = c[1]
                break
        else:
            last = c
            break
    start = (first.line, first.column) if type(first) is not tuple else first[:2]
    end = (last.end_line, last.end_column) if type(last) is not tuple else last[2:]
    return start + end


def _kept(rule) -> tuple[list, int]:
    """Which children of a reduction the rule keeps, as lark's child filter decides:
    [(index, splice, placeholders before)], placeholders after (maybe_placeholders: an
    optional part that did not match gives None)."""
    empty = rule.options.empty_indices
    if empty:
        bits = "".join(str(int(b)) for b in empty)
        nones = [len(ones) for ones in bits.split("0")]
    else:
        nones = [0] * (len(rule.expansion) + 1)
    keep, pending = [], 0
    for i, sym in enumerate(rule.expansion):
        pending += nones[i]
        if rule.options.keep_all_tokens or not (sym.is_term and sym.filter_out):
            keep.append((i, not sym.is_term and sym.name.startswith("_"), pending))
            pending = 0
    return keep, pending + nones[len(rule.expansion)]


def _callback(rule, method, inline: bool):
    """The function lark's LALR loop calls at a reduction of ``rule``: it takes the children
    from the value stack (tokens and (value, extent) pairs) and returns a pair."""
    keep, trailing = _kept(rule)
    expand1 = rule.options.expand1 and not rule.alias
    if expand1 and len(rule.expansion) == 1 and keep == [(0, False, 0)] and not trailing:
        return lambda children: children[0]     # a precedence level passing its one operand on

    def callback(children):
        ext = _extent(children)
        kept = []
        for i, splice, nones in keep:
            if nones:
                kept += [None] * nones
            c = children[i]
            if splice:
                if kept:
                    kept += c[0]
                else:      # a left-recursive list (statements, ops): extend it, do not copy it
                    kept = c[0]
            else:
                kept.append(c[0] if type(c) is tuple else c)
        if trailing:
            kept += [None] * trailing
        if expand1 and len(kept) == 1:
            # lark's ?rule: the one child stands for the rule; a token stays a token, a value
            # keeps its own span and takes this rule's extent for the node that contains it
            x = kept[0]
            return x if isinstance(x, Token) else (x, ext)
        if inline:
            return (kept if type(kept) is _Splice else _Splice(kept)), ext
        if method is None:
            raise AssertionError(f"parser.py: no ToAst method for the grammar rule {rule}")
        return method(ext, kept), ext

    return callback


def _get_parser() -> Lark:
    global _parser
    if _parser is None:
        parser = Lark(GRAMMAR.read_text(), parser="lalr", lexer="contextual", postlex=BracketNewlines(),
                      propagate_positions=False, maybe_placeholders=True, cache=True)
        callbacks = {}
        for rule in parser.rules:
            name = rule.alias or rule.options.template_source or rule.origin.name
            method = getattr(_builder, name, None)
            inline = name.startswith("_")
            if method is None and not inline and not (rule.options.expand1 and not rule.alias):
                raise AssertionError(f"parser.py: no ToAst method for the grammar rule {name}")
            callbacks[rule] = _callback(rule, method, inline)
        # lark's LALR loop reads its callbacks from this dict (the one built for its parse tree)
        parser._callbacks.clear()
        parser._callbacks.update(callbacks)
        _parser = parser
    return _parser


TOKEN_TEXT = {
    "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'", "LBRACE": "'{'", "RBRACE": "'}'",
    "COMMA": "','", "COLON": "':'", "SEMICOLON": "';'", "EQUAL": "'='", "MINUS": "'-'", "PLUS": "'+'",
    "STAR": "'*'", "SLASH": "'/'", "AT": "'@'", "DOT": "'.'", "NAME": "a name", "INT": "an integer",
    "FLOAT": "a number", "STRING": "a string", "_NL": "a newline", "__ANON_0": "'->'", "RETURN": "'return'",
    "OP": "'op'", "SCAN": "'scan'", "IN": "'in'", "WITH": "'with'", "COMPARE": "a comparison", "TRUE": "'true'", "FALSE": "'false'", "INF": "'inf'",
    "$END": "the end of the file", "__ANON_1": "'//'", "__ANON_2": "'**'", "__ANON_3": "'...'",
}


def _describe(tok_type: str, parser: Lark) -> str:
    if tok_type in TOKEN_TEXT and not tok_type.startswith("__ANON"):
        return TOKEN_TEXT[tok_type]
    try:
        term = parser.get_terminal(tok_type)
        pat = term.pattern
        if pat.type == "str":
            return f"'{pat.value}'"
    except (KeyError, AttributeError):
        pass
    return TOKEN_TEXT.get(tok_type, tok_type.lower())


OPERATORS = {"'*'", "'**'", "'+'", "'-'", "'/'", "'//'", "'@'", "'.'", "'['", "'('", "a comparison", "'&'", "'|'"}
EXPRESSION = {"a name", "an integer", "a number", "a string", "'true'", "'false'", "'inf'", "'('", "'['", "'-'"}
STATEMENT_END = {"a newline", "';'"}


def _expected(expected, parser: Lark, inside: str | None = None) -> str:
    """LALR lookahead sets are long; say them the way a person would. ``inside`` is the
    innermost open bracket at the error ('(', '[', '{' or None): LALR merges states, so its
    lookahead offers closers and separators that cannot occur there; they are left out."""
    names = {_describe(t, parser) for t in expected if t not in ("WS", "COMMENT")}
    if "a newline" in names and "';'" not in names:
        names.discard("a newline")  # the post-lexer accepts newlines everywhere; not a real option
    drop = {"(": {"']'", "'}'", "a newline", "';'"}, "[": {"')'", "'}'", "a newline", "';'"},
            "{": {"')'", "']'", "':'"}, None: {"')'", "']'", "':'", "'}'"}}[inside]
    if names - drop:
        names -= drop
    parts = []
    if len(names & OPERATORS) >= 4:
        names -= OPERATORS
        parts.append("an operator")
    if {"a name", "an integer", "a number"} <= names:
        names -= EXPRESSION
        parts.append("an expression")
    if STATEMENT_END <= names:
        names -= STATEMENT_END
        parts.append("the end of the statement")
    parts += sorted(names)
    if not parts:
        return "something else"
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


_BRACKETS = re.compile(r'#[^\n]*|"[^"\n]*"|[()\[\]{}]')
_CLOSER = {")": "(", "]": "[", "}": "{"}
_OPENER = {"(": ")", "[": "]", "{": "}"}


def _open_brackets(text: str, end: int) -> list[tuple[str, int]]:
    """The brackets open at offset ``end`` (innermost last), as (bracket, offset)."""
    stack: list[tuple[str, int]] = []
    for m in _BRACKETS.finditer(text, 0, end):
        c = m.group()
        if c in _OPENER:
            stack.append((c, m.start()))
        elif c in _CLOSER:
            if stack and stack[-1][0] == _CLOSER[c]:
                stack.pop()
    return stack


def _line_col(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _end_span(source: Source) -> Span:
    """Just after the last character that is not whitespace: where a missing '}' belongs."""
    text = source.text.rstrip()
    line, col = _line_col(text, len(text))
    return Span(source, line, col, line, col + 1)


def _show_char(ch: str) -> str:
    if ch == "\t":
        return "\\t"
    return ch if ch.isprintable() else f"U+{ord(ch):04X}"


_OP_LINE = re.compile(r"[ \t]*(op)[ \t]+[A-Za-z_][A-Za-z0-9_]*[ \t]*\(")
EXPRESSION_START = {"NAME", "INT", "FLOAT", "STRING", "TRUE", "FALSE", "INF", "RETURN"}


def _syntax_error(e: UnexpectedInput, source: Source, parser: Lark) -> SpecError:
    line, col = max(1, e.line), max(1, e.column)
    text = source.text
    if isinstance(e, UnexpectedCharacters):
        ch = text[e.pos_in_stream] if e.pos_in_stream < len(text) else "?"
        hint = None
        if ch == "!":
            hint = "'not' is written ~ (on bool values): ~(j > i)"
        elif ch in "%^":
            hint = "the language has no '%' or '^'; the logical operators are &, | and ~ on bools"
        elif ch == "'":
            hint = 'strings use double quotes: "tanh"'
        elif ch == '"':
            hint = 'a string ends on the line it starts: "tanh"'
        elif ch == "$" or ch == "?" or ch == "`":
            hint = "names are letters, digits and '_'"
        span = Span(source, line, col, line, col + 1)
        return SpecError(f"unexpected character '{_show_char(ch)}'", span, hint)
    if isinstance(e, UnexpectedToken):
        tok = e.token
        if tok.type == "$END":
            stack = _open_brackets(text, len(text))
            span = _end_span(source)
            if stack:
                b, at = stack[-1]
                l, c = _line_col(text, at)
                what = " of the op's body" if b == "{" else ""
                return SpecError(f"unexpected end of file: the '{b}'{what} at line {l}, column {c} is never closed",
                                 span, f"add '{_OPENER[b]}' to close it")
            return SpecError(f"unexpected end of file; expected {_expected(e.expected, parser)}", span)
        pos = tok.start_pos if tok.start_pos is not None else len(text)
        stack = _open_brackets(text, pos)
        inside = stack[-1][0] if stack else None
        shown = "end of line" if tok.type == "_NL" else f"'{tok}'"
        width = 1 if tok.type == "_NL" else max(1, len(str(tok)))
        span = Span(source, tok.line, tok.column, tok.line, tok.column + width)
        exp = _expected(e.expected, parser, inside)
        hint = None
        body = next((at for b, at in reversed(stack) if b == "{"), None)
        m = _OP_LINE.match(text, text.rfind("\n", 0, pos) + 1)
        if body is not None and m and m.end() > pos:
            # 'op' inside a body is an ordinary name to the lexer: the body before it is not closed
            l, c = _line_col(text, body)
            op_line, op_col = _line_col(text, m.start(1))
            return SpecError(f"'op' inside the body of an op: the '{{' at line {l}, column {c} is never closed",
                             Span(source, op_line, op_col, op_line, op_col + 2), "add '}' before this op")
        unclosed = [(b, at) for b, at in stack if b in "([" and _line_col(text, at)[0] < tok.line]
        if str(tok) == "=" and inside != "[":
            hint = "'=' assigns a name at the start of a statement; compare with '=='"
        elif str(tok) in ("&", "|") and text[max(tok.start_pos - 1, 0)] == str(tok):
            hint = f"the logical operators are single characters: a {tok} b (and ~a for not)"
        elif tok.type == "_NL" and "'{'" in exp:
            hint = "an op's body starts with '{' on the line of its result type"
        elif exp == "'op'":
            hint = "each definition starts with 'op': op NAME(x: f16[M]) -> f16[M] { ... }"
        elif "'->'" in exp:
            hint = "an op declares its result type: op NAME(...) -> f16[M, N] { ... }"
        elif unclosed:
            b, at = unclosed[-1]
            l, c = _line_col(text, at)
            hint = f"the '{b}' at line {l}, column {c} is not closed"
        elif tok.type in EXPRESSION_START and "the end of the statement" in exp:
            hint = "statements end at a newline or ';'"
        elif tok.type in EXPRESSION_START and inside in ("(", "[") and "','" in exp:
            hint = "is a ',' missing?"
        return SpecError(f"unexpected {shown}; expected {exp}", span, hint)
    if isinstance(e, UnexpectedEOF):
        return SpecError("unexpected end of file", _end_span(source))
    return SpecError(str(e), Span(source, line, col, line, col + 1))


def parse(source: Source) -> A.ModuleDecl:
    parser = _get_parser()
    with _lock, collector_paused():
        _builder.source = source
        _builder.calls = []
        try:
            result = parser.parse(source.text)
        except UnexpectedInput as e:
            raise _syntax_error(e, source, parser) from None
        return result[0] if type(result) is tuple else result
