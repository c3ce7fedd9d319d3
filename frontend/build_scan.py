"""Recurrences in a spec: ``scan t in S [reverse] with h: T = init, ... { BODY }``; part of
OpBuilder (frontend/build.py).

The body is built like an op's body, in a scope of its own: it sees the values defined before
the scan, the step index ``t`` (an i64 value) and each carry's previous value; its names stay
local to it. ``x[t]`` (or ``x[:, t]``, any one axis) of a value defined before the scan is a
*step slice*: the body reads that position of the axis, which must have the scan's length.
The result is one ``scan`` node (ir/prims_scan.py) whose body is a graph of its own: its
parameters are the step index (when used), the carries, the step slices and the closed-over
values, its results the carries' next values then the step's outputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..ir.dims import Dim, format_shape
from ..ir.graph import Attrs, Graph, Node, Param, Value, unique_param_names
from ..ir.types import DType, ScalarType, TensorType
from . import ast as A
from .build_text import check_not_keyword, snippet
from .diagnostics import SpecError


@dataclass
class ScanScope:
    """What the body being built reads: the step index, the step slices made so far (by the
    sliced value and axis), and where the scan is (for errors)."""
    index: str
    index_value: Value
    length: Dim
    span: object
    slices: dict = field(default_factory=dict)        # (value, axis) -> the body's slice value
    index_used: bool = False
    carries: set = field(default_factory=set)          # the carries' values in the body


class ScanMixin:
    scan_scope: ScanScope | None = None
    scan_locals: dict                                   # name -> span, of every scan body so far

    def scan(self, e: A.Scan, n: int) -> list[Value]:
        if self.scan_scope is not None:
            raise SpecError("a scan inside the body of a scan is not supported in this version", e.span,
                            "write the inner recurrence as its own scan before or after this one")
        if e.reverse is not None and e.reverse.text != "reverse":
            raise SpecError(f"expected 'reverse' or 'with' after the scan's length, got '{e.reverse.text}'",
                            e.reverse.span, f"scan {e.index.text} in {snippet(e.length.span)} reverse with ...")
        idx = e.index
        check_not_keyword(idx, "a scan's step index")
        self._fresh_name(idx, "the step index")
        length = self.static_dim(e.length)
        if isinstance(length, int) and length < 0:
            raise SpecError(f"a scan's length {length} is negative", e.length.span)
        carries = []            # (name Ident, type, init Value | None, fill value | None)
        seen: set[str] = {idx.text}
        for c in e.carries:
            check_not_keyword(c.name, "a carry")
            if c.name.text in seen:
                raise SpecError(f"'{c.name.text}' is named twice in the scan", c.name.span,
                                "give each carry (and the step index) its own name")
            seen.add(c.name.text)
            self._fresh_name(c.name, "a carry")
            carries.append(self._carry(c))
        if not carries:
            raise SpecError("a scan needs at least one carry", e.span, "scan t in S with h: f32[H] = 0.0 { ... }")

        # -- the body, in a scope of its own ------------------------------------------------------
        outer_nodes, outer_env, outer_consts = self.nodes, self.env, self.consts
        index_value = Value(ScalarType(DType.i64), idx.text)
        scope = self.scan_scope = ScanScope(idx.text, index_value, length, e.span)
        self.nodes, self.env, self.consts = [], dict(outer_env), dict(outer_consts)
        carry_values = []
        for name, ty, _, _ in carries:
            v = Value(ty, name.text)
            carry_values.append(v)
            scope.carries.add(v)
            self.env[name.text] = (v, name.span)
        self.env[idx.text] = (index_value, idx.span)
        returned = None
        try:
            for stmt in e.body:
                if returned is not None:
                    raise SpecError("statement after the return of a scan's body", stmt.span,
                                    "return must be the last statement of the body")
                if isinstance(stmt, A.Assign):
                    self.assign(stmt)
                else:
                    returned = stmt, self.returned(stmt)
            body_nodes = self.nodes
            body_names = {k: v for k, v in self.env.items() if k not in outer_env}
        finally:
            self.nodes, self.env, self.consts, self.scan_scope = outer_nodes, outer_env, outer_consts, None
        if returned is None:
            raise SpecError("the body of a scan has no return", e.body_span,
                            f"end it with: return {', '.join(c[0].text + '_next' for c in carries)}[, outputs]")
        for k, (_, span) in body_names.items():
            if k not in (idx.text,) and k not in {c[0].text for c in carries}:
                self.scan_locals[k] = span
        stmt, (values, exprs) = returned
        k = len(carries)
        if len(values) < k:
            raise SpecError(f"the body returns {len(values)} value{'s' * (len(values) != 1)}, but the scan has "
                            f"{k} carr{'ies' if k != 1 else 'y'}", stmt.span,
                            "return each carry's next value first (in the order of 'with'), then the step's outputs")
        for (name, ty, _, _), v, x in zip(carries, values, exprs):
            if v.type != ty:
                raise SpecError(f"the next value of the carry '{name.text}' is {v.type}, but the carry is {ty}",
                                x.span, "a carry keeps its type from step to step: cast or reshape its next value")
        outs = values[k:]
        for v, x in zip(outs, exprs[k:]):
            if not isinstance(v.type, TensorType):
                raise SpecError(f"a step's output must be a tensor, got the scalar {v.type}", x.span)
        # -- the body as a graph: step index, carries, step slices, closed-over values ------------
        produced = {o for nd in body_nodes for o in nd.outputs}
        params_v = ([index_value] if scope.index_used else []) + carry_values
        slice_items = list(scope.slices.items())        # ((value, axis), slice value)
        params_v += [s for _, s in slice_items]
        inner = set(params_v) | produced
        closed: list[Value] = []
        for nd in body_nodes:
            for v in nd.inputs:
                if v not in inner and v not in closed:
                    closed.append(v)
        for v in values:
            if v not in inner and v not in closed:
                closed.append(v)
        fresh = {v: Value(v.type, v.name) for v in closed}
        body_nodes = [Node(nd.op, tuple(fresh.get(v, v) for v in nd.inputs), nd.attrs, nd.outputs, nd.span)
                      for nd in body_nodes]
        params = [Param(v.name or f"p{i}", v) for i, v in enumerate(params_v)]
        params += [Param(v.name or f"c{i}", fresh[v]) for i, v in enumerate(closed)]
        params = unique_param_names(params)
        results = tuple(fresh.get(v, v) for v in values)
        body = Graph(f"{self.graph_name}__scan_body", tuple(params), tuple(body_nodes), results,
                     tuple(v.type for v in results), True, e.span)
        inits = [init for _, _, init, _ in carries if init is not None]
        sliced = [v for (v, _), _ in slice_items]
        node_inputs = inits + sliced + closed
        attrs = Attrs({"body": body, "length": length, "reverse": e.reverse is not None,
                       "carries": k, "fills": tuple(f for _, _, _, f in carries),
                       "slice_axes": tuple(a for (_, a), _ in slice_items), "uses_index": scope.index_used})
        stacked = [Value(TensorType(v.type.dtype, (length,) + tuple(v.type.shape))) for v in outs]
        finals = [Value(ty, name.text + "_last") for name, ty, _, _ in carries]
        self.nodes.append(Node("scan", tuple(node_inputs), attrs, tuple(stacked + finals), e.span))
        if n == len(stacked):
            return stacked
        if n == len(stacked) + len(finals):
            return stacked + finals
        raise SpecError(f"the scan gives {len(stacked)} output{'s' * (len(stacked) != 1)} and {len(finals)} final "
                        f"carr{'ies' if len(finals) != 1 else 'y'}, but {n} name{'s' * (n != 1)} are assigned",
                        e.span, f"name the outputs ({len(stacked)}), or the outputs and then the final carries "
                        f"({len(stacked) + len(finals)})")

    def _fresh_name(self, ident: A.Ident, what: str) -> None:
        if ident.text in self.env:
            first = self.env[ident.text][1]
            raise SpecError(f"'{ident.text}' is already defined (line {first.line})", ident.span,
                            f"{what} needs a name of its own")
        if ident.text in self.symbols:
            raise SpecError(f"'{ident.text}' is a size symbol of this op", ident.span, f"give {what} another name")

    def _carry(self, c: A.Carry):
        init = self.value(c.init)
        if c.dtype is None:
            if not isinstance(init.type, TensorType):
                raise SpecError(f"the carry '{c.name.text}' starts from a scalar: give its type", c.span,
                                f"{c.name.text}: f32[...] = {snippet(c.init.span)}")
            return c.name, init.type, init, None
        dtype = self.dtype(c.dtype)
        dims = tuple(self._carry_dim(d) for d in (c.dims or ()))
        ty = TensorType(dtype, dims)
        if init in self.consts and not isinstance(self.consts[init], bool) or isinstance(init.type, ScalarType):
            if init not in self.consts:
                raise SpecError(f"the carry '{c.name.text}' starts from the scalar {snippet(c.init.span)}, which is "
                                f"not a literal", c.init.span, "start from a literal (= 0.0) or a tensor of the carry's type")
            value = self.consts[init]
            return c.name, ty, None, float(value) if dtype.is_float else int(value)
        if init.type != ty:
            raise SpecError(f"the carry '{c.name.text}' is declared {ty}, but its first value is {init.type}",
                            c.init.span, "cast or reshape the first value, or declare the carry with its type")
        return c.name, ty, init, None

    def _carry_dim(self, d: A.DimDecl) -> Dim:
        if isinstance(d.value, int):
            return d.value
        if isinstance(d.value, str):
            return self.static_dim(A.Name(d.span, d.value))
        return self.static_dim(d.value)

    # -- the body's reads ------------------------------------------------------------------------
    def step_slice(self, e: A.Index) -> Value | None:
        """``x[..., t, ...]`` in a scan's body, t the step index in one position: x's axis there
        at the current step (a value of the body), then the other items applied to it. None when
        the index is not a step slice."""
        scope = self.scan_scope
        if scope is None:
            return None
        pos = [i for i, it in enumerate(e.items) if isinstance(it, A.Name) and it.id == scope.index
               and self.env.get(it.id, (None,))[0] is scope.index_value]
        if not pos:
            return None
        if len(pos) > 1:
            raise SpecError(f"the step index '{scope.index}' indexes two axes", e.items[pos[1]].span,
                            "a step reads one position of one axis")
        v = self.value(e.value)
        if not isinstance(v.type, TensorType):
            raise SpecError(f"cannot index the scalar {v.type}", e.value.span)
        items = list(e.items)
        k = pos[0]
        if any(isinstance(it, (A.EllipsisItem,)) or isinstance(it, A.Name) and it.id == "None" for it in items[:k]) \
                or self.is_tensor_index(items[0]) and k > 0:
            raise SpecError(f"the step index '{scope.index}' must come after plain slices (x[t], x[:, t])",
                            e.items[k].span, "index the step first, then the other axes: x[:, t][..., 0]")
        for it in items[:k]:
            if not (isinstance(it, A.SliceItem) and it.start is None and it.stop is None and it.step is None):
                raise SpecError(f"the step index '{scope.index}' must come after whole slices (':')", it.span,
                                "index the step first, then slice the result")
        if k >= v.type.rank:
            raise SpecError(f"too many indices for a tensor of rank {v.type.rank}", e.items[k].span, f"the tensor is {v.type}")
        if v.type.shape[k] != scope.length:
            raise SpecError(f"the step index '{scope.index}' indexes an axis of size {v.type.shape[k]}, but the scan "
                            f"runs over {scope.length}", e.items[k].span,
                            f"scan over the axis's size, or slice it to {scope.length} first")
        key = (v, k)
        if v in scope.carries or v in {o for nd in self.nodes for o in nd.outputs}:
            raise SpecError(f"the step index '{scope.index}' can index values defined before the scan, not "
                            f"'{snippet(e.value.span)}', which the body computes", e.value.span,
                            "compute it before the scan over every step, then index it with the step")
        s = scope.slices.get(key)
        if s is None:
            shape = tuple(d for a, d in enumerate(v.type.shape) if a != k)
            s = scope.slices[key] = Value(TensorType(v.type.dtype, shape), f"{v.name or 'x'}_t")
        rest = items[:k] + items[k + 1:]
        if not rest:
            return s
        return self.index_items(s, rest, e)

    def step_index_value(self, e: A.Name) -> Value:
        """The step index used as a value (``t``, ``t + 1``, ``arange(S) <= t``)."""
        self.scan_scope.index_used = True
        return self.scan_scope.index_value


def shape_text(t) -> str:
    return format_shape(t.shape) if isinstance(t, TensorType) else str(t)
