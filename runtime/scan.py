"""Ops with a ``scan``: run as their pieces, the scans step by step.

An op whose graph holds scan nodes (ir/prims_scan.py) is split at them (``split_at_scans``):
the nodes between two scans form a *segment*, compiled as an ordinary op (fusion, kernels,
gradients, registration), and each scan's body is compiled as an op too. A call runs the
segments in order and, for each scan, the body op once per step with the carries passed from
step to step (``scan_steps``, the same loop the reference executor runs) and the steps' outputs
stacked. Every piece is a registered op with its gradients, so autograd differentiates through
the steps (backpropagation through time over the carries each step returned, which autograd
keeps) and ``torch.compile`` traces the loop into calls of the pieces' ops.

Each scan also gets the one-kernel lowering where its body allows (passes/lower_recurrence.py:
the carries on chip across all steps, one launch for the whole sequence): the scan alone is
compiled as an op of its own (``fused_scan_graph``), and a call that needs no gradient runs it
in place of the steps. A call that needs gradients (grad mode on and an argument that requires
them), or any call with OPFORGE_SCAN_STEPS=1, runs the body step by step: a step costs a launch
of the body's kernels, with the carries in memory between steps. Before splitting, the body's
carry-free matmuls (``x[t] @ w.T + b``) are hoisted into the piece before the scan
(passes/scan_hoist.py): one GEMM over all steps. Not built yet (the recurrences issue): a
fused backward through the steps.
``explain()`` says which class a scan is (passes/scan_class.py) and how it runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..ir.dims import evaluate
from ..ir.graph import Graph, Node, Param, Value, unique_param_names
from ..ir.prims_scan import scan_steps
from ..ir.torch_dtypes import to_torch
from ..ir.types import DType, ScalarType, TensorType
from .env import flag
from .binding import CallError, bind_args, bind_sizes

SOURCES = ("const", "dim")         # nodes without operands, made again in each piece that reads them
BINDINGS_KEPT = 64                 # the size bindings a ScanOp keeps, by its calls' shapes


def has_scan(g: Graph) -> bool:
    return any(n.op == "scan" for n in g.nodes)


def compiled_parts(op) -> list:
    """The CompiledOps an op runs: a ScanOp's pieces, else the op itself (for tools that read
    plans and kernels: check, the native sweep)."""
    return op.parts if isinstance(op, ScanOp) else [op]


@dataclass
class Segment:
    graph: Graph
    inputs: list          # the top-level values it reads, in its parameters' order
    outputs: list         # the top-level values it gives, in its results' order
    op: Any = None        # its CompiledOp
    sizes: tuple = ()     # size symbols passed as trailing integer arguments (with_sizes)


@dataclass
class ScanPiece:
    node: Node
    op: Any = None        # the body's CompiledOp
    sizes: tuple = ()
    fused: Any = None     # the scan's one-kernel CompiledOp (passes/lower_recurrence.py), or None
    fused_inputs: tuple = ()  # its operands: the scan's inputs, each once (fused_scan_graph)
    fused_sizes: tuple = ()
    why_not_fused: str = ""   # where fused is None: the reason the template gave

    @property
    def fused_forms(self) -> list:
        """(kernel, guard) of each form of the one kernel, in the order a call tries them (the
        guard None: any sizes)."""
        return [(lnch.kernel, lnch.guard) for lnch in self.fused.plan.steps[0]] if self.fused is not None else []

    def fused_fits(self, bindings) -> bool:
        return any(g is None or g.holds(bindings) for _, g in self.fused_forms)


def split_at_scans(g: Graph) -> list:
    """The op's pieces in order: Segments (the nodes between scans, as graphs of their own) and
    ScanPieces. A value a later piece or the op's results read leaves its segment as a result;
    literals and sizes used as values are made again where they are read."""
    sources = {n.out: n for n in g.nodes if n.op in SOURCES}
    runs: list = [[]]
    for n in g.nodes:
        if n.op in SOURCES:
            continue
        if n.op == "scan":
            runs.append(n)
            runs.append([])
        else:
            runs[-1].append(n)
    later_uses: list[set] = []
    used: set = set(g.outputs)
    for r in reversed(runs):
        later_uses.append(set(used))
        for n in ([r] if isinstance(r, Node) else r):
            used.update(n.inputs)
    later_uses.reverse()
    pieces: list = []
    for i, r in enumerate(runs):
        if isinstance(r, Node):
            pieces.append(ScanPiece(r))
            continue
        if not r:
            continue
        defined = {o for n in r for o in n.outputs}
        outputs = [o for n in r for o in n.outputs if o in later_uses[i]]
        if not outputs:
            continue
        inputs: list = []
        remade: list = []
        for n in r:
            for v in n.inputs:
                if v in defined or v in inputs or v in remade:
                    continue
                (remade if v in sources else inputs).append(v)
        fresh = {v: Value(v.type, v.name) for v in inputs + remade}
        nodes = [Node(sources[v].op, (), sources[v].attrs, (fresh[v],), sources[v].span) for v in remade]
        nodes += [Node(n.op, tuple(fresh.get(v, v) for v in n.inputs), n.attrs, n.outputs, n.span) for n in r]
        params = _params(g, inputs, fresh)
        seg = Graph(f"{g.name}__part{len(pieces)}", tuple(params), tuple(nodes), tuple(outputs),
                    tuple(o.type for o in outputs), len(outputs) > 1, g.span)
        pieces.append(Segment(seg, inputs, outputs))
    return pieces


def _params(g: Graph, inputs: list, fresh: dict) -> list[Param]:
    """A segment's parameters: the op's own where it reads one (name, default, layout kept),
    else named after the value."""
    by_value = {p.value: p for p in g.params}
    out = []
    for i, v in enumerate(inputs):
        p = by_value.get(v)
        out.append(Param(p.name, fresh[v], p.default, p.has_default, p.layout, p.span) if p is not None
                   else Param(v.name or f"v{i}", fresh[v]))
    return unique_param_names(out)


def unbound_sizes(g: Graph) -> tuple[str, ...]:
    """Size symbols a piece uses that no axis of its tensor parameters binds (a body reading
    ``arange(S)`` while its slices have lost the S axis): they become integer parameters used
    as sizes, which the op passes from its own bindings."""
    bound = {str(d) for p in g.tensor_params for d in p.value.type.shape if not isinstance(d, int) and d.is_symbol()}
    bound |= set(g.size_params)
    return tuple(s for s in g.used_symbols if s not in bound)


def with_sizes(g: Graph) -> Graph:
    extra = [Param(s, Value(ScalarType(DType.i64), s)) for s in unbound_sizes(g)]
    return g.replace(params=g.params + tuple(extra)) if extra else g


def piece_graphs(g: Graph) -> list[Graph]:
    """The graphs compiled for an op's pieces, in order: each segment's, each scan's body
    (named ``op__partK`` and ``op__scanK``), with the sizes they cannot bind as parameters."""
    out = []
    for k, p in enumerate(split_at_scans(g)):
        if isinstance(p, Segment):
            out.append(with_sizes(p.graph))
            continue
        body = p.node.attrs["body"]
        if has_scan(body):
            raise CallError(f"{g.name}: a scan inside the body of a scan (through a call) is not supported "
                            f"in this version")
        out.append(with_sizes(body.replace(name=f"{g.name}__scan{k}")))
    return out


def fused_scan_graph(g: Graph, node: Node, k: int, body: Graph) -> Graph:
    """The graph of one scan alone: its operands as parameters (the op's own names where it
    reads the op's parameters), the scan node with ``body`` (the canonical body), all its
    results; named ``op__scanK_fused``."""
    inputs = list(dict.fromkeys(node.inputs))
    fresh = {v: Value(v.type, v.name) for v in inputs}
    n = Node("scan", tuple(fresh[v] for v in node.inputs), node.attrs.replace(body=body), node.outputs, node.span)
    return with_sizes(Graph(f"{g.name}__scan{k}_fused", tuple(_params(g, inputs, fresh)), (n,), node.outputs,
                            tuple(o.type for o in node.outputs), True, g.span))


def plan_pieces(g: Graph) -> list[tuple]:
    """(graph, fused, plan) of each piece, through the pipeline from canonicalisation on (the
    op's calls, also in scan bodies, were inlined with it); a scan's entry has a fourth item, the
    (graph, fused, plan) of its one-kernel form, or the reason it has none. Stored with the op's
    plans."""
    from ..passes.context import PassContext
    from ..passes.lower_eval import LoweringError
    from ..passes.pipeline import GRAPH_PASSES, kernel_graph, run_passes
    from ..passes.plan import fuse_and_plan
    out = []
    passes = [p for p in GRAPH_PASSES if p.__name__ != "inline"]
    for k, (piece, part) in enumerate(zip(piece_graphs(g), split_at_scans(g))):
        piece = run_passes(piece, passes, PassContext())
        entry = (piece, *fuse_and_plan(kernel_graph(piece)))
        if isinstance(part, ScanPiece):
            body = part.node.attrs["body"]
            canonical = piece.replace(name=body.name, params=piece.params[:len(body.params)])
            one = fused_scan_graph(g, part.node, k, canonical)
            try:
                entry += ((one, *fuse_and_plan(kernel_graph(one))),)
            except LoweringError as e:
                entry += (str(e).split(": ", 1)[-1],)
            except Exception as e:       # the one-kernel form is optional: the steps stay correct
                entry += (f"the one-kernel form failed to build ({type(e).__name__}: {e}); please report it",)
        out.append(entry)
    return out


def _wants_grad(tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


@dataclass(frozen=True)
class ScanGradients:
    params: tuple

    @property
    def differentiable(self) -> bool:
        return bool(self.params)


class ScanOp:
    """A compiled op with scans (see the module's docstring): callable like a CompiledOp,
    registered as one composite op ``ns::name`` routing to its pieces' ops."""

    def __init__(self, namespace: str, graph: Graph, plans: list, make):
        """``plans``: ``plan_pieces(graph)``; ``make(g, fused, plan)``: a piece's CompiledOp."""
        from .library import register_composite
        self.namespace = namespace
        self.graph = graph
        self.name = self.public = graph.name
        self.default_sizes: dict = {}
        self.pieces = split_at_scans(graph)
        for p, entry in zip(self.pieces, plans, strict=True):
            g, fused, plan = entry[:3]
            p.op = make(g, fused, plan)
            n = len(p.graph.params) if isinstance(p, Segment) else len(p.node.attrs["body"].params)
            p.sizes = tuple(q.name for q in g.params[n:])     # sizes passed as arguments (with_sizes)
            if isinstance(p, ScanPiece):
                if isinstance(entry[3], str):
                    p.why_not_fused = entry[3]
                else:
                    fg, ff, fp = entry[3]
                    p.fused = make(fg, ff, fp)
                    p.fused_inputs = tuple(dict.fromkeys(p.node.inputs))
                    p.fused_sizes = tuple(q.name for q in fg.params[len(p.fused_inputs):])
        # literals and sizes used as values, read by the pieces (made once, not per call)
        self._sources = {n.out: n for n in graph.nodes if n.op in SOURCES}
        self._bindings: dict = {}
        self.torch_op = register_composite(namespace, graph, self, route="scan")

    # -- calling -------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return self.torch_op(*args, **kwargs)
        values = bind_args(self.graph, args, kwargs)
        return self.torch_op(*[values[p.name] for p in self.graph.params])

    def dispatch(self, args: list) -> Any:
        """The composite op's implementation: every argument positional."""
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        device = tensors[0].device if tensors else None
        # the sizes of a call, kept by its arguments' shapes, dtypes, devices and scalars (checked
        # once for each); not while tracing (shapes may be symbolic)
        tracing = torch.compiler.is_compiling()
        key = None if tracing else tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor)
                                         else (type(a), a) for a in args)
        try:
            known = self._bindings.get(key) if key is not None else None
        except TypeError:              # symbolic sizes (AOT tracing with SymInts): bound every call
            key = known = None
        if known is None:
            values = {p.name: a for p, a in zip(self.graph.params, args)}
            bindings = bind_sizes(self.graph, values, device=device)
            fits = {id(p): p.fused_fits(bindings) for p in self.pieces if isinstance(p, ScanPiece)}
            if key is not None and len(self._bindings) < BINDINGS_KEPT:
                self._bindings[key] = (bindings, fits)
        else:
            bindings, fits = known
        env: dict = {p.value: a for p, a in zip(self.graph.params, args)}

        def read(v: Value):
            if v in env:
                return env[v]
            n = self._sources[v]
            return n.attrs["value"] if n.op == "const" else evaluate(n.attrs["size"], bindings)

        def full(t, value):
            return torch.full([evaluate(d, bindings) for d in t.shape], value, dtype=to_torch(t.dtype), device=device)

        def stack(xs, t):
            if not xs:
                return torch.empty([0] + [evaluate(d, bindings) for d in t.shape], dtype=to_torch(t.dtype), device=device)
            return torch.stack(xs)
        for p in self.pieces:
            if isinstance(p, Segment):
                res = p.op(*[read(v) for v in p.inputs], *[bindings[s] for s in p.sizes])
                res = res if isinstance(res, tuple) else (res,)
                env.update(zip(p.outputs, res))
                continue

            if p.fused is not None and fits[id(p)] and not flag("OPFORGE_SCAN_STEPS") and not _wants_grad(tensors):
                res = p.fused(*[read(v) for v in p.fused_inputs], *[bindings[s] for s in p.fused_sizes])
                env.update(zip(p.node.outputs, res))
                continue

            def step(a, body=p.op):
                r = body(*a)
                return r if isinstance(r, tuple) else (r,)
            ins = [read(v) for v in p.node.inputs] + [bindings[s] for s in p.sizes]     # sizes after the closed-over values
            env.update(zip(p.node.outputs, scan_steps(p.node.attrs, ins, bindings, step, full, stack)))
        outs = tuple(read(v) for v in self.graph.outputs)
        return outs if self.graph.tuple_result else outs[0]

    # -- what tools ask of an op ---------------------------------------------------------------
    @property
    def gradients(self) -> "ScanGradients":
        """Which parameters get gradients: the float tensor parameters (autograd differentiates
        the pieces' ops through the steps; a packed weight stays frozen in its piece)."""
        return ScanGradients(tuple(p.name for p in self.graph.tensor_params if p.value.type.dtype.is_float))

    @property
    def parts(self) -> list:
        """The compiled pieces: the segments' ops, the scans' body ops and their one-kernel ops."""
        out = []
        for p in self.pieces:
            out.append(p.op)
            if isinstance(p, ScanPiece) and p.fused is not None:
                out.append(p.fused)
        return out

    @property
    def kernel_count(self) -> int:
        """The kernels a call without gradients launches, each counted once: the segments',
        and each scan's one kernel (or, where it has none, its body's, launched at every step)."""
        return sum(p.fused.kernel_count if isinstance(p, ScanPiece) and p.fused is not None else p.op.kernel_count
                   for p in self.pieces)

    @property
    def step_kernel_count(self) -> int:
        """The kernels a call with gradients launches, each counted once: the segments' and the
        scans' bodies' (launched at every step)."""
        return sum(p.op.kernel_count for p in self.pieces)

    def stage_text(self, stage: str) -> str:
        if stage == "graph":
            from ..ir.printer import print_graph
            return print_graph(self.graph)
        return "\n\n".join(f"# {op.name}\n{op.stage_text(stage)}" for op in self.parts)

    def scan_text(self) -> str:
        from ..passes.scan_class import classify
        lines = ["== scans =="]
        for p in self.pieces:
            if isinstance(p, ScanPiece):
                c = classify(p.node)
                a = p.node.attrs
                line = p.node.span.line if p.node.span is not None else "?"
                lines.append(f"scan at line {line} over {a['length']}{' (reverse)' if a['reverse'] else ''}: "
                             f"{c.kind} recurrence: {c.why}")
                hoisted = a.get("hoisted", ())
                if hoisted:
                    ops = ", ".join(f"{op} x{hoisted.count(op)}" if hoisted.count(op) > 1 else op
                                    for op in dict.fromkeys(hoisted))
                    lines.append(f"  hoisted out of the loop, run once over all steps before it: {ops} "
                                 f"(passes/scan_hoist.py)")
                else:
                    lines.append("  hoisted out of the loop: nothing (no carry-free matmul)")
                if p.fused is not None:
                    forms = p.fused_forms
                    lines.append(f"  without gradients: one kernel for all steps ({p.fused.name}):")
                    for kern, guard in forms:
                        what = "in chunks of BLOCK_C steps, the state on chip (passes/lower_chunked_scan.py)" \
                            if kern.family == "recurrence_chunked" else \
                            "step after step, the carries on chip (passes/lower_recurrence.py" + \
                            ("; a matmul's weight tile is read at every step)" if "matmul" in kern.doc else ")")
                        lines.append(f"    {kern.name}{f' while {guard}' if guard is not None else ''}: {what}")
                    bounded = all(g is not None for _, g in forms)
                    lines.append(f"  with gradients, with OPFORGE_SCAN_STEPS=1{' or past those sizes' if bounded else ''}: "
                                 f"step by step, each step launches the body's {p.op.kernel_count} kernel(s) "
                                 f"({p.op.name}), the carries in memory between steps")
                else:
                    lines.append(f"  runs step by step: each step launches the body's {p.op.kernel_count} kernel(s) "
                                 f"({p.op.name}), the carries in memory between steps")
                    lines.append(f"  no one-kernel form: {p.why_not_fused}")
                if c.kind == "linear" and not any(k.family == "recurrence_chunked" for k, _ in p.fused_forms):
                    from ..passes.lower_chunked_scan import outer_product_form
                    form = outer_product_form(p.node)
                    why = f" ({form})" if isinstance(form, str) else ""
                    lines.append(f"  no chunked form{why}: it takes h = a * h + k v^T read by sum(q * h), a = exp or sigmoid")
        return "\n".join(lines)

    def explain(self, file=None, **kwargs):
        from .module import Explanation
        text = [self.scan_text()]
        for op in self.parts:
            text.append(f"== piece {op.name} ==\n{op.explain(**kwargs)}")
        out = Explanation("\n\n".join(text))
        if file is not None:
            out.written_to(file)
        return out

    def bind(self, calibration=None, **weights):
        raise CallError(f"{self.name}(): binding weights of an op with a scan is not supported in this version; "
                        f"call it with the weights as arguments")

    def __repr__(self) -> str:
        return f"<opforge op {self.namespace}::{self.name}: {len(self.pieces)} pieces, scans run step by step>"
