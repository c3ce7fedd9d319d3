"""Checking a parsed spec and building level-1 graphs from it.

One :class:`OpBuilder` per op walks the AST once: it resolves names, evaluates the static
arguments of built-ins (axes, sizes, dtypes), applies each primitive's shape and dtype rule
(ir/registry.py), and turns every rule failure into a SpecError pointing at the operand or
argument at fault. Calls of other ops of the file become ``call`` nodes typed against the
callee's signature (symbols unified); passes/inline.py removes them. Ops are built callees
first; a cycle of calls is an error at the call that closes it.
"""
from __future__ import annotations

import itertools
import re
import sys
from typing import Any

from ..ir import registry
from ..ir.dims import Dim, Sym, div, format_shape, subst
from ..ir.prims_shape import slice_size
from ..ir.graph import Attrs, Generic, Graph, Node, Param, Program, Source, Span, Value, collector_paused
from ..ir.registry import Arg, RuleError
from ..ir.types import SPEC_DTYPES, DType, ScalarType, TensorType, Type
from . import ast as A
from .diagnostics import SpecError, did_you_mean, source_line
from .layouts import check_layout

DTYPE_ALIASES = {"float32": "f32", "float": "f32", "float16": "f16", "half": "f16", "bfloat16": "bf16",
                 "float64": "f32", "double": "f32", "int32": "i32", "int64": "i64", "int": "i64",
                 "int8": "i8", "uint8": "u8", "fp8": "f8e4m3", "float8": "f8e4m3", "f64": "f32"}
BINOP_PRIM = {"add": "add", "sub": "sub", "mul": "mul", "div": "div", "pow": "pow", "matmul": "matmul",
              "lt": "lt", "le": "le", "gt": "gt", "ge": "ge", "eq": "eq", "ne": "ne",
              "and": "logical_and", "or": "logical_or", "floordiv": "floordiv"}
RECURSION_LIMIT = 20_000
OPERATOR_TEXT = {"add": "+", "sub": "-", "mul": "*", "div": "/", "floordiv": "//", "pow": "**", "matmul": "@",
                 "lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!=", "and": "&", "or": "|"}


from ..ir.types import INT_RANGES  # noqa: E402  (re-exported: the range of each integer dtype)


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


KEYWORDS = ("op", "return", "true", "false", "inf")


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


FLOAT_DTYPES = (DType.f16, DType.bf16, DType.f32)    # <T> alone: every float dtype a spec computes in


def generic_of(decl: A.OpDecl) -> Generic:
    """A dtype-generic op's variables, the dtypes each admits, its instances (one graph per
    binding, named op__f16 or op__f16_f32) and, per variable, the parameter it is read from."""
    names: list[str] = []
    admitted = []
    for tp in decl.type_params:
        check_not_keyword(tp.name, "a dtype variable")
        if tp.name.text in SPEC_DTYPES:
            raise SpecError(f"'{tp.name.text}' is a dtype; a dtype variable needs another name", tp.name.span,
                            "for example T")
        if tp.name.text in names:
            raise SpecError(f"dtype variable '{tp.name.text}' is declared twice", tp.name.span)
        dts = tuple(parse_dtype(d) for d in tp.dtypes) if tp.dtypes else FLOAT_DTYPES
        if len(set(dts)) != len(dts):
            raise SpecError(f"'{tp.name.text}' lists a dtype twice", tp.span)
        names.append(tp.name.text)
        admitted.append(dts)
    typed = []
    for v, tp in zip(names, decl.type_params):
        ps = tuple(p.name.text for p in decl.params if p.type.dims is not None and p.type.dtype.text == v)
        if not ps:
            raise SpecError(f"dtype variable '{v}' is not the dtype of any tensor parameter", tp.name.span,
                            f"it is bound from the arguments: give a parameter the type {v}[...]")
        typed.append(ps)
    combos = list(itertools.product(*admitted))
    if len(combos) > MAX_INSTANCES:
        raise SpecError(f"op '{decl.name.text}' has {len(combos)} dtype bindings, more than {MAX_INSTANCES}",
                        decl.type_params[0].span, "admit fewer dtypes per variable")
    instances = {c: f"{decl.name.text}__{'_'.join(str(d) for d in c)}" for c in combos}
    return Generic(decl.name.text, tuple(names), tuple(admitted), tuple(ps[0] for ps in typed), instances,
                   tuple(typed))


MAX_INSTANCES = 16


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


_BUILTINS: tuple[int, dict] = (-1, {})


def _builtins() -> dict:
    """registry.spec_builtins(), rebuilt only when a primitive has been registered since."""
    global _BUILTINS
    if _BUILTINS[0] != len(registry.REGISTRY):
        table = registry.spec_builtins()     # loads the registry on first use
        _BUILTINS = (len(registry.REGISTRY), table)
    return _BUILTINS[1]


def signature_of_decl(decl: A.OpDecl) -> str:
    """``rms_norm<T: f16 | f32>(x, w, eps)``, for hints."""
    tps = ", ".join(tp.name.text + (": " + " | ".join(d.text for d in tp.dtypes) if tp.dtypes else "")
                    for tp in decl.type_params)
    return f"{decl.name.text}<{tps}>({', '.join(p.name.text for p in decl.params)})"


def signature(g: Graph) -> str:
    """``name(x: f16[M, K], eps: f32)``, for hints."""
    return f"{g.name}({', '.join(f'{p.name}: {p.value.type}' for p in g.params)})"


def _divisions(g: Graph) -> tuple:
    """Every symbolic size of a graph (types and attributes) that divides by a symbol."""
    found: dict = {}

    def visit(x):
        if isinstance(x, Sym):
            if any(e < 0 for m, _ in x.terms for _, e in m):
                found[x] = None
        elif isinstance(x, (tuple, list)):
            for y in x:
                visit(y)
        elif isinstance(x, (TensorType,)):
            visit(x.shape)

    for n in g.nodes:
        for v in n.outputs:
            visit(v.type)
        for a in n.attrs.values():
            visit(a)
    for t in g.result_types:
        visit(t)
    return tuple(found)


# -- one op -------------------------------------------------------------------------------------
class OpBuilder:
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
            return self.env[e.id][0]
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
    def call(self, e: A.Call) -> list[Value]:
        fname = e.func.text
        builtins = self.builtins
        if fname in self.decls:
            return self.call_op(e)
        if fname in builtins:
            return self.call_builtin(e, builtins[fname])
        if fname in SPEC_DTYPES:
            raise SpecError(f"'{fname}' is a dtype, not a function", e.func.span,
                            f"cast({', '.join(snippet(a.span) for a in e.args) or 'x'}, {fname})")
        hint = did_you_mean(fname, list(builtins) + list(self.decls))
        raise SpecError(f"unknown function '{fname}'", e.func.span, hint)

    def bind_args(self, e: A.Call, sig: list[Arg]) -> tuple[list[A.Expr], dict[str, tuple[Any, A.Expr]]]:
        """Match a call's arguments to a signature: (operand expressions, {attr: (ast, site)})."""
        fname = e.func.text
        names = [a.name for a in sig]
        operands: list[A.Expr] = []
        attrs: dict[str, A.Expr] = {}
        pos = list(e.args)
        var = next((a for a in sig if a.kind == "tensors"), None)
        described = f"{fname}({', '.join(names)})"
        if var is not None:
            operands = pos
            pos = []
        for a in sig:
            if not pos:
                break
            if a.kind == "tensors":
                continue
            x = pos.pop(0)
            if a.is_operand:
                operands.append(x)
            else:
                attrs[a.name] = x
        if pos:
            n_pos = len([a for a in sig])
            raise SpecError(f"'{fname}' takes {n_pos} argument{'s' * (n_pos != 1)}, got {len(e.args)}",
                            pos[0].span, described)
        for kw in e.kwargs:
            k = kw.name.text
            spec = next((a for a in sig if a.name == k), None)
            if spec is None:
                raise SpecError(f"'{fname}' has no argument '{k}'", kw.name.span,
                                did_you_mean(k, names) or self.compare_hint(kw) or described)
            if spec.is_operand:
                raise SpecError(f"pass the operand '{k}' of '{fname}' by position", kw.name.span, described)
            if k in attrs:
                raise SpecError(f"'{fname}' gets '{k}' twice", kw.name.span, described)
            attrs[k] = kw.value
        n_ops = len([a for a in sig if a.kind == "tensor"])
        if var is None and len(operands) != n_ops:
            raise SpecError(f"'{fname}' takes {len(sig)} argument{'s' * (len(sig) != 1)} "
                            f"({', '.join(names)}), got {len(e.args) + len(e.kwargs)}", e.span, described)
        if var is not None and not operands:
            raise SpecError(f"'{fname}' needs at least one tensor", e.span, described)
        for a in sig:
            if not a.is_operand and a.required and a.name not in attrs:
                raise SpecError(f"'{fname}' needs the argument '{a.name}'", e.span, described)
        return operands, attrs

    def compare_hint(self, kw: A.Keyword) -> str | None:
        """``where(x = 0, ...)``: a keyword named like a value is a comparison written with '='."""
        if kw.name.text in self.env or kw.name.text in self.symbols:
            return f"'=' passes a keyword argument; to compare, write {kw.name.text} == {snippet(kw.value.span)}"
        return None

    def call_builtin(self, e: A.Call, prim) -> list[Value]:
        operand_exprs, attr_exprs = self.bind_args(e, list(prim.args))
        attrs: dict[str, Any] = {}
        sites: dict[str, Span] = {}
        for a in prim.args:
            if a.is_operand:
                continue
            if a.name in attr_exprs:
                x = attr_exprs[a.name]
                attrs[a.name] = self.static(x, a, e.func.text)
                sites[a.name] = x.span
            else:
                attrs[a.name] = a.default
        operands = [self.value(x) for x in operand_exprs]
        return self.emit(prim.name, operands, attrs, e.span, operand_exprs, sites)

    def dtype(self, ident: A.Ident) -> DType:
        """A dtype name, or a dtype variable of this op bound in this instance."""
        if ident.text in self.type_env:
            return self.type_env[ident.text]
        return parse_dtype(ident)

    def instance_called(self, e: A.Call) -> Graph:
        """A call of a dtype-generic op: the instance its arguments' dtypes pick."""
        info = self.generics[e.func.text]
        decl = self.decls[e.func.text]
        names = [p.name.text for p in decl.params]
        given = dict(zip(names, e.args))
        given.update({kw.name.text: kw.value for kw in e.kwargs})
        combo = []
        for var, param, admitted in zip(info.variables, info.sources, info.dtypes):
            x = given.get(param)
            if x is None:
                raise SpecError(f"'{e.func.text}' needs the argument '{param}'", e.span, signature_of_decl(decl))
            v = self._given[id(x)] = self.value(x)
            dt = v.type.dtype
            if dt not in admitted:
                raise SpecError(f"'{e.func.text}' takes {var} = {' | '.join(map(str, admitted))}; '{param}' is {v.type}",
                                x.span, cast_text(x, admitted[0]))
            combo.append(dt)
        return self.graphs[info.instances[tuple(combo)]]

    def call_op(self, e: A.Call) -> list[Value]:
        """A call of another op: unify its size symbols with the arguments' shapes."""
        fname = e.func.text
        callee = self.instance_called(e) if fname in self.generics else self.graphs[fname]
        names = [p.name for p in callee.params]
        described = signature(callee)
        given: dict[str, A.Expr] = {}
        if len(e.args) > len(names):
            raise SpecError(f"'{fname}' takes {len(names)} argument{'s' * (len(names) != 1)}, got {len(e.args)}",
                            e.args[len(names)].span, described)
        for p, x in zip(callee.params, e.args):
            given[p.name] = x
        for kw in e.kwargs:
            if kw.name.text not in names:
                raise SpecError(f"'{fname}' has no argument '{kw.name.text}'", kw.name.span,
                                did_you_mean(kw.name.text, names) or self.compare_hint(kw) or described)
            if kw.name.text in given:
                raise SpecError(f"'{fname}' gets '{kw.name.text}' twice", kw.name.span, described)
            given[kw.name.text] = kw.value
        mapping: dict[str, Dim] = {}
        source_of: dict[str, tuple[str, A.Expr, Type]] = {}
        inputs: list[Value] = []
        sizes_given: dict[str, Dim] = {}
        for p in callee.params:
            if p.name not in given:
                if not p.has_default:
                    raise SpecError(f"'{fname}' needs the argument '{p.name}'", e.span, described)
                inputs.append(self.const(p.default, p.value.type.dtype, e.span))
                continue
            x = given[p.name]
            want = p.value.type
            if p.name in callee.size_params:
                # a size of the callee: an integer or a size of this op (D / E is the size, not
                # a true division); the callee gets its value
                try:
                    d = sizes_given[p.name] = self.static_dim(x)
                except SpecError:
                    raise SpecError(f"'{fname}' uses '{p.name}' as a size: pass an integer or a size of this op",
                                    x.span, f"a computed value cannot size a tensor; {described}") from None
                v = self.const(d, want.dtype, x.span) if isinstance(d, int) else \
                    self.emit("dim", [], {"size": d}, x.span, [])[0]
                if v.type.dtype != want.dtype:
                    v = self.emit("cast", [v], {"dtype": want.dtype}, x.span, [x])[0]
                inputs.append(v)
                continue
            v = self._given.pop(id(x)) if id(x) in self._given else self.value(x)
            if isinstance(want, TensorType):
                if not isinstance(v.type, TensorType):
                    raise SpecError(f"'{fname}' expects a tensor {want} for '{p.name}', got the scalar {v.type}",
                                    x.span)
                if v.type.dtype != want.dtype:
                    raise SpecError(f"'{fname}' expects {want.dtype} for '{p.name}', got {v.type}", x.span,
                                    cast_text(x, want.dtype))
                if v.type.rank != want.rank:
                    raise SpecError(f"'{fname}' expects '{p.name}' of rank {want.rank} {want}, got {v.type}",
                                    x.span)
                for k, (dw, dv) in enumerate(zip(want.shape, v.type.shape)):
                    if isinstance(dw, int):
                        if dw != dv:
                            raise SpecError(f"'{fname}' expects size {dw} in axis {k} of '{p.name}', got {dv}",
                                            x.span)
                        continue
                    s = next(iter(dw.symbols))
                    if s in mapping and mapping[s] != dv:
                        first, fx, ft = source_of[s]
                        raise SpecError(
                            f"'{fname}' binds its size {s} to {mapping[s]} from {first} = {snippet(fx.span)}: {ft} "
                            f"and to {dv} from {p.name} = {snippet(x.span)}: {v.type}", x.span,
                            f"{described} needs {first} and {p.name} to agree in {s}")
                    mapping.setdefault(s, dv)
                    source_of.setdefault(s, (p.name, x, v.type))
            else:
                if isinstance(v.type, TensorType):
                    raise SpecError(f"'{fname}' expects a scalar {want} for '{p.name}', got the tensor {v.type}",
                                    x.span)
                if v.type.dtype != want.dtype:
                    if v.type.dtype.is_float and not want.dtype.is_float:
                        raise SpecError(f"'{fname}' expects {want.dtype} for '{p.name}', got {v.type}", x.span)
                    v = self.emit("cast", [v], {"dtype": want.dtype}, x.span, [x])[0]
            inputs.append(v)
        for s in callee.size_params:      # an integer scalar the callee uses as a size
            x = given.get(s)
            d = sizes_given[s] if s in sizes_given else next(q for q in callee.params if q.name == s).default
            if s in mapping and mapping[s] != d:
                raise SpecError(f"'{fname}' gets {s} = {d}, but its arguments' shapes give {s} = {mapping[s]}",
                                (x or e).span, described)
            mapping[s] = d
        self.check_substitution(callee, mapping, e)
        out_types = [TensorType(t.dtype, tuple(subst(d, mapping) for d in t.shape)) for t in callee.result_types]
        outs = [Value(t) for t in out_types]
        attrs = Attrs({"callee": callee.name, "sizes": tuple(sorted(mapping.items()))})
        self.nodes.append(Node("call", tuple(inputs), attrs, tuple(outs), e.span))
        return outs

    def check_substitution(self, callee: Graph, mapping: dict[str, Dim], e: A.Call) -> None:
        """Inlining substitutes the call's sizes into every size of the callee; a size that
        divides by a symbol (D / E) must not become a division by 0 or by a sum (E bound to
        0, or to M + N)."""
        divisions = self.divisions.get(callee.name)
        if divisions is None:
            divisions = self.divisions[callee.name] = _divisions(callee)
        if not divisions:
            return
        key = (callee.name, tuple(sorted(mapping.items())))
        if key in self.checked_calls:
            return
        for d in divisions:
            try:
                subst(d, mapping)
            except (ZeroDivisionError, ValueError):
                bound = ", ".join(f"{s} = {mapping[s]}" for s in sorted(d.symbols) if s in mapping)
                raise SpecError(f"calling '{callee.name}' with {bound} makes its size {d} a division by "
                                f"{'zero' if any(mapping.get(s) == 0 for s in d.symbols) else 'a sum'}",
                                e.span, f"{signature(callee)} divides by a size; pass a tensor whose size is "
                                        f"a single non-zero term") from None
        self.checked_calls.add(key)

    # -- static arguments ----------------------------------------------------------------------
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

    # -- indexing ------------------------------------------------------------------------------
    def index(self, e: A.Index) -> Value:
        v = self.value(e.value)
        if not isinstance(v.type, TensorType):
            raise SpecError(f"cannot index the scalar {v.type}", e.value.span)
        for it in e.items[1:]:
            if self.is_tensor_index(it):
                raise SpecError("an index tensor is only allowed in the first position", it.span,
                                "emb[ids] gathers rows; index other axes with integers and slices")
        items = list(e.items)
        if self.is_tensor_index(items[0]):
            ids = self.value(items[0])
            v = self.emit("gather_rows", [v, ids], {}, e.span, [e.value, items[0]])[0]
            if len(items) == 1:
                return v
            # The gathered axes come first and stay whole; the other items index the table's axes.
            items = [A.SliceItem(items[0].span, None, None, None)] * ids.type.rank + items[1:]
        return self.basic_index(v, items, e)

    def is_tensor_index(self, it) -> bool:
        if isinstance(it, (A.SliceItem, A.EllipsisItem)):
            return False
        if isinstance(it, A.Name) and it.id == "None":
            return False
        try:
            self.static_dim(it)
            return False
        except SpecError:
            pass
        if isinstance(it, A.Name) and it.id in self.env:
            return isinstance(self.env[it.id][0].type, TensorType)
        return not isinstance(it, (A.Num, A.Neg, A.BinOp))

    def basic_index(self, v: Value, items: list, e: A.Index) -> Value:
        shape = list(v.type.shape)
        n_ell = sum(isinstance(i, A.EllipsisItem) for i in items)
        if n_ell > 1:
            raise SpecError("an index may contain '...' once", e.span)
        consumes = [i for i in items if not isinstance(i, A.EllipsisItem)
                    and not (isinstance(i, A.Name) and i.id == "None")]
        if len(consumes) > len(shape):
            raise SpecError(f"too many indices ({len(consumes)}) for a tensor of rank {len(shape)}",
                            consumes[len(shape)].span, f"the tensor is {v.type}")
        if n_ell:
            k = next(j for j, i in enumerate(items) if isinstance(i, A.EllipsisItem))
            fill = [A.SliceItem(items[k].span, None, None, None)] * (len(shape) - len(consumes))
            items = items[:k] + fill + items[k + 1:]
        else:
            items = items + [A.SliceItem(e.span, None, None, None)] * (len(shape) - len(consumes))
        starts, stops, steps, out_shape = [], [], [], []
        axis = 0
        sliced = False
        for it in items:
            if isinstance(it, A.Name) and it.id == "None":
                out_shape.append(1)
                continue
            size = shape[axis]
            if isinstance(it, A.SliceItem):
                step = self.static_int(it.step, "a slice step") if it.step is not None else 1
                if step <= 0:
                    raise SpecError(f"slice step {step} must be positive", it.step.span)
                start = self.bound(it.start, size, 0)
                stop = self.bound(it.stop, size, size)
                if start != 0 or stop != size or step != 1:
                    sliced = True
                n = slice_size(start, stop, step)
                if isinstance(n, int) and n < 0:
                    n = 0
                out_shape.append(n)
                starts.append(start), stops.append(stop), steps.append(step)
            else:
                i = self.bound(it, size, None)
                if isinstance(i, int) and isinstance(size, int) and not 0 <= i < size:
                    raise SpecError(f"index {i} is out of range for size {size}", it.span)
                starts.append(i), stops.append(i + 1), steps.append(1)
                sliced = True
            axis += 1
        if sliced:
            v = self.emit("slice", [v], {"starts": tuple(starts), "stops": tuple(stops), "steps": tuple(steps)},
                          e.span, [e.value])[0]
        if tuple(out_shape) != tuple(v.type.shape):
            v = self.emit("reshape", [v], {"shape": tuple(out_shape)}, e.span, [e.value])[0]
        return v

    def bound(self, x, size: Dim, default) -> Dim:
        """A slice bound or an integer index, negative values counting from the end."""
        if x is None:
            return default
        d = self.static_dim(x, allow_hole=False) if not self._is_negative_literal(x) else self.static_int(x, "an index")
        if isinstance(d, int) and d < 0:
            d = size + d
            if isinstance(d, int) and d < 0:
                raise SpecError(f"index {self.static_int(x, 'an index')} is out of range for size {size}", x.span)
        if isinstance(d, int) and isinstance(size, int) and d > size:
            d = size  # NumPy clamps slice bounds past the end
        return d

    @staticmethod
    def _is_negative_literal(x) -> bool:
        return isinstance(x, A.Neg) and isinstance(x.operand, A.Num)

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

