"""Executing a plan: allocate buffers, evaluate host scalars, choose each step's kernel by its
guard and a configuration, and launch. Everything here is host work around the kernels.

A call runs from a launch record (runtime/records.py): everything the plan's symbolic sizes,
guards, host scalars and configurations decide for one set of bound sizes, input strides and
dtypes, evaluated once (``PlanRunner.record``) and then reused; ``PlanRunner.execute`` runs a
record: it allocates the chosen alternatives' buffers only and launches each kernel with its
precomputed arguments, grid and configuration, through ``PlanRunner.launcher`` (which
``opforge bench --host`` swaps for a stub to time the host work alone).
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
from typing import Any, Mapping

import torch

from ..ir import registry
from ..ir.dims import evaluate
from ..ir.tile import TIMED_GUARDS, Launch, Plan, atomic_buffers
from ..ir.torch_dtypes import RefCtx, to_torch
from ..passes.fusion import FusedGraph
from . import env
from .binding import CallError
from .cache import KernelCache
from .autotune import native_prune_enabled
from .config import Config, heuristic_config, interpreter_config
from .device import interpreting
from .indexing import forced, inputs_need_index64, plan_extents, sizes_need_index64
from .loader import load_kernel
from .records import MAX_RECORDS, KernelCall, LaunchRecord, contiguous_strides, generic_replay

GRID_AXIS_LIMIT = (2 ** 31 - 1, 65535, 65535)


class PlanRunner:
    def __init__(self, plan: Plan, fused: FusedGraph, cache: KernelCache, tuner=None, wrap=None):
        self.plan = plan
        self.fused = fused
        self.cache = cache
        # runtime/autotune.Autotuner on a GPU, or None; or a function making it at first use
        # (making it decides whether kernels are interpreted: that imports Triton)
        self._tuner = tuner
        self.wrap = wrap            # torch.library.wrap_triton under triton_op registration
        self._fns: dict[str, tuple[Any, Any]] = {}
        self._wide_sizes: dict = {}
        self._wide: dict[str, Any] = {}      # kernel name -> its int64-indexed variant
        self.records: dict[tuple, LaunchRecord] = {}   # call key -> launch record (CompiledOp.run)
        self.launcher = self._first_launch     # the launch step, chosen at the first launch

    @functools.cached_property
    def extents(self):
        """The element counts whose indices a call computes (runtime/indexing.py), once."""
        return plan_extents(self.plan, self.fused.graph)

    def _first_launch(self, call, args) -> None:
        # choosing the launch step decides whether kernels are interpreted (importing Triton):
        # at the first launch, not when the op is compiled
        self.launcher = default_launcher(self.wrap)
        self.launcher(call, args)

    @property
    def tuner(self):
        if isinstance(self._tuner, functools.partial):
            self._tuner = self._tuner()
        return self._tuner

    @tuner.setter
    def tuner(self, value):
        self._tuner = value

    def needs_index64(self, values: Mapping[str, Any], bindings: Mapping[str, int]) -> bool:
        """Could some offset of this call reach 2**31 (then the kernels' wide variants run)?"""
        key = tuple(bindings.items())
        sized = self._wide_sizes.get(key)
        if sized is None:
            sized = self._wide_sizes[key] = sizes_need_index64(self.extents, bindings)
        return sized or forced() or inputs_need_index64(values)

    def kernels_of(self, launch: Launch, wide: bool):
        if not wide:
            return launch.kernels
        missing = [k.name for k in launch.kernels if k.name not in self._wide]
        if missing:
            from ..passes.plan import wide_kernels
            self._wide.update(wide_kernels(self.fused, launch.group))
        return tuple(self._wide[k.name] for k in launch.kernels)

    def kernel(self, launch: Launch):
        name = launch.kernel.name
        if name not in self._fns:
            self._fns[name] = load_kernel(launch.kernel, self.cache)
        return self._fns[name]

    def load_all(self) -> None:
        for step in self.plan.steps:
            for lnch in step:
                for k in lnch.kernels:
                    self.kernel(Launch(k))

    def config(self, launch: Launch, bindings: Mapping[str, int], args, buffers=None) -> Config:
        if interpreting():
            return interpreter_config(launch.kernel, bindings)
        if self.tuner is not None:
            fn, entry = self.kernel(launch)
            zeroed = [buffers[b] for b in atomic_buffers(launch.kernel)] if buffers else []

            def reset():
                for t in zeroed:
                    t.zero_()
            cfg = self.tuner.choose(launch, fn, entry, bindings, args, self.grid, reset if zeroed else None)
            reset()   # timing runs added into the atomically written buffers
            return cfg
        cfg = heuristic_config(launch.kernel, bindings, _device_limits())
        if not native_prune_enabled():
            return cfg
        # where ptxas would spill at its own register choice, the budget that avoids it
        from .register_budget import budgeted
        return budgeted(launch.kernel, cfg, self.plan.buffers, bindings, self.cache)

    # -- one call ------------------------------------------------------------------------------
    def __call__(self, values: Mapping[str, Any], bindings: Mapping[str, int], device: torch.device) -> list:
        """Run the plan on ``values`` (by parameter name), already checked, at ``bindings``."""
        rec = self.record(values, bindings, device)
        out = self.execute(rec, [values[name] for name in self.plan.inputs])
        return list(out) if rec.tuple_result else [out]

    def remember(self, key, rec: LaunchRecord) -> None:
        """Keep a record for later calls with the same key (the oldest goes past MAX_RECORDS)."""
        if len(self.records) >= MAX_RECORDS:
            del self.records[next(iter(self.records))]
        self.records[key] = rec

    def execute(self, rec: LaunchRecord, args) -> Any:
        """Run a record: ``args`` in parameter order (tensors and scalars)."""
        return rec.replay(args)

    def record(self, values: Mapping[str, Any], bindings: Mapping[str, int], device: torch.device) -> LaunchRecord:
        """Everything one call decides from its sizes, strides and dtypes: the int64-index choice,
        host scalars, each step's alternative, each kernel's configuration, grid and arguments,
        and the shapes of the buffers the chosen kernels use. Values must be checked already."""
        plan = self.plan
        wide = self.needs_index64(values, bindings)
        scalars = self.host_scalars(values, bindings)
        shapes = {name: tuple(evaluate(d, bindings) for d in buf.shape)
                  for name, buf in plan.buffers.items() if buf.kind != "input"}
        # the autotuner times candidates on real buffers: those of every alternative it tries,
        # allocated for this first call only; without it (the interpreter, OPFORGE_AUTOTUNE=0)
        # nothing is allocated here
        tuning = TuningBuffers(plan, values, shapes, device)
        chosen = [self.choose_launch(step, bindings, tuning, scalars, wide) for step in plan.steps]
        kernels = [(lnch, k) for lnch in chosen for k in self.kernels_of(lnch, wide)]
        slots = {name: i for i, name in enumerate(plan.inputs)}
        allocs = []
        used = [p.buffer for _, k in kernels for p in k.params if p.kind == "ptr"] + list(plan.outputs)
        for name in dict.fromkeys(used):
            if name not in slots:
                buf = plan.buffers[name]
                slots[name] = len(slots)
                allocs.append((shapes[name], to_torch(buf.dtype), device, buf.zeroed))
        strides = {name: contiguous_strides(shape) for name, shape in shapes.items() if name in slots}
        calls = []
        for lnch, kernel in kernels:
            one = lnch if kernel is lnch.kernel else Launch(kernel, lnch.group)
            template, ptrs = [], []
            for pos, p in enumerate(kernel.params):
                if p.kind == "ptr":
                    template.append(None)
                    ptrs.append((pos, slots[p.buffer]))
                elif p.kind == "stride":
                    src = values.get(p.buffer) if plan.buffers[p.buffer].kind == "input" else None
                    template.append(src.stride(p.axis) if src is not None else strides[p.buffer][p.axis])
                elif p.kind == "size":
                    template.append(evaluate(p.dim, bindings))
                else:
                    template.append(scalars[p.buffer])
            args = None
            if self.tuner is not None and not interpreting():
                args = kernel_args(one, tuning, scalars, bindings)
            call = self.kernel_call(one, bindings, args, tuning, template, tuple(ptrs))
            if call is not None:
                calls.append(call)
        rec = LaunchRecord(len(plan.inputs), tuple(allocs), tuple(calls), tuple(slots[name] for name in plan.outputs),
                           self.fused.graph.tuple_result or len(plan.outputs) != 1, wide,
                           tuple(lnch.kernels[0].name for lnch in chosen))
        return generic_replay(rec, self, sys.modules[__name__])

    def choose_launch(self, step, bindings, buffers, scalars, wide: bool = False) -> Launch:
        """The step's alternative: the first whose guard holds, or, autotuning on a GPU with
        several that hold (split-K or not, split-KV or not), the fastest of them, timed whole."""
        viable = [lnch for lnch in step if lnch.guard is None or lnch.guard.holds(bindings)]
        if len(viable) < 2 or self.tuner is None or interpreting() or viable[0].guard.rule not in TIMED_GUARDS:
            return viable[0] if viable else choose(step, bindings)
        _, entry = self.kernel(viable[0])

        def make_run(lnch: Launch):
            def run():
                for k in self.kernels_of(lnch, wide):
                    self.launch(k, lnch, buffers, scalars, bindings)
            return run
        return viable[self.tuner.choose_alternative(viable, entry, bindings, make_run)]

    def launch(self, kernel, launch: Launch, buffers, scalars, bindings) -> None:
        """One kernel, its arguments and grid evaluated from the sizes (the autotuner's timing
        runs and tests that run a plan step by step; calls go through records)."""
        one = launch if kernel is launch.kernel else Launch(kernel, launch.group)
        args = kernel_args(one, buffers, scalars, bindings)
        call = self.kernel_call(one, bindings, args, buffers, args, ())
        if call is not None:
            self.launcher(call, args)

    def kernel_call(self, one: Launch, bindings, args, buffers, template, ptrs) -> KernelCall | None:
        """The call of one kernel: its config (tuned on ``args`` where given), grid and launch
        options; None when the grid is empty (a size-0 axis)."""
        cfg = self.config(one, bindings, args, buffers)
        grid = self.grid(one, bindings, cfg)
        if 0 in grid:
            return None
        fn, _ = self.kernel(one)
        meta = cfg.launch_meta()
        return KernelCall(fn, grid, template, ptrs, meta, one.kernel.name, cfg)

    @staticmethod
    def grid(launch: Launch, bindings, cfg: Config) -> tuple[int, ...]:
        vals = cfg.as_dict()
        out = []
        for gd in launch.kernel.grid:
            n = 1
            for extent, block in gd.parts:
                e = vals[extent] if isinstance(extent, str) else evaluate(extent, bindings)
                n *= -(-e // vals[block]) if block else e
            out.append(n)
        for axis, (n, limit) in enumerate(zip(out, GRID_AXIS_LIMIT)):
            if n > limit:
                raise CallError(f"{launch.kernel.name}: grid axis {axis} would need {n} programs, "
                                f"over the limit of {limit}")
        return tuple(out)

    def host_scalars(self, values: Mapping[str, Any], bindings) -> dict[str, Any]:
        if not self.plan.scalars:
            return {}
        key = (tuple(sorted(bindings.items())),
               tuple((p.name, _hashable(values[p.name])) for p in self.fused.graph.scalar_params))
        return _host_scalars(self, key)


@functools.lru_cache(maxsize=1)
def _device_limits():
    from .autotune import Limits
    return Limits.of_device()


def poisoning() -> bool:
    return env.flag("OPFORGE_POISON")


def allocate(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Outputs and intermediates. With OPFORGE_POISON=1 (always on in tests) they start as NaN
    (or an unlikely integer), so an element no kernel writes shows up in the comparison."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if env.flag("OPFORGE_POISON"):
        if dtype.is_floating_point:
            t.fill_(float("nan"))
        elif dtype == torch.bool:
            t.fill_(True)
        else:
            t.fill_(-113 if dtype in (torch.int8,) else 113 if dtype == torch.uint8 else -1234567)
    return t


def zeros(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Buffers a kernel adds into (atomics)."""
    return torch.zeros(shape, dtype=dtype, device=device)


def default_launcher(wrap=None):
    """The launch step: ``launcher(call, args)`` runs ``call.fn`` on the grid with the
    arguments and configuration. Through the interpreter, numpy's warnings about padding lanes
    are silenced and bf16 problems named; under triton_op, ``wrap`` is torch's wrap_triton."""
    if interpreting():
        def launch(call: KernelCall, args) -> None:
            fn = wrap(call.fn) if wrap is not None else call.fn
            with quiet_padding(), interpreter_errors(call.name):
                fn[call.grid](*args, **call.meta)
    elif wrap is not None:
        def launch(call: KernelCall, args) -> None:
            wrap(call.fn)[call.grid](*args, **call.meta)
    else:
        def launch(call: KernelCall, args) -> None:
            call.fn[call.grid](*args, **call.meta)
    return launch


class TuningBuffers(dict):
    """The buffers of a call that the autotuner launches candidates on: inputs as given, the
    others allocated on first use (so only what the timed kernels touch is allocated)."""

    def __init__(self, plan: Plan, values: Mapping[str, Any], shapes: Mapping[str, tuple], device):
        super().__init__((name, values[name]) for name, buf in plan.buffers.items() if buf.kind == "input")
        self.plan, self.shapes, self.device = plan, shapes, device

    def __missing__(self, name: str) -> torch.Tensor:
        buf = self.plan.buffers[name]
        dtype = to_torch(buf.dtype)
        make = zeros if buf.zeroed else allocate
        t = make(self.shapes[name], dtype, self.device)
        self[name] = t
        return t


def quiet_padding():
    """The interpreter computes masked-off lanes too (1/sum of a padding row, exp of a large
    padding value); numpy's warnings about them say nothing about the results."""
    if interpreting():
        import numpy as np
        return np.errstate(all="ignore")
    return contextlib.nullcontext()


@contextlib.contextmanager
def interpreter_errors(kernel_name: str):
    """A bf16 operation the interpreter cannot run right (runtime/interpreter_patches.py)
    reaches the caller as a CallError that names the kernel, not as Triton's InterpreterError."""
    try:
        yield
    except Exception as e:
        if not interpreting():
            raise
        from .interpreter_patches import interpreter_cause
        cause = interpreter_cause(e)
        if cause is None:
            raise
        raise CallError(f"{kernel_name}: {cause}; bf16 cannot run correctly on the CPU here. Run it on a GPU, "
                        f"or compile it for f16 or f32 (dtype='f32')") from e


def _hashable(x):
    return x.item() if isinstance(x, torch.Tensor) else x


def _host_scalars(runner: PlanRunner, key) -> dict[str, Any]:
    bindings = dict(key[0])
    sv = dict(key[1])
    cache = runner.__dict__.setdefault("_scalar_cache", {})
    if key in cache:
        return cache[key]
    ctx = RefCtx(bindings=bindings)
    env = {}
    for p in runner.fused.graph.scalar_params:
        env[p.value] = ctx.tensor(sv[p.name], p.value.type.dtype)
    for n in runner.plan.host_nodes:
        prim = registry.get(n.op)
        outs = prim.reference(ctx, [env[v] for v in n.inputs], dict(n.attrs), [v.type for v in n.outputs],
                              [v.type for v in n.inputs])
        outs = [outs] if isinstance(outs, torch.Tensor) else outs
        env.update(zip(n.outputs, outs))
    out = {}
    for name, v in runner.plan.scalars.items():
        x = env[v]
        out[name] = float(x) if v.type.dtype.is_float else bool(x) if v.type.dtype.is_bool else int(x)
    if len(cache) > 256:
        cache.clear()
    cache[key] = out
    return out


def choose(step, bindings) -> Launch:
    for launch in step:
        if launch.guard is None or launch.guard.holds(bindings):
            return launch
    g = step[-1].guard
    sizes = ", ".join(f"{k}={v}" for k, v in bindings.items())
    raise CallError(f"{step[-1].kernel.name}: no kernel for these sizes ({sizes}): it needs {g} "
                    f"({step[-1].kernel.doc})")


def kernel_args(launch: Launch, buffers, scalars, bindings) -> list:
    args = []
    for p in launch.kernel.params:
        if p.kind == "ptr":
            args.append(buffers[p.buffer])
        elif p.kind == "stride":
            args.append(buffers[p.buffer].stride(p.axis))
        elif p.kind == "size":
            args.append(evaluate(p.dim, bindings))
        else:
            args.append(scalars[p.buffer])
    return args


