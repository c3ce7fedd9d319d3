"""Pass: derive an op's backward graph, and decide what the forward saves for it.

Pipeline position: on a kernel graph (after canonicalisation and the pattern rewrites, so fused
primitives such as flash attention differentiate by their own rules), before layouts and
fusion. Input: the graph and the parameters to differentiate (``wrt``). Output
(:class:`Derivative`): the forward graph, whose results are the op's results followed by the
values the backward reads from the forward pass, and the backward graph, whose parameters are
those values (forward inputs, forward results, saved intermediates), the forward's scalar
parameters and one cotangent per float result, and whose results are the gradients of ``wrt``
in order. Both are ordinary level-1 graphs: they go through fusion, lowering, codegen, the cache
and the autotuner like any op.

The reverse sweep visits nodes in reverse topological order; each primitive's rule
(``extra["vjp"]``, ir/vjp.py) gives its inputs' cotangents, summed where a value has several
uses; a value no cotangent reaches is a symbolic zero (never computed; a gradient that stays zero
is a ``fill``). Integer and bool values, and nodes that do not depend on ``wrt``, are skipped.

What the backward reads of the forward is saved or recomputed (SAVED below):
- saved: forward inputs and results (free: they exist anyway), and the results of contractions,
  fused primitives (attention), expert GEMMs, selections (top-k) and reductions (small: rstd,
  row maxima): the forward kernels that compute them store them from their epilogues;
- recomputed inside the backward kernels: pointwise chains, views and gathers (glue), softmax,
  cumsum, each from the saved values it needs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from ..ir import registry
from ..ir import vjp as V
from ..ir.emit import Emitter
from ..ir.graph import Graph, Node, Param, Value
from ..ir.registry import Kind
from ..ir.dims import Sym, free_symbols
from ..ir.types import TensorType

SAVED_KINDS = {Kind.CONTRACTION, Kind.FUSED, Kind.MOE, Kind.SELECTION}
SAVED_OPS = {"sum", "mean", "max", "min", "scatter_rows"}


@dataclass(frozen=True)
class Source:
    """Where a backward parameter comes from at run time: the forward's input ``index``
    ("input"), its result ``index`` ("result", real results first, then the saved ones)."""
    kind: str
    index: int


@dataclass(frozen=True)
class Derivative:
    forward: Graph
    backward: Graph
    n_results: int                       # the op's own results (the forward has more)
    wrt: tuple[str, ...]                 # the parameters differentiated, in order
    sources: tuple[Source | None, ...]   # per backward parameter; None for a cotangent
    cotangents: tuple[int, ...]          # the result each cotangent parameter belongs to
    saved_bytes: object = 0              # symbolic bytes the forward stores for the backward
    recomputed: tuple[str, ...] = ()     # the ops the backward recomputes


def saved_kind(n: Node) -> bool:
    prim = registry.get(n.op)
    return prim.kind in SAVED_KINDS or n.op in SAVED_OPS


def derive(g: Graph, wrt: Sequence[str]) -> Derivative:
    wrt = tuple(wrt)
    by_name = {p.name: p for p in g.params}
    seeds = [by_name[w].value for w in wrt]
    producer = g.producers()

    # values that depend on what is differentiated
    depends: set[Value] = set(v for v in seeds)
    for n in g.nodes:
        if any(x in depends for x in n.inputs):
            depends.update(o for o in n.outputs if V.differentiable(o))

    e = Emitter()
    e.producers = producer          # rules may look at how an input was made (matmul: w.T)
    ct: dict[Value, Value] = {}
    ct_params: list[Param] = []
    ct_of: list[int] = []
    for i, v in enumerate(g.outputs):
        if V.differentiable(v) and v in depends:
            p = Value(v.type, f"grad_{i}")
            ct_params.append(Param(f"grad_{i}", p))
            ct_of.append(i)
            ct[v] = V.add(e, ct.get(v), p)
    for n in reversed(g.nodes):
        cts = [ct.get(o) for o in n.outputs]
        if all(c is None for c in cts) or not any(x in depends for x in n.inputs):
            continue
        rule = registry.get(n.op).extra["vjp"]
        ins = rule(e, n, cts)
        for x, c in zip(n.inputs, ins):
            if c is not None and x in depends:
                ct[x] = V.add(e, ct.get(x), V.like(e, c, x))
    grads = []
    for w, v in zip(wrt, seeds):
        grads.append(ct[v] if v in ct else V.fill(e, v, 0.0))

    # -- what the backward reads of the forward: saved or recomputed --------------------------
    made = {o for n in e.nodes for o in n.outputs} | {p.value for p in ct_params}
    inputs = {p.value: i for i, p in enumerate(g.params)}
    results = {v: i for i, v in reversed(list(enumerate(g.outputs)))}
    saved: list[Value] = []
    recompute: list[Node] = []
    seen: set[Value] = set()

    def need(v: Value) -> None:
        if v in seen or v in made:
            return
        seen.add(v)
        n = producer.get(v)
        if v in inputs or v in results or n is None or saved_kind(n):
            saved.append(v)
            return
        if n in recompute:
            return
        for x in n.inputs:
            need(x)
        recompute.append(n)

    for n in e.nodes:
        for x in n.inputs:
            need(x)
    for v in grads:
        need(v)
    order = {n: i for i, n in enumerate(g.nodes)}
    recompute.sort(key=order.get)

    extra = [v for v in saved if v not in inputs and v not in results]
    fwd_outputs = tuple(g.outputs) + tuple(extra)
    forward = g.replace(name=f"{g.name}__fwd", outputs=fwd_outputs,
                        result_types=tuple(v.type for v in fwd_outputs), tuple_result=len(fwd_outputs) > 1)

    params: list[Param] = []
    sources: list[Source | None] = []
    names: set[str] = set()

    def unique(base: str) -> str:
        s, k = base, 1
        while s in names:
            s, k = f"{base}_{k}", k + 1
        names.add(s)
        return s

    for v in saved:
        if v in inputs:
            p = g.params[inputs[v]]
            params.append(Param(unique(p.name), v))
            sources.append(Source("input", inputs[v]))
        else:
            idx = results[v] if v in results else len(g.outputs) + extra.index(v)
            params.append(Param(unique("saved_" + re.sub(r"\W", "_", v.name or producer[v].op)), v))
            sources.append(Source("result", idx))
    # scalar parameters the recomputation needs are forward inputs like any other (above);
    # inputs that only bind sizes the backward uses (a sum's gradient expands to the summed
    # axis: its size comes from the input that had it); the cotangents come last
    bound = {str(d) for p in params + ct_params for d in p.value.type.shape
             if isinstance(d, Sym) and d.is_symbol()}
    needed = _symbols(tuple(recompute) + tuple(e.nodes), grads) - bound
    for i, p in enumerate(g.params):
        if not needed:
            break
        have = {str(d) for d in p.value.type.shape if isinstance(d, Sym) and d.is_symbol()} if p.is_tensor else set()
        if have & needed and p.value not in saved:
            params.append(Param(unique(p.name), p.value))
            sources.append(Source("input", i))
            needed -= have
    for i, p in enumerate(g.params):         # a size only a parameter of its own gives (3*F: F)
        if p.name in needed and p.name in g.size_params and p.value not in saved:
            params.append(Param(unique(p.name), p.value))
            sources.append(Source("input", i))
            needed.discard(p.name)
    for p in ct_params:
        params.append(Param(unique(p.name), p.value))
        sources.append(None)
    nodes = tuple(recompute) + tuple(e.nodes)
    # (a torch schema cannot return a tuple of one: single results are plain tensors)
    backward = Graph(f"{g.name}__bwd", tuple(params), nodes, tuple(grads), tuple(v.type for v in grads),
                     tuple_result=len(grads) > 1, span=g.span)
    from ..ir.dims import Dim
    total: Dim = 0
    for v in extra:
        total = total + _nbytes(v)
    return Derivative(forward, backward, len(g.outputs), wrt, tuple(sources), tuple(ct_of), total,
                      tuple(dict.fromkeys(n.op for n in recompute)))


def _symbols(nodes, values) -> set[str]:
    out: set[str] = set()

    def visit(x):
        if isinstance(x, (tuple, list)):
            for y in x:
                visit(y)
        else:
            out.update(free_symbols([x]) if not isinstance(x, (str, bool, float)) and x is not None else ())
    for n in nodes:
        for v in n.outputs + n.inputs:
            if isinstance(v.type, TensorType):
                visit(v.type.shape)
        for a in n.attrs.values():
            if not isinstance(a, (str, bool, float)) and a is not None and not hasattr(a, "is_float"):
                visit(a)
    for v in values:
        visit(v.type.shape)
    return out


def _nbytes(v: Value):
    n = v.type.dtype.itemsize
    if isinstance(v.type, TensorType):
        for d in v.type.shape:
            n = n * d
    return n


def differentiable_params(g: Graph, frozen=()) -> tuple[str, ...]:
    """The parameters an op can be differentiated by: float tensors that are not frozen
    (packed weights)."""
    return tuple(p.name for p in g.params if V.differentiable(p.value) and p.name not in frozen)
