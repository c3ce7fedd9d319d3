"""Checking a parsed spec and building level-1 graphs from it.

One :class:`OpBuilder` per op walks the AST once (its calls, static arguments and indexing are
in build_calls.py, build_static.py and build_index.py; dtype-generic ops in generics.py): it resolves names, evaluates the static
arguments of built-ins (axes, sizes, dtypes), applies each primitive's shape and dtype rule
(ir/registry.py), and turns every rule failure into a SpecError pointing at the operand or
argument at fault. Calls of other ops of the file become ``call`` nodes typed against the
callee's signature (symbols unified); passes/inline.py removes them. Ops are built callees
first; a cycle of calls is an error at the call that closes it.
"""
from __future__ import annotations

import sys
from typing import Any

from ..ir import registry
from ..ir.dims import Dim, Sym, format_shape
from ..ir.graph import Attrs, Generic, Graph, Node, Param, Program, Source, Span, Value, collector_paused
from ..ir.registry import RuleError
from ..ir.types import INT_RANGES, SPEC_DTYPES, DType, ScalarType, TensorType, Type  # noqa: F401 (INT_RANGES re-exported)
from . import ast as A
from .build_calls import CallsMixin, _builtins
from .build_index import IndexMixin
from .build_scan import ScanMixin
from .build_static import StaticMixin
from .diagnostics import SpecError, did_you_mean
from .layouts import check_layout
from .build_text import (DTYPE_ALIASES, KEYWORDS, cast_operand, cast_text, check_not_keyword, fill_hint,  # noqa: F401
                         fits, int_range_text, parse_dtype, snippet)
from .generics import generic_of

BINOP_PRIM = {"add": "add", "sub": "sub", "mul": "mul", "div": "div", "pow": "pow", "matmul": "matmul",
              "lt": "lt", "le": "le", "gt": "gt", "ge": "ge", "eq": "eq", "ne": "ne",
              "and": "logical_and", "or": "logical_or", "floordiv": "floordiv"}
RECURSION_LIMIT = 20_000
OPERATOR_TEXT = {"add": "+", "sub": "-", "mul": "*", "div": "/", "floordiv": "//", "pow": "**", "matmul": "@",
                 "lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!=", "and": "&", "or": "|"}


# -- the whole file -----------------------------------------------------------------------------


def build_program(module: A.ModuleDecl, source: Source, namespace: str) -> Program:
    decls: dict[str, A.OpDecl] = {}
    builtins = registry.spec_builtins()
    for op in module.ops:
        check_not_keyword(op.name, "an op")
        if op.name.text in decls:
            first = decls[op.name.text].name.span
            raise SpecError(f"op '{op.name.text}' is defined twice", op.name.span,
                            f"the first definition is at line {first.line}")
        if op.name.text in builtins:
            raise SpecError(f"op '{op.name.text}' has the name of a built-in", op.name.span,
                            "choose another name")
        decls[op.name.text] = op
    if not decls:
        raise SpecError("the spec defines no op", Span(source, 1, 1, 1, 2),
                        "start with: op NAME(x: f16[M, D]) -> f16[M, D] { return x }")
    order = call_order(decls)
    graphs: dict[str, Graph] = {}
    # Checking recurses once per level of an expression (a chain of a thousand '+' is a
    # thousand levels). Python-to-Python calls do not grow the C stack, so a higher limit is
    # safe; whatever is deeper still is a SpecError at its statement, not a crash.
    limit = sys.getrecursionlimit()
    if limit < RECURSION_LIMIT:
        sys.setrecursionlimit(RECURSION_LIMIT)
    generics: dict[str, Generic] = {}
    try:
        with collector_paused():
            for name in order:
                decl = decls[name]
                if not decl.type_params:
                    graphs[name] = OpBuilder(decl, graphs, decls, generics=generics).build()
                    continue
                info = generics[name] = generic_of(decl)
                for combo, inst in info.instances.items():
                    env = dict(zip(info.variables, combo))
                    try:
                        graphs[inst] = OpBuilder(decl, graphs, decls, type_env=env, name=inst,
                                                 generics=generics).build()
                    except SpecError as e:
                        binding = ", ".join(f"{v} = {d}" for v, d in env.items())
                        raise SpecError(f"with {binding}: {e.message}", e.span, e.hint) from None
    finally:
        if limit < RECURSION_LIMIT:
            sys.setrecursionlimit(limit)
    ordered = {}
    for n in decls:
        for inst in (generics[n].instances.values() if n in generics else (n,)):
            ordered[inst] = graphs[inst]
    return Program(namespace, source, ordered, generics)


def call_order(decls: dict[str, A.OpDecl]) -> list[str]:
    """Callees before callers; a cycle of calls is an error at the call that closes it.

    One depth-first search over the call graph (linear in ops and calls; networkx's find_cycle
    was quadratic in the length of a chain of ops calling ops)."""
    callees: dict[str, list[str]] = {}
    sites: dict[tuple[str, str], Span] = {}
    for name, op in decls.items():
        out = callees[name] = []
        for func in op.calls:
            if func.text in decls and (name, func.text) not in sites:
                out.append(func.text)
                sites[(name, func.text)] = func.span
    order: list[str] = []
    state: dict[str, int] = {}          # 1: on the search path, 2: done
    for root in decls:
        if root in state:
            continue
        path = [root]
        state[root] = 1
        todo = [iter(callees[root])]
        while todo:
            nxt = next(todo[-1], None)
            if nxt is None:
                todo.pop()
                done = path.pop()
                state[done] = 2
                order.append(done)
            elif state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise SpecError(f"ops call each other in a cycle: {' -> '.join(cycle)}", sites[(path[-1], nxt)],
                                "an op may call other ops of the file, which are inlined; recursion cannot be")
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                todo.append(iter(callees[nxt]))
    return order




# -- one op -------------------------------------------------------------------------------------


class OpBuilder(CallsMixin, StaticMixin, IndexMixin, ScanMixin):
    def __init__(self, decl: A.OpDecl, graphs: dict[str, Graph], decls: dict[str, A.OpDecl], *,
                 type_env: dict[str, DType] | None = None, name: str | None = None,
                 generics: dict[str, Generic] | None = None):
        """``type_env``: the dtype variables' binding of this instance, named ``name``;
        ``generics``: the dtype-generic ops built so far (a call picks an instance)."""
        self.decl = decl
        self.type_env = type_env or {}
        self.graph_name = name or decl.name.text
        self.generics = generics if generics is not None else {}
        self._given: dict[int, Value] = {}      # call arguments already evaluated (a generic call)
        self.graphs = graphs            # callees already built
        self.decls = decls
        self.nodes: list[Node] = []
        self.env: dict[str, tuple[Value, Span]] = {}
        self.symbols: dict[str, Span] = {}
        self.dim_values: dict[str, Value] = {}
        self.consts: dict[Value, Any] = {}    # values that are literals, for folding negation
        self.params_by_name = {p.name.text for p in decl.params}
        self.builtins = _builtins()
        self.checked_calls: set = set()
        self.divisions: dict[str, tuple] = {}
        self.scan_locals: dict[str, Span] = {}   # names local to a scan's body (frontend/build_scan.py)

    # -- entry ---------------------------------------------------------------------------------
    def build(self) -> Graph:
        at = self.decl.name.span
        try:
            params = self.params()
            outputs = None
            for stmt in self.decl.body:
                at = stmt.span
                if outputs is not None:
                    raise SpecError("statement after return", stmt.span,
                                    "return must be the last statement of an op")
                if isinstance(stmt, A.Assign):
                    self.assign(stmt)
                else:
                    if len(stmt.values) == 1 and isinstance(stmt.values[0], A.TupleLit):
                        inner = ", ".join(snippet(x.span) for x in stmt.values[0].items)
                        raise SpecError("several results are returned without parentheses",
                                        stmt.values[0].span, f"return {inner}")
                    outputs, exprs = self.returned(stmt)
                    ret = stmt
        except RecursionError:
            raise SpecError("this statement nests expressions too deeply to check", at,
                            "split it into several statements") from None
        if outputs is None:
            raise SpecError(f"op '{self.decl.name.text}' has no return statement", self.decl.body_span,
                            "end the body with: return EXPR")
        results = self.check_results(outputs, exprs, ret)
        g = Graph(self.graph_name, tuple(params), tuple(self.nodes), tuple(outputs), tuple(results),
                  self.decl.tuple_result or len(results) > 1, self.decl.span)
        return g

    # -- parameters ----------------------------------------------------------------------------
    def params(self) -> list[Param]:
        out = []
        # an integer scalar parameter may be used as a size (reshape(x, [B, S, heads, -1])):
        # bound at the call from its value, like a symbol from a shape
        self.scalar_sizes = {p.name.text for p in self.decl.params if p.type.dims is None
                             and p.type.dtype.text in ("i64", "i32", "i8", "u8")}
        compound = []
        for p in self.decl.params:
            name = p.name.text
            check_not_keyword(p.name, "a parameter")
            if name in self.env:
                raise SpecError(f"parameter '{name}' is declared twice", p.name.span)
            dtype = self.dtype(p.type.dtype)
            if p.type.dims is not None:
                dims = []
                for d in p.type.dims:
                    if isinstance(d.value, int):
                        if d.value < 0:
                            raise SpecError(f"size {d.value} is negative", d.span)
                        dims.append(d.value)
                    elif not isinstance(d.value, str):
                        # size arithmetic: its symbols must be bound by another axis (checked below)
                        compound.append((len(out), len(dims), d))
                        dims.append(0)
                    else:
                        if d.value in SPEC_DTYPES:
                            raise SpecError(f"'{d.value}' is a dtype, not a size", d.span)
                        if d.value in self.type_env:
                            raise SpecError(f"'{d.value}' is a dtype variable, not a size", d.span,
                                            "give the size another name")
                        check_not_keyword(A.Ident(d.value, d.span), "a size")
                        self.symbols.setdefault(d.value, d.span)
                        dims.append(Sym.of(d.value))
                ty: Type = TensorType(dtype, tuple(dims))
            else:
                ty = ScalarType(dtype)
            layout = check_layout(p.layout, ty, name) if p.layout is not None else None
            default, has_default = None, False
            if p.default is not None:
                if isinstance(ty, TensorType):
                    raise SpecError(f"the tensor parameter '{name}' cannot have a default", p.default.span,
                                    "only scalar parameters (attributes) take defaults")
                default, has_default = self.scalar_default(p.default, dtype), True
            first_default = next((q for q in out if q.has_default), None)
            if first_default is not None and not has_default:
                # a torch schema, like a Python signature, takes positional parameters first
                what = "tensor parameter" if isinstance(ty, TensorType) else "parameter"
                raise SpecError(f"the {what} '{name}' has no default but follows '{first_default.name}', "
                                f"which has one", p.name.span,
                                f"parameters with defaults come last (as in Python): move '{name}' before "
                                f"'{first_default.name}'")
            v = Value(ty, name)
            self.env[name] = (v, p.name.span)
            out.append(Param(name, v, default, has_default, layout, p.span))
        for name, (v, span) in self.env.items():
            if name in self.symbols and name not in self.scalar_sizes:
                raise SpecError(f"'{name}' is both a parameter and a size symbol", self.symbols[name],
                                "give the size another name")
        for name in self.scalar_sizes:
            self.symbols.setdefault(name, self.env[name][1])
        for i, axis, d in compound:
            size = self.param_size(d)
            p = out[i]
            shape = list(p.value.type.shape)
            shape[axis] = size
            v = Value(TensorType(p.value.type.dtype, tuple(shape)), p.name)
            self.env[p.name] = (v, self.env[p.name][1])
            out[i] = Param(p.name, v, p.default, p.has_default,
                           check_layout(self.decl.params[i].layout, v.type, p.name)
                           if self.decl.params[i].layout is not None else None, p.span)
        return out

    def param_size(self, d: A.DimDecl) -> Dim:
        """A parameter axis written as size arithmetic (``w: f16[3 * D, D]``): every symbol in it
        bound by a plain axis of some parameter (or an integer scalar parameter)."""
        def names(x):
            if isinstance(x, A.Name):
                yield x
            for attr in ("lhs", "rhs", "operand"):
                if hasattr(x, attr):
                    yield from names(getattr(x, attr))
        for n in names(d.value):
            if n.id not in self.symbols:
                raise SpecError(f"the size '{n.id}' in {snippet(d.span)} is not bound by any parameter", n.span,
                                f"a size in arithmetic must also be a whole axis of some parameter (x: f16[{n.id}, ...]) "
                                f"or an integer scalar parameter")
        size = self.static_dim(d.value)
        if isinstance(size, int) and size < 0:
            raise SpecError(f"size {size} is negative", d.span)
        return size

    def scalar_default(self, e: A.Expr, dtype: DType):
        v = self.static_number(e)
        if isinstance(v, bool):
            if not dtype.is_bool:
                raise SpecError(f"default {str(v).lower()} for a {dtype} parameter", e.span)
            return v
        if dtype.is_bool:
            raise SpecError(f"a bool parameter needs true or false, got {v}", e.span)
        if isinstance(v, float) and not dtype.is_float:
            raise SpecError(f"default {v} for an integer parameter of dtype {dtype}", e.span,
                            "declare it as f32, or give an integer")
        if not fits(v, dtype):
            raise SpecError(f"default {v} does not fit in {dtype}", e.span, int_range_text(dtype))
        return float(v) if dtype.is_float else int(v)

    # -- statements ----------------------------------------------------------------------------
    def assign(self, stmt: A.Assign) -> None:
        seen: set[str] = set()
        for t in stmt.targets:
            if t.text in seen:
                raise SpecError(f"'{t.text}' appears twice on the left of '='", t.span,
                                "give each value its own name")
            seen.add(t.text)
            check_not_keyword(t, "a value")
            if t.text in self.params_by_name:
                raise SpecError(f"cannot assign to the parameter '{t.text}' of op '{self.decl.name.text}'",
                                t.span, f"values are immutable; give the new value another name, "
                                f"e.g. {t.text}2")
            if t.text in self.env:
                first = self.env[t.text][1]
                raise SpecError(f"'{t.text}' is already defined (line {first.line})", t.span,
                                "values are immutable; give the new value another name")
            if t.text in self.symbols:
                first = self.symbols[t.text]
                raise SpecError(f"cannot assign to '{t.text}', a size symbol of op '{self.decl.name.text}' "
                                f"(line {first.line})", t.span,
                                "sizes are bound by the parameters' shapes; give the value another name")
            if t.text in SPEC_DTYPES or t.text in ("None", "T"):
                raise SpecError(f"'{t.text}' cannot be assigned", t.span)
        values = self.values(stmt.value, len(stmt.targets))
        for t, v in zip(stmt.targets, values):
            if v.name is None:
                v.name = t.text
            self.env[t.text] = (v, t.span)

    def values(self, e: A.Expr, n: int) -> list[Value]:
        if isinstance(e, A.Scan):
            return self.scan(e, n)
        if n == 1:
            return [self.value(e)]
        if isinstance(e, A.Call):
            outs = self.call(e)
            if len(outs) == n:
                return outs
            raise SpecError(f"'{e.func.text}' gives {len(outs)} value{'s' * (len(outs) != 1)}, "
                            f"but {n} names are assigned", e.span)
        raise SpecError(f"{n} names are assigned from one value", e.span)

    def returned(self, stmt: A.Return) -> tuple[list[Value], list[A.Expr]]:
        """The returned values, each with the expression it comes from: a call of a built-in or
        an op with several results returns all of them (``return topk(x, k=2)``, also among
        other values: ``return y, topk(x, k=2)``)."""
        outputs: list[Value] = []
        exprs: list[A.Expr] = []
        for e in stmt.values:
            outs = self.call(e) if isinstance(e, A.Call) else [self.value(e)]
            outputs += outs
            exprs += [e] * len(outs)
        return outputs, exprs

    def check_results(self, outputs: list[Value], exprs: list[A.Expr], ret: A.Return) -> list[Type]:
        declared = self.decl.results
        if len(outputs) != len(declared):
            n, m = len(declared), len(outputs)
            msg = (f"op '{self.decl.name.text}' declares {n} result{'s' * (n != 1)} but returns "
                   f"{m} value{'s' * (m != 1)}")
            decl_text = ", ".join(snippet(d.span) for d in declared)
            if m > n:
                e = exprs[n]
                k = exprs.count(e)
                if k > 1:
                    names = ", ".join("abcdefgh"[:k]) if k <= 8 else "a, b, ..."
                    raise SpecError(msg, e.span, f"'{e.func.text}' gives {k} values and returning it returns "
                                                 f"all of them: declare each, or write {names} = "
                                                 f"{snippet(e.span)} and return the ones you want")
                raise SpecError(msg, e.span,
                                f"return {n} value{'s' * (n != 1)}, or declare more results: "
                                f"-> ({decl_text}, ...)")
            raise SpecError(msg, ret.span, f"the op declares -> {'(' * (n > 1)}{decl_text}{')' * (n > 1)}")
        types = []
        for i, (v, d, e) in enumerate(zip(outputs, declared, exprs)):
            dtype = self.dtype(d.dtype)
            if d.dims is None:
                raise SpecError("an op returns tensors; declare a shape, e.g. f32[] for a 0-d result",
                                d.span)
            dims = []
            for dd in d.dims:
                if isinstance(dd, A.Name) and dd.id not in self.symbols:
                    raise SpecError(f"result size '{dd.id}' is not bound by any parameter", dd.span,
                                    did_you_mean(dd.id, self.symbols) or
                                    "sizes are bound by the parameters' shapes")
                dims.append(self.static_dim(dd))
            want = TensorType(dtype, tuple(dims))
            which = f"result {i}" if len(outputs) > 1 else "the result"
            if not isinstance(v.type, TensorType):
                raise SpecError(f"{which} is the scalar {v.type}, but the op declares {want}", e.span,
                                "ops return tensors")
            if v.type.dtype != want.dtype:
                k = exprs.count(e)
                hint = f"cast it: {cast_text(e, want.dtype)}" if k == 1 else \
                    f"'{e.func.text}' gives {k} values: assign them ({', '.join('abcdefgh'[:k])} = ...) and " \
                    f"return cast({'abcdefgh'[i - exprs.index(e)]}, {want.dtype})" if k <= 8 else None
                raise SpecError(f"{which} is {v.type}, but the op declares {want}", e.span, hint)
            if tuple(v.type.shape) != want.shape:
                raise SpecError(f"{which} has shape {format_shape(v.type.shape)}, but the op declares "
                                f"{format_shape(want.shape)}", e.span)
            types.append(want)
        return types

    # -- expressions ---------------------------------------------------------------------------
    def value(self, e: A.Expr) -> Value:
        if isinstance(e, A.Call):
            outs = self.call(e)
            if len(outs) != 1:
                raise SpecError(f"'{e.func.text}' gives {len(outs)} values; unpack them first",
                                e.span, f"a, b = {snippet(e.span)}")
            return outs[0]
        if isinstance(e, A.Name):
            return self.name(e)
        if isinstance(e, A.Num):
            dtype = DType.f32 if isinstance(e.value, float) else DType.i64
            return self.const(e.value, dtype, e.span)
        if isinstance(e, A.Bool):
            return self.const(e.value, DType.bool, e.span)
        if isinstance(e, A.BinOp):
            return self.binop(e)
        if isinstance(e, A.Neg):
            if isinstance(e.operand, A.Num):
                dtype = DType.f32 if isinstance(e.operand.value, float) else DType.i64
                return self.const(-e.operand.value, dtype, e.span)
            v = self.value(e.operand)
            if v in self.consts and not isinstance(self.consts[v], bool):
                return self.const(-self.consts[v], v.type.dtype, e.span)
            return self.emit("neg", [v], {}, e.span, [e.operand])[0]
        if isinstance(e, A.Not):
            v = self.value(e.operand)
            return self.emit("logical_not", [v], {}, e.span, [e.operand])[0]
        if isinstance(e, A.Attribute):
            return self.attribute(e)
        if isinstance(e, A.Index):
            return self.index(e)
        if isinstance(e, A.Str):
            raise SpecError("a string is only allowed as a keyword argument value", e.span,
                            'for example gelu(x, approximate="tanh")')
        if isinstance(e, (A.TupleLit, A.ListLit)):
            raise SpecError("a list or tuple is only allowed as an argument (shape, axes, permutation)",
                            e.span)
        if isinstance(e, (A.SliceItem, A.EllipsisItem)):
            raise SpecError("a slice is only allowed inside [ ]", e.span)
        raise SpecError(f"unsupported expression {type(e).__name__}", e.span)

    def const(self, value, dtype: DType, span: Span) -> Value:
        if not fits(value, dtype):
            raise SpecError(f"the integer {value} does not fit in {dtype}", span, int_range_text(dtype))
        v = self.emit("const", [], {"value": value, "dtype": dtype}, span, [])[0]
        self.consts[v] = value
        return v

    def known_names(self) -> list[str]:
        return list(self.env) + list(self.symbols)

    def name(self, e: A.Name) -> Value:
        if e.id in self.env:
            v = self.env[e.id][0]
            if self.scan_scope is not None and v is self.scan_scope.index_value:
                return self.step_index_value(e)
            return v
        if e.id in self.scan_locals:
            first = self.scan_locals[e.id]
            raise SpecError(f"'{e.id}' is defined in the body of a scan (line {first.line}); the names of a "
                            f"scan's body are local to it", e.span,
                            "return it from the body (as a carry or a step output) to use it after the scan")
        if e.id in self.symbols:
            return self.dim_value(e.id, e.span)
        if e.id in SPEC_DTYPES or e.id in self.type_env:
            what = "a dtype variable" if e.id in self.type_env else "a dtype"
            raise SpecError(f"'{e.id}' is {what}, not a value", e.span,
                            f"to convert a value write cast(x, {e.id})")
        if e.id == "None":
            raise SpecError("None is only allowed inside [ ] (a new axis)", e.span)
        if e.id in self.builtins or e.id in self.decls:
            raise SpecError(f"'{e.id}' is a function; call it", e.span, f"{e.id}(...)")
        hint = did_you_mean(e.id, self.known_names())
        if hint is None and e.id in ("pi", "e"):
            hint = "write the number itself, e.g. 3.141592653589793"
        raise SpecError(f"unknown name '{e.id}'", e.span, hint)

    def dim_value(self, s: str, span: Span) -> Value:
        if s not in self.dim_values:
            self.dim_values[s] = self.emit("dim", [], {"size": Sym.of(s)}, span, [])[0]
        return self.dim_values[s]

    def binop(self, e: A.BinOp) -> Value:
        lhs, rhs = self.value(e.lhs), self.value(e.rhs)
        return self.emit(BINOP_PRIM[e.op], [lhs, rhs], {}, e.span, [e.lhs, e.rhs])[0]

    def attribute(self, e: A.Attribute) -> Value:
        if e.attr.text != "T":
            raise SpecError(f"unknown attribute '.{e.attr.text}'", e.attr.span,
                            "the only attribute is .T (swap the last two axes)")
        v = self.value(e.value)
        if not isinstance(v.type, TensorType) or v.type.rank < 2:
            raise SpecError(f".T needs a tensor of rank 2 or more, got {v.type}", e.span,
                            "use transpose(x, a, b) or permute(x, [...]) for other axes")
        r = v.type.rank
        return self.emit("transpose", [v], {"a": r - 2, "b": r - 1}, e.span, [e.value])[0]

    # -- calls ---------------------------------------------------------------------------------


    def dtype(self, ident: A.Ident) -> DType:
        """A dtype name, or a dtype variable of this op bound in this instance."""
        if ident.text in self.type_env:
            return self.type_env[ident.text]
        return parse_dtype(ident)


    # -- static arguments ----------------------------------------------------------------------


    # -- indexing ------------------------------------------------------------------------------


    # -- nodes ---------------------------------------------------------------------------------
    def emit(self, op: str, inputs: list[Value], attrs: dict, span: Span, operand_exprs: list,
             sites: dict[str, Span] | None = None) -> list[Value]:
        prim = registry.get(op)
        try:
            types, attrs = prim.run_infer([v.type for v in inputs], attrs)
        except RuleError as err:
            raise self.rule_error(err, span, operand_exprs, sites or {}) from None
        if prim.kind is registry.Kind.POINTWISE and self.consts:
            self.check_literals(op, inputs, operand_exprs, span)
        outs = [Value(t) for t in types]
        self.nodes.append(Node(op, tuple(inputs), Attrs(attrs), tuple(outs), span))
        return outs

    def check_literals(self, op: str, inputs: list[Value], operand_exprs: list, span: Span) -> None:
        """An integer literal adopts the dtype of the tensor it meets (DSL.md); like PyTorch,
        refuse one that does not fit in it (x_u8 + 300)."""
        start = 1 if op == "where" else 0
        tensors = [v.type.dtype for v in inputs[start:] if isinstance(v.type, TensorType)]
        if not tensors or tensors[0] not in INT_RANGES:
            return
        dtype = tensors[0]
        for i, v in enumerate(inputs[start:], start):
            if v in self.consts and not fits(self.consts[v], dtype):
                where = operand_exprs[i].span if i < len(operand_exprs) else span
                raise SpecError(f"the literal {self.consts[v]} does not fit in {dtype}, the dtype of the "
                                f"tensor it meets", where, int_range_text(dtype))

    def rule_error(self, err: RuleError, span: Span, operand_exprs: list, sites: dict[str, Span]) -> SpecError:
        where = span
        if isinstance(err.arg, int) and err.arg < len(operand_exprs):
            where = operand_exprs[err.arg].span
        elif isinstance(err.arg, str) and err.arg in sites:
            where = sites[err.arg]
        return SpecError(err.message, where, fill_hint(err.hint, operand_exprs))
