"""Calls in a spec: of built-ins (arguments matched to the registry signature, static arguments
evaluated) and of other ops of the file (sizes unified, a dtype-generic callee's binding picked
from the arguments); part of OpBuilder (frontend/build.py).
"""
from __future__ import annotations

from typing import Any

from ..ir import registry
from ..ir.dims import Dim, Sym, subst
from ..ir.graph import Attrs, Graph, Node, Span, Value
from ..ir.registry import Arg
from ..ir.types import SPEC_DTYPES, TensorType, Type
from . import ast as A
from .diagnostics import SpecError, did_you_mean
from .build_text import cast_text, snippet


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


class CallsMixin:
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
