"""The spec's abstract syntax: frozen dataclasses, each with the source span it came from."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..ir.graph import Span


@dataclass(frozen=True)
class Ident:
    """A name as written, with its span (op names, parameter names, keywords, targets)."""
    text: str
    span: Span


# -- expressions --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Expr:
    span: Span


@dataclass(frozen=True)
class Name(Expr):
    id: str


@dataclass(frozen=True)
class Num(Expr):
    value: int | float


@dataclass(frozen=True)
class Bool(Expr):
    value: bool


@dataclass(frozen=True)
class Str(Expr):
    value: str


@dataclass(frozen=True)
class TupleLit(Expr):
    items: tuple[Expr, ...]


@dataclass(frozen=True)
class ListLit(Expr):
    items: tuple[Expr, ...]


@dataclass(frozen=True)
class BinOp(Expr):
    op: str           # add sub mul div floordiv matmul pow, a comparison lt le gt ge eq ne, and or
    lhs: Expr
    rhs: Expr


@dataclass(frozen=True)
class Neg(Expr):
    operand: Expr


@dataclass(frozen=True)
class Not(Expr):
    operand: Expr


@dataclass(frozen=True)
class Keyword:
    name: Ident
    value: Expr
    span: Span


@dataclass(frozen=True)
class Call(Expr):
    func: Ident
    args: tuple[Expr, ...]
    kwargs: tuple[Keyword, ...]


@dataclass(frozen=True)
class Attribute(Expr):
    value: Expr
    attr: Ident


@dataclass(frozen=True)
class SliceItem(Expr):
    start: Optional[Expr]
    stop: Optional[Expr]
    step: Optional[Expr]


@dataclass(frozen=True)
class EllipsisItem(Expr):
    pass


@dataclass(frozen=True)
class Index(Expr):
    value: Expr
    items: tuple[Expr, ...]


# -- statements and declarations ----------------------------------------------------------------
@dataclass(frozen=True)
class Carry:
    """``h: f32[H, E] = 0.0`` in a scan's ``with``: the name, its type (optional), the first value."""
    name: Ident
    dtype: Optional[Ident]
    dims: Optional[tuple]        # DimDecl per axis, or None (a scalar type or no type)
    init: Expr
    span: Span


@dataclass(frozen=True)
class Scan(Expr):
    """``scan t in S [reverse] with CARRY, ... { BODY }`` (the right side of an assignment)."""
    index: Ident
    length: Expr
    reverse: Optional[Ident]     # the word after the length: must be 'reverse'
    carries: tuple
    body: tuple                  # statements
    body_span: Span


@dataclass(frozen=True)
class Assign:
    targets: tuple[Ident, ...]
    value: Expr
    span: Span


@dataclass(frozen=True)
class Return:
    values: tuple[Expr, ...]
    span: Span


@dataclass(frozen=True)
class DimDecl:
    value: Any          # a size symbol (str), an integer, or size arithmetic (an Expr)
    span: Span


@dataclass(frozen=True)
class LayoutArg:
    name: Optional[Ident]
    value: Any           # str (a name), int, float, or (n, m) for a ratio such as 2:4
    span: Span


@dataclass(frozen=True)
class LayoutDecl:
    kind: Ident
    args: tuple[LayoutArg, ...]
    span: Span


@dataclass(frozen=True)
class TypeDecl:
    dtype: Ident
    dims: Optional[tuple[Any, ...]]   # None: a scalar; DimDecl for parameters, Expr for results
    span: Span


@dataclass(frozen=True)
class ParamDecl:
    name: Ident
    type: TypeDecl
    layout: Optional[LayoutDecl]
    default: Optional[Expr]
    span: Span


@dataclass(frozen=True)
class TypeParam:
    """A dtype variable of an op: ``T: f16 | bf16`` (``dtypes`` None: every float dtype)."""
    name: Ident
    dtypes: Optional[tuple[Ident, ...]]
    span: Span


@dataclass(frozen=True)
class OpDecl:
    name: Ident
    params: tuple[ParamDecl, ...]
    results: tuple[TypeDecl, ...]
    tuple_result: bool
    body: tuple[Assign | Return, ...]
    span: Span
    body_span: Span
    calls: tuple[Ident, ...] = ()     # the function of every call in the body, innermost first
    type_params: tuple[TypeParam, ...] = ()


@dataclass(frozen=True)
class ModuleDecl:
    ops: tuple[OpDecl, ...]
