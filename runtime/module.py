"""``opforge.compile``: a spec -> a module of compiled ops, each a registered torch op.

For each op: the canonical graph, its fusion groups, the level-2 plan and kernels (loaded
through the cache), and the torch.library registration. Calling ``mod.op(...)`` goes through the
torch dispatcher (so torch.compile sees the same op); the implementation checks the arguments
(dtype, device, rank, sizes and the symbol bindings) before any kernel is launched.

The first call with a given key (runtime/records.py: shapes, strides, dtypes and devices of the
tensors, the scalars' values) checks everything and builds a launch record; a later call with
the same key looks the record up and runs it: every check held for that key, so only the
caller's index tensors are checked again (their values are data, not part of the key).
"""
from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..ir.dims import evaluate
from ..ir.graph import Graph
from ..ir.types import TensorType
from ..ir.printer import print_graph
from ..passes.context import PassContext
from .binding import CallError, bind_args, bind_sizes, check_index_args, index_checks, output_shapes
from .cache import KernelCache
from .device import describe, interpreting, kernel_device
from . import env, sharding
from .library import register, register_composite, registration_mode
from .records import MISSING, call_function, call_key, plain_tensors

if TYPE_CHECKING:
    from ..passes.fusion import FusedGraph


class Explanation(str):
    """What ``explain()`` returns: the text itself, whose repr is the text, so a REPL shows it
    once and readable (not a quoted string with \\n), and ``print`` prints it."""

    def __repr__(self) -> str:
        return str(self)

    def _repr_pretty_(self, p, cycle) -> None:      # IPython
        p.text(str(self))

    def written_to(self, file) -> "Explanation":
        if file is not None:
            print(self, file=file)
        return self


_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_LOADING = threading.RLock()      # CompiledOp._load: one thread unpickles a warm op's plan


def kind_of(p):
    """What ``plain_kinds`` accepts for a parameter without the full check (binding.check_kind):
    the exact Python types, an integer parameter's range, and whether it is a tensor."""
    t = p.value.type
    if isinstance(t, TensorType):
        return _TENSOR_TYPES, None, True
    if t.dtype.is_float:
        return (float, int), None, False
    if t.dtype.is_bool:
        return (bool,), None, False
    from ..ir.types import INT_RANGES
    return (int,), INT_RANGES.get(t.dtype), False


PLAIN, PLAIN_GRAD = 1, 2


def plain_kinds(args, kinds) -> int:
    """0 unless every argument is of its parameter's plain kind (a torch.Tensor, a Python number
    of the right kind and range), so the call can go to the dispatcher as it is; anything else
    (NumPy numbers, 0-d tensors, a mistake) goes through bind_args, which converts or explains.
    PLAIN_GRAD where a tensor argument requires grad, PLAIN otherwise (one pass over them)."""
    grad = False
    for a, (types, bounds, is_tensor) in zip(args, kinds):
        if type(a) not in types:
            return 0
        if is_tensor:
            grad = grad or a.requires_grad
        elif bounds is not None and not bounds[0] <= a <= bounds[1]:
            return 0
    return PLAIN_GRAD if grad else PLAIN


class CompiledOp:
    def __init__(self, namespace: str, graph: Graph, fused: FusedGraph, cache: KernelCache, mode: str,
                 plan=None, *, derived: bool = False, frozen=(), preload: bool = True):
        """``derived``: a forward or backward op of another's gradients (registered plainly);
        ``frozen``: parameters never differentiated (packed weights); ``preload``: generate and
        load every kernel now (else at first use). ``fused`` may be a plan_cache.Deferred (a
        warm compile): the fusion groups, plan and runner are then unpickled at first use, and
        the kernels load at first use whatever ``preload`` says."""
        self.namespace = namespace
        self.name = graph.name
        self.graph = graph
        self.cache, self.mode = cache, mode
        self._variants: dict = {}
        self._warned = derived      # derived ops never warn (their op did)
        self.public = graph.name    # the name errors give (a derived op's is its op's)
        self.default_sizes: dict = {}      # the spec file's "# shapes:" sizes (explain's default)
        self.bound_weights: tuple = ()     # a packed variant's bound (packed) parameters
        self.variant_of: "CompiledOp | None" = None    # the op a bound layer's variant was made from
        self._records: dict = {}           # call key -> launch record (the runner's, once made)
        self._runner = None
        from .plan_cache import Deferred
        if isinstance(fused, Deferred):
            self._deferred = fused             # a warm compile: unpickled at first use (_load)
        else:
            self._deferred = None
            self._made(graph, fused, plan)
            if preload:
                self.runner.load_all()
        params = graph.params
        self._nparams = len(params)
        self._required = next((i for i, p in enumerate(params) if p.has_default), len(params))
        if any(not p.has_default for p in params[self._required:]):
            self._required = len(params)     # a default before a required parameter: no shortcut
        self._params = [(isinstance(p.value.type, TensorType), p.has_default, p.default) for p in params]
        self._kinds = [kind_of(p) for p in params]
        self._index64 = env.getter("OPFORGE_INDEX64")
        self.run = self.call_function()
        from .autograd import Gradients
        self.gradients = Gradients(self, lambda: self.fused.differentiated, frozen)
        if derived or not self.gradients.differentiable:
            self.torch_op = self.infer_op = register(namespace, graph, self, mode)
        else:
            # ns::op routes to ns::op__infer or to the forward that saves for the backward
            self.torch_op = register_composite(namespace, graph, self)
            self.infer_op = register(namespace, graph.replace(name=f"{graph.name}__infer"), self, mode)
        self._overload = self.torch_op.default      # a little cheaper than the packet
        self._infer = self.infer_op.default

    def _made(self, graph: Graph, fused: FusedGraph, plan) -> None:
        from .executor import PlanRunner
        if plan is None:
            from ..passes.plan import build_plan
            plan = build_plan(fused)
        self.graph, self._fused, self._plan = graph, fused, plan
        wrap = torch.library.wrap_triton if self.mode == "triton_op" else None
        self._runner = PlanRunner(plan, fused, self.cache, tuner=functools.partial(_tuner, self.cache), wrap=wrap)
        self._runner.records = self._records

    def _load(self) -> None:
        """The fusion groups, plan and runner of an op from a warm compile, at first use: a
        compile that registers six ops but calls one unpickles one (runtime/plan_cache.py).
        Under a lock: threads making their first calls at once load it once; a load that fails
        leaves the op as it was (the next use tries again and raises the same error)."""
        with _LOADING:
            if self._runner is None:
                self._made(*self._deferred.load())
                self._deferred = None

    @property
    def fused(self) -> "FusedGraph":
        if self._runner is None:
            self._load()
        return self._fused

    @property
    def plan(self):
        if self._runner is None:
            self._load()
        return self._plan

    @property
    def runner(self):
        if self._runner is None:
            self._load()
        return self._runner

    def derived(self, g: Graph, name: str) -> "CompiledOp":
        """A graph derived from this op (its forward that saves for the backward, or its
        backward), compiled through the same pipeline and registered as ``ns::name``."""
        from ..passes.canonicalize import canonicalize
        from ..passes.context import PassContext
        from ..passes.pipeline import kernel_graph, run_passes
        from ..passes.plan import fuse_and_plan
        g = run_passes(g.replace(name=name), [canonicalize], PassContext())
        fused, plan = fuse_and_plan(kernel_graph(g))
        op = CompiledOp(self.namespace, g, fused, self.cache, self.mode, plan, derived=True)
        op.public, op.variant_of = self.public, self.variant_of
        return op

    # -- calling -------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        """Through the torch dispatcher (what torch.compile sees); the argument count and names
        are checked first so a mistake is an opforge.CallError, not a schema error."""
        kind = plain_kinds(args, self._kinds) if not kwargs and self._required <= len(args) <= self._nparams else 0
        if kind:
            full = args
        else:
            try:
                values = bind_args(self.graph, args, kwargs)
            except CallError as e:
                raise self._public_error(e) from None
            full = [values[p.name] for p in self.graph.params]
            if sharding.pending() and any(map(sharding.is_dtensor, full)):
                sharding.register()      # DTensor loaded after the op was compiled
        if self._infer is not self._overload and (kind == PLAIN or not self.gradients.wanted(full)):
            return self._infer(*full)      # no gradient wanted: the plain forward, one dispatch
        return self._overload(*full)

    def call_function(self):
        """A function running a call of this op from its records (records.call_function); the
        torch op's implementation is one, ``run`` another (a direct call, no dispatcher)."""
        return call_function(self.name, self._params, self.call_state())

    def call_state(self) -> dict:
        """What ``run`` reads at each call (its globals): the runner's records, this op's
        first_run, the index check and the OPFORGE_INDEX64 switch."""
        return {"records": self._records, "first_run": self.first_run, "check_indices": check_index_args,
                "index64": self._index64}

    def _bind(self, args):
        try:
            values = bind_args(self.graph, args, {})
            tensors = [v for v in values.values() if isinstance(v, torch.Tensor)]
            device = tensors[0].device if tensors else kernel_device()
            bindings = bind_sizes(self.graph, values, device=device)
        except CallError as e:
            raise self._public_error(e) from None
        return values, bindings, device

    def _public_error(self, e: CallError) -> CallError:
        """A derived op (the forward that saves, the backward) or a binding of a dtype-generic
        op checks the user's arguments: the error names the user's op, not ``op__fwd_11`` or
        ``rms_norm__f16``."""
        if self.public == self.name:
            return e
        return CallError(str(e).replace(f"{self.name}()", f"{self.public}()", 1))

    def first_run(self, args):
        """A call whose key has no record yet (``self.run`` hands it here): every check, then
        the record, then the run."""
        for i, a in enumerate(args):
            if a is MISSING:            # a required argument not given (bind_args names it)
                args = args[:i]
                break
        values, bindings, device = self._bind(args)
        if not self._warned and any(p.layout is not None for p in self.graph.params):
            import warnings
            self._warned = True
            names = ", ".join(f"'{p.name}' {p.layout}" for p in self.graph.params if p.layout is not None)
            warnings.warn(f"{self.name}: {names} passed dense, so it runs dense; bind the weights once to use "
                          f"the layout: layer = mod.{self.name}.bind({', '.join(p.name + '=...' for p in self.graph.params if p.layout is not None)})",
                          stacklevel=3)
        want = kernel_device()
        if device.type != want.type:
            raise CallError(f"{self.name}(): the inputs are on {device}, but the kernels run on {want.type} here "
                            f"({describe()}); move them with .to('{want.type}')")
        if interpreting():
            self._check_interpreter_dtypes()
        names = [p.name for p in self.graph.params]
        args = [values[n] for n in names]
        checks = index_checks(self.graph, bindings)
        check_index_args(self.name, checks, args)
        rec = self.runner.record(values, bindings, device)
        rec.index_checks = checks
        if plain_tensors(args):
            self.runner.remember(call_key(args, self._params, self._index64), rec)
        return rec.replay(args)

    def _check_interpreter_dtypes(self) -> None:
        """bf16 runs under the interpreter only with opforge's corrections in place
        (runtime/interpreter_patches.py); without them it would return wrong numbers."""
        from ..ir.types import DType
        from .interpreter_patches import bf16_problem
        from .tolerances import graph_dtypes
        if DType.bf16 in graph_dtypes(self.fused.graph) and (problem := bf16_problem()):
            raise CallError(f"{self.name}(): bf16 cannot run correctly on the CPU here: {problem}. "
                            f"Run it on a GPU, or compile it for f16 or f32 (dtype='f32')")

    def fake(self, *args):
        values, bindings, device = self._bind(args)
        from ..ir.torch_dtypes import to_torch
        outs = [torch.empty(s, dtype=to_torch(t.dtype), device=device)
                for s, t in zip(output_shapes(self.graph, bindings), self.graph.result_types)]
        return tuple(outs) if self.graph.tuple_result else outs[0]

    # -- packed weights ------------------------------------------------------------------------
    def bind(self, calibration=None, **weights):
        """Pack the given weights once (their layouts, or @auto's choice) and return a
        torch.nn.Module holding them, called with the remaining inputs."""
        from .bound import bind
        return bind(self, calibration, **weights)

    def packed_variant(self, chosen: dict, sizes: dict | None = None, shapes: dict | None = None,
                       bound: tuple = ()) -> "CompiledOp":
        """This op compiled for the given packed layouts, specialised to the bound weights'
        sizes and the packed tensors' shapes (compiled once per distinct choice)."""
        if not chosen and not sizes:
            return self
        sizes, shapes = sizes or {}, shapes or {}
        key = (tuple(sorted((k, str(v)) for k, v in chosen.items())), tuple(sorted(sizes.items())),
               tuple(sorted((k, tuple(v)) for k, v in shapes.items())), tuple(sorted(bound)))
        if key not in self._variants:
            from ..passes.layouts import apply_layouts
            from ..passes.specialize import specialize
            g = apply_layouts(specialize(self.graph, sizes), chosen, shapes)
            # bound weights are packed (or kept dense by @auto): no annotation remains to warn about
            from ..ir.graph import Param
            g = g.replace(params=tuple(Param(p.name, p.value, p.default, p.has_default,
                                             None if p.name in bound else p.layout, p.span) for p in g.params))
            if not chosen:
                g = g.replace(name=f"{g.name}__bound")
            g = canonical_graph_of(g.replace(name=f"{g.name}_{_digest(key)}"))
            from ..passes.pipeline import kernel_graph
            from ..passes.plan import fuse_and_plan
            fused, plan = fuse_and_plan(kernel_graph(g))
            # the packed tensors (``w_q``, ``w_scale``, ...) are frozen: never differentiated, and a
            # gradient asked of one is a CallError; dense bound weights stay differentiable
            packed = tuple(k for k in shapes if k not in bound)
            variant = self._variants[key] = CompiledOp(self.namespace, g, fused, self.cache, self.mode, plan,
                                                       frozen=packed)
            variant.default_sizes = self.default_sizes
            variant.public = self.public    # call errors name the user's op, not the variant
            variant.bound_weights = tuple(shapes)
            variant.variant_of = self
        return self._variants[key]

    # -- looking inside ------------------------------------------------------------------------
    @property
    def kernel_count(self) -> int:
        return len(self.plan.steps)

    def stage_text(self, stage: str) -> str:
        if stage == "graph":
            return print_graph(self.graph)
        if stage == "fused":
            from ..passes.cost import report
            from ..passes.fusion import print_fused
            return f"{print_fused(self.fused)}\n{report(self.fused, self.graph)}"
        if stage == "tile":
            from ..ir.tile_printer import print_plan
            return print_plan(self.plan)
        if stage == "triton":
            from ..codegen.triton import render_module
            return render_module(self.plan.kernels)
        raise ValueError(f"unknown stage {stage!r}")

    def explain(self, file=None, sizes: dict | None = None, target: str | None = None) -> "Explanation":
        """Every stage of this op as text: the graph, the fusion groups and bytes moved, the
        level-2 plan, the Triton source, and the bytes each kernel requests from global memory
        at ``sizes`` (default: the spec file's ``# shapes:`` line, where it gives them all;
        runtime/traffic.py); with ``target`` (sm_80, sm_89, sm_90a) also the resources of each
        kernel compiled natively for that GPU at ``sizes``. Returned, not printed (a REPL shows it once, as text);
        ``print(op.explain())`` prints it; ``explain(file=f)`` also writes it to f."""
        parts = [f"== {self.namespace}::{self.name} on {describe()} =="]
        for stage in ("graph", "fused", "tile", "triton"):
            parts.append(f"== {stage} ==\n{self.stage_text(stage)}")
        parts.append(f"== bytes requested ==\n{self.traffic_text(sizes)}")
        from ..passes.mask_range import attention_text
        attn = attention_text(self.fused, sizes if sizes is not None else self.default_sizes)
        if attn is not None:
            parts.append(f"== attention ==\n{attn}")
        parts.append(f"== gradient ==\n{self.gradient_text(sizes if sizes is not None else self.default_sizes)}")
        parts.append(f"== sharding (DTensor) ==\n{self.sharding_text()}")
        if target is not None:
            parts.append(self.resources_text(target, sizes or self.default_sizes))
        return Explanation("\n\n".join(parts)).written_to(file)

    def sharding_text(self) -> str:
        """What splitting each size symbol across ranks does (passes/sharding.py), for this op
        and for its backward with respect to every differentiable input."""
        lines = [sharding.rule_of(self).text()]
        grads = self.gradients
        if grads.differentiable:
            try:
                var = grads.variant((True,) * len(grads.params))
            except CallError:
                return lines[0]
            lines.append("backward:")
            lines += ["  " + x for x in sharding.rule_of(var.backward).text().splitlines()]
        return "\n".join(lines)

    def gradient_text(self, sizes: dict | None = None) -> str:
        """The backward with respect to every differentiable input: what the forward saves for
        it (each value's type, and the bytes at ``sizes`` where they are all given), what the
        backward recomputes, and its fused groups and kernels."""
        grads = self.gradients
        if not grads.differentiable:
            return "no gradient: no float tensor input that is not a packed weight, or no float result"
        try:
            var = grads.variant((True,) * len(grads.params))
        except CallError as e:
            return str(e)
        d = var.derivative
        lines = [f"with respect to {', '.join(d.wrt)}"]
        extra = d.forward.outputs[d.n_results:]
        sizes = sizes or {}
        if extra:
            known = all(s in sizes for s in self.graph.symbols)
            at = f" ({evaluate(d.saved_bytes, sizes):,} B at {', '.join(f'{k}={v}' for k, v in sizes.items())})" \
                if known else ""
            lines.append(f"saved by the forward's kernels, besides its inputs and results{at}: "
                         + ", ".join(f"{v.name or 'v'}: {v.type}" for v in extra))
        else:
            lines.append("saved: nothing besides the inputs and results")
        read = [p.name for p, src in zip(d.backward.params, d.sources) if src is not None]
        lines.append(f"the backward reads: {', '.join(read)} and the incoming gradients")
        lines.append(f"recomputed in the backward's kernels: {', '.join(d.recomputed) or 'nothing'}")
        launched = sum(len(step[0].kernels) for step in var.backward.plan.steps)
        lines.append(f"forward that saves: {var.forward.kernel_count} kernel(s); backward: {launched} "
                     f"kernel(s) launched")
        from ..passes.fusion import print_fused
        lines.append(print_fused(var.backward.fused))
        return "\n".join(lines)

    def resources_text(self, target: str, sizes: dict) -> str:
        """The resource table of this op's kernels on ``target`` at ``sizes`` (runtime/native.py):
        the heuristic config of each kernel and a summary of the autotuner's candidates."""
        from .check_report import plain_table, problems_of, rows_of
        from .native import NativeCompiler
        from .sweep import op_cases
        from .targets import target as target_of
        tgt = target_of(target)
        missing = [s for s in self.graph.symbols if s not in sizes]
        if missing:
            raise CallError(f"{self.name}.explain(target=...): give the sizes {', '.join(missing)} "
                            f"(sizes={{{', '.join(repr(s) + ': ...' for s in self.graph.symbols)}}})")
        from .sizes import size_bindings
        cases = op_cases(self, {k: int(v) for k, v in size_bindings(self.graph, sizes).items()}, [tgt])
        results = NativeCompiler(self.cache).compile([c.job for c in cases])
        at = ", ".join(f"{s}={sizes[s]}" for s in self.graph.symbols)
        lines = [f"== resources on {tgt.name} ({tgt.product}, {tgt.shared_memory} B shared memory) at {at} ==",
                 plain_table(rows_of(cases, results))]
        from ..ir import fp8
        if fp8.native() != tgt.has_fp8 and any("float8e4nv" in c.job.source.read_text() for c in cases):
            lines.append(f"note: the fp8 kernels were lowered for this machine; {tgt.name} gets others "
                         f"(opforge show/check --target {tgt.name} compiles those)")
        lines += [f"problem: {p}" for p in problems_of(cases, results)]
        return "\n".join(lines)

    def traffic(self, sizes: dict, weights=None):
        """The static figures of merit at ``sizes`` (runtime/traffic.op_traffic)."""
        from .traffic import op_traffic
        from .sizes import size_bindings
        return op_traffic(self, {k: int(v) for k, v in size_bindings(self.graph, sizes).items()}, weights=weights)

    def traffic_text(self, sizes: dict | None = None, weights=None) -> str:
        from .traffic import format_traffic
        sizes = sizes if sizes is not None else self.default_sizes
        missing = [s for s in self.graph.symbols if s not in (sizes or {})]
        if missing:
            return (f"(no sizes for {', '.join(missing)}: pass explain(sizes={{...}}) to count the bytes each "
                    f"kernel requests)")
        return format_traffic(self.traffic(sizes, weights))

    def __repr__(self) -> str:
        if self._runner is None:        # printing a warm op does not load its plan
            return f"<opforge op {self.namespace}::{self.name}: plan stored, loaded at first use>"
        return f"<opforge op {self.namespace}::{self.name}: {self.kernel_count} kernel(s)>"


def _tuner(cache: KernelCache):
    """The autotuner on a GPU; None (the heuristic or interpreter choice) otherwise."""
    if interpreting():
        return None
    from .autotune import Autotuner, NativePrune, autotune_enabled, native_prune_enabled
    if not autotune_enabled():
        return None
    return Autotuner(cache, prune=NativePrune(cache) if native_prune_enabled() else None)


class CompiledModule:
    """The ops of one spec file, as attributes: ``mod.rms_norm(x, w)``."""

    def __init__(self, namespace: str, ops: dict[str, CompiledOp], source_name: str):
        self.namespace = namespace
        self.ops = ops
        self.source_name = source_name
        # ops as plain attributes: ``mod.op`` without a __getattr__ call on every use (a name
        # the module's own attributes take stays reachable through __getattr__'s error path)
        for name, op in ops.items():
            if name not in self.__dict__ and not hasattr(type(self), name):
                self.__dict__[name] = op

    def __getattr__(self, name: str) -> CompiledOp:
        ops = self.__dict__.get("ops", {})
        if name in ops:
            return ops[name]
        from ..frontend.diagnostics import did_you_mean
        hint = did_you_mean(name, ops)
        raise AttributeError(f"{self.__dict__.get('source_name')} has no op '{name}'" + (f"; {hint}" if hint else ""))

    def __dir__(self):
        return list(self.ops) + ["ops", "namespace", "explain"]

    def explain(self, file=None) -> "Explanation":
        """Every op's explain(), one after another."""
        return Explanation("\n\n".join(op.explain() for op in self.ops.values())).written_to(file)

    def __repr__(self) -> str:
        return f"<opforge module {self.namespace}: {', '.join(self.ops)}>"


def compile_module(path_or_source, namespace: str | None = None, *, dtype: str | None = None,
                   ops: list[str] | None = None, cache_dir: str | Path | None = None,
                   registration: str | None = None) -> CompiledModule:
    from ..frontend import load_source
    from . import plan_cache
    from .sizes import SHAPES_DIRECTIVE, parse_shapes
    source, default_ns = load_source(path_or_source)
    shapes: dict = {}
    for m in SHAPES_DIRECTIVE.finditer(source.text):
        shapes.update(parse_shapes(m.group(1)))
    cache = KernelCache(Path(cache_dir) if cache_dir else None)
    mode = registration_mode(registration)
    # a compile of the same text, options and opforge code before: its plans (runtime/plan_cache.py)
    key = plan_cache.key(source.text, source.name, namespace, dtype, ops) if plan_cache.enabled() else None
    stored = plan_cache.load(cache.root, key) if key is not None else None
    if stored is not None:
        ns, built, program = stored["namespace"], stored["ops"], stored.get("program")
    else:
        from ..frontend import get_op
        from ..frontend.build import build_program
        from ..frontend.parser import parse
        from ..passes.pipeline import kernel_graph, prepared_graph
        from ..passes.plan import fuse_and_plan
        program = build_program(parse(source), source, namespace or default_ns)
        ns, built = program.namespace, []
        ctx = PassContext(program=program)
        instances = {n for info in program.generics.values() for n in info.instances.values()}
        for name in ops or [n for n in program.graphs if n not in instances] + list(program.generics):
            if name in program.generics:
                continue         # compiled per binding at first use (runtime/generic.py)
            get_op(program, name)
            g = prepared_graph(program, name, dtype, ctx)
            from .scan import has_scan, plan_pieces
            if has_scan(g):
                from ..passes.scan_hoist import hoist_scans
                g = hoist_scans(g)                    # the carry-free GEMMs leave the loop
                built.append((name, g, None, plan_pieces(g)))     # runs as its pieces (runtime/scan.py)
                continue
            built.append((name, g, *fuse_and_plan(kernel_graph(g))))
        if not program.generics:
            program = None       # only generic ops need the program after this
    compiled: dict[str, Any] = {}
    for name, g, fused, plan in built:
        if fused is None:
            from .scan import ScanOp
            preload = stored is None
            compiled[name] = ScanOp(ns, g, plan, lambda pg, pf, pp: CompiledOp(ns, pg, pf, cache, mode, pp,
                                                                              preload=preload))
            compiled[name].default_sizes = shapes
            continue
        # from stored plans the kernels load at first use: their sources were made then
        compiled[name] = CompiledOp(ns, g, fused, cache, mode, plan, preload=stored is None)
        compiled[name].default_sizes = shapes
    if program is not None:
        from .generic import GenericOp
        ctx = PassContext(program=program)
        for name, info in program.generics.items():
            if ops and name not in ops:
                continue
            from ..ir.types import SPEC_DTYPES
            default = SPEC_DTYPES.get(dtype) if isinstance(dtype, str) else dtype
            compiled[name] = GenericOp(ns, info, program.graphs,
                                       functools.partial(_compile_instance, program, ctx, cache, mode, key), default)
            compiled[name].default_sizes = shapes
    if stored is None and key is not None:
        plan_cache.store(cache.root, key, {"namespace": ns, "ops": built, "program": program})
    from .export import remember
    remember(ns, source.text, source.name, dtype, list(compiled), registration)
    return CompiledModule(ns, compiled, source.name)


def _compile_instance(program, ctx, cache, mode, key: str | None, name: str) -> CompiledOp:
    """One binding of a dtype-generic op (runtime/generic.py), at its first use: from the plans
    stored by an earlier compile of the same file and options (``key``: the compile's plan key,
    None when plans are off), else through the whole pipeline, its plans then stored."""
    from . import plan_cache
    bkey = plan_cache.binding_key(key, name) if key is not None else None
    stored = plan_cache.load(cache.root, bkey) if bkey is not None else None
    if stored is not None:
        (_, g, deferred, _), = stored["ops"]
        return CompiledOp(program.namespace, g, deferred, cache, mode)
    from ..passes.pipeline import kernel_graph, prepared_graph
    from ..passes.plan import fuse_and_plan
    g = prepared_graph(program, name, None, ctx)
    fused, plan = fuse_and_plan(kernel_graph(g))
    if bkey is not None:
        plan_cache.store(cache.root, bkey, {"ops": [(name, g, fused, plan)]})
    return CompiledOp(program.namespace, g, fused, cache, mode, plan)


def _digest(key) -> str:
    import hashlib
    return hashlib.sha256(repr(key).encode()).hexdigest()[:8]


def canonical_graph_of(g: Graph) -> Graph:
    """Canonicalise a rewritten graph (layouts leave casts and reshapes to fold)."""
    from ..passes.canonicalize import canonicalize
    from ..passes.context import PassContext
    from ..passes.pipeline import run_passes
    return run_passes(g, [canonicalize], PassContext())
