"""Static arguments of built-ins, evaluated while building: numbers, integers, axes and sizes
(size arithmetic of the op's symbols); part of OpBuilder (frontend/build.py).
"""
from __future__ import annotations

from ..ir.dims import Dim, Sym, div
from ..ir.registry import Arg
from . import ast as A
from .diagnostics import SpecError, did_you_mean
from .build_text import snippet


class StaticMixin:
    def static(self, x: A.Expr, a: Arg, fname: str):
        kind = a.kind
        if kind == "int":
            return self.static_int(x, f"'{a.name}' of '{fname}'")
        if kind == "axes":
            if isinstance(x, A.Name) and x.id == "None" and a.default is None:
                return None                      # axis=None: every axis, as when it is left out
            if isinstance(x, (A.TupleLit, A.ListLit)):
                return tuple(self.static_int(i, f"'{a.name}' of '{fname}'") for i in x.items)
            return self.static_int(x, f"'{a.name}' of '{fname}'")
        if kind == "ints":
            if not isinstance(x, (A.TupleLit, A.ListLit)):
                raise SpecError(f"'{a.name}' of '{fname}' must be a list of integers", x.span,
                                "for example [0, 2, 1, 3]")
            return tuple(self.static_int(i, f"'{a.name}' of '{fname}'") for i in x.items)
        if kind == "bool":
            if not isinstance(x, A.Bool):
                raise SpecError(f"'{a.name}' of '{fname}' must be true or false", x.span)
            return x.value
        if kind == "float":
            return float(self.static_number(x))
        if kind == "str":
            if not isinstance(x, A.Str):
                raise SpecError(f"'{a.name}' of '{fname}' must be a string", x.span,
                                f'one of {", ".join(repr(c) for c in a.choices)}'.replace("'", '"'))
            if a.choices and x.value not in a.choices:
                raise SpecError(f'"{x.value}" is not a choice of \'{a.name}\' in \'{fname}\'', x.span,
                                "choose " + " or ".join(f'"{c}"' for c in a.choices))
            return x.value
        if kind == "dtype":
            if not isinstance(x, A.Name):
                raise SpecError(f"'{a.name}' of '{fname}' must be a dtype such as f32", x.span)
            return self.dtype(A.Ident(x.id, x.span))
        if kind == "dim":
            return self.static_dim(x)
        if kind == "dims":
            if not isinstance(x, (A.TupleLit, A.ListLit)):
                raise SpecError(f"'{a.name}' of '{fname}' must be a list of sizes", x.span,
                                "for example [M, H, -1]")
            dims = tuple(self.static_dim(i, allow_hole=True) for i in x.items)
            holes = [i for i, d in zip(x.items, dims) if isinstance(d, int) and d == -1]
            if len(holes) > 1:
                raise SpecError(f"'{fname}' may infer one size with -1, but {snippet(x.span)} has "
                                f"{len(holes)}", holes[1].span, "write every size but one")
            return dims
        raise AssertionError(kind)

    def static_number(self, x: A.Expr):
        if isinstance(x, A.Num):
            return x.value
        if isinstance(x, A.Bool):
            return x.value
        if isinstance(x, A.Neg):
            v = self.static_number(x.operand)
            if isinstance(v, bool):
                raise SpecError("cannot negate true or false", x.span)
            return -v
        raise SpecError("expected a number literal", x.span)

    def static_int(self, x: A.Expr, what: str) -> int:
        if isinstance(x, A.Num) and isinstance(x.value, int):
            return x.value
        if isinstance(x, A.Neg):
            return -self.static_int(x.operand, what)
        if isinstance(x, A.BinOp) and x.op in ("add", "sub", "mul", "floordiv"):
            a, b = self.static_int(x.lhs, what), self.static_int(x.rhs, what)
            if x.op == "floordiv" and b == 0:
                raise SpecError("division by zero", x.span)
            return {"add": a + b, "sub": a - b, "mul": a * b, "floordiv": a // b if b else 0}[x.op]
        raise SpecError(f"{what} must be an integer", x.span,
                        "axes and counts are written as literals, e.g. -1" if not isinstance(x, A.Num)
                        else None)

    def static_dim(self, x: A.Expr, allow_hole: bool = False) -> Dim:
        if isinstance(x, A.Num):
            if not isinstance(x.value, int):
                raise SpecError(f"a size must be an integer, got {x.value}", x.span)
            return x.value
        if isinstance(x, A.Name):
            if x.id in self.symbols:
                return Sym.of(x.id)
            scope = getattr(self, "scan_scope", None)
            if scope is not None and x.id == scope.index:
                raise SpecError(f"the step index '{x.id}' is a value, not a size", x.span,
                                f"it can index one position of an axis ({x.id} in x[{x.id}] or x[:, {x.id}]) or take part "
                                f"in arithmetic; slices, shapes and static arguments need sizes")
            hint = did_you_mean(x.id, self.symbols) or (
                f"sizes are the symbols of the parameters' shapes: {', '.join(self.symbols)}"
                if self.symbols else "no parameter has a symbolic size")
            what = "a value, not a size" if x.id in self.env else "not a size of this op"
            raise SpecError(f"'{x.id}' is {what}", x.span, hint)
        if isinstance(x, A.Neg):
            if allow_hole and isinstance(x.operand, A.Num) and x.operand.value == 1:
                return -1
            v = self.static_dim(x.operand)
            if isinstance(v, int):
                raise SpecError(f"size {-v} is negative", x.span, "-1 in a reshape infers one size")
            return -v
        if isinstance(x, A.BinOp) and x.op in ("add", "sub", "mul", "div", "floordiv"):
            a, b = self.static_dim(x.lhs), self.static_dim(x.rhs)
            if x.op == "add":
                return a + b
            if x.op == "sub":
                return a - b
            if x.op == "mul":
                return a * b
            if b == 0:
                raise SpecError("division of a size by zero", x.span)
            if isinstance(b, Sym) and len(b.terms) != 1:
                raise SpecError(f"cannot divide a size by the sum {b}", x.rhs.span)
            if isinstance(a, int) and isinstance(b, int):
                if a % b:
                    raise SpecError(f"{a} / {b} is not a whole size", x.span)
                return a // b
            return div(a, b)  # exact division; the runtime checks it is whole
        raise SpecError("expected a size: a symbol, an integer, or arithmetic of those", x.span,
                        "for example D / H or E // 2")
