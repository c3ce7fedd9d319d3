"""What the runtime would launch, without running it: every kernel of every op of spec files, at
named shapes, with the configurations a GPU could run (the heuristic choice and the autotuner's
candidates), as native compile jobs (runtime/native.py). ``opforge check --target`` and the CI
sweep (tests/test_native_sweep.py) are this plus a table.

Shapes: a spec file names them in ``# decode: ...`` and ``# prefill: ...`` lines (model-sized:
one token against a 4096-wide layer, and 2048 tokens); where it has none, its ``# shapes:``
line is used for both. Layout weights (``@quant``, ``@sparse``, ``@lowrank``) are checked in their
packed form, as ``bind`` would compile them at these sizes (block-sparse with half the blocks
kept); ``@auto`` weights in the dense form (each layout @auto may pick is another op's).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from ..ir import fp8
from ..ir.dims import evaluate
from ..ir.tile import TIMED_GUARDS, TileKernel
from .autotune import Limits, tuning_candidates
from .config import Config, heuristic_config
from .native import Job, make_job
from .sizes import file_directive, file_shapes
from .targets import Target

SHAPE_NAMES = ("decode", "prefill")


@dataclass(frozen=True)
class Case:
    """One kernel at one config: what a launch of ``op`` at ``shape`` could compile."""
    file: str
    op: str
    dtype: str
    shape: str                    # "decode", "prefill", or "given"
    bindings: tuple               # ((symbol, size), ...)
    kernel: TileKernel
    config: Config
    role: str                     # "heuristic" or "candidate"
    job: Job
    has_dot: bool = False


@dataclass
class SweepError:
    file: str
    op: str
    dtype: str
    shape: str
    message: str


def file_sweep_shapes(path, names=SHAPE_NAMES) -> dict[str, dict[str, int]]:
    base = file_shapes(path)
    out = {}
    for name in names:
        given = file_directive(path, name)
        out[name] = {**base, **given} if given else dict(base)
    return out


def packed_shapes(layout, name: str, n: int, k: int) -> dict[str, tuple]:
    """The packed tensors' shapes for a weight [n, k] (runtime/packing.py's table)."""
    kind, args, kw = layout.kind, layout.args, dict(layout.kwargs)
    if kind == "quant" and args[0] in ("int8", "fp8"):
        parts = {"q" if args[0] == "int8" else "bits": (n, k), "scale": (n,)}
    elif kind == "quant":
        g = kw["group"]
        parts = {"packed": (n, k // 2), "scale": (n, k // g), "zero": (n, k // g)}
    elif kind == "sparse" and "block" in kw:
        b = kw["block"]
        nb, kb = -(-n // b), -(-k // b)
        parts = {"blocks": (max(1, nb * kb // 2), b, b), "col_idx": (max(1, nb * kb // 2),), "row_ptr": (nb + 1,)}
    elif kind == "sparse":
        parts = {"values": (n, k // 2), "meta": (n, -(-k // 8))}
    elif kind == "lowrank":
        r = kw.get("rank", 16)
        parts = {"u": (n, r), "v": (r, k)}
    else:
        raise ValueError(f"no packed form for {layout}")
    return {f"{name}_{suffix}": shape for suffix, shape in parts.items()}


def variant(op, bindings: Mapping[str, int]):
    """The op as the runtime compiles it at these sizes: packed for its layout weights."""
    chosen, sizes, shapes, bound = {}, {}, {}, []
    for p in op.graph.params:
        if p.layout is None or p.layout.kind == "auto":
            continue
        n, k = (evaluate(d, bindings) for d in p.value.type.shape)
        chosen[p.name] = p.layout
        shapes.update(packed_shapes(p.layout, p.name, n, k))
        bound.append(p.name)
        for d, v in zip(p.value.type.shape, (n, k)):
            if not isinstance(d, int) and d.is_symbol():
                sizes[str(d)] = v
    if not chosen:
        return op
    return op.packed_variant(chosen, sizes, shapes, bound=tuple(bound))


def launched_kernels(plan, bindings) -> list[TileKernel]:
    """The kernels a call at these sizes may launch: each step's first alternative whose guard
    holds, and, where the autotuner times a heuristic guard's alternatives, the others that hold."""
    out = []
    for step in plan.steps:
        viable = [lnch for lnch in step if lnch.guard is None or lnch.guard.holds(bindings)]
        if not viable:
            continue
        timed = len(viable) > 1 and viable[0].guard is not None and viable[0].guard.rule in TIMED_GUARDS
        for lnch in viable if timed else viable[:1]:
            out.extend(lnch.kernels)
    return out


def grid_is_empty(k: TileKernel, bindings) -> bool:
    """A launch with no programs (a zero-sized extent) is skipped by the executor."""
    for gd in k.grid:
        for extent, block in gd.parts:
            if not isinstance(extent, str) and evaluate(extent, bindings) == 0:
                return True
    return False


def configs_of(k: TileKernel, bindings, tgt: Target, which: str) -> list[tuple[str, Config]]:
    """``which``: "heuristic", "first" (the heuristic and the first candidate) or "all"."""
    limits = Limits.of_target(tgt)
    out = [("heuristic", heuristic_config(k, bindings, limits))]
    if which != "heuristic":
        cands = tuning_candidates(k, bindings, limits)
        for c in cands[:1] if which == "first" else cands:
            if all(c != seen for _, seen in out):
                out.append(("candidate", c))
    return out


def has_dot(k: TileKernel) -> bool:
    from .autotune import dot_count
    return dot_count(k) > 0


def sweep(files, targets: list[Target], *, dtypes=("f16",), shapes: Mapping[str, Mapping[str, int]] | None = None,
          which: str = "all", cache=None, ops: list[str] | None = None) -> tuple[list[Case], list[SweepError]]:
    """Every case of the files (``shapes``: {name: sizes} for all files, else each file's own)."""
    from ..frontend import load_program
    from .cache import KernelCache
    from .module import compile_module
    cache = cache or KernelCache()
    cases: list[Case] = []
    errors: list[SweepError] = []
    for f in files:
        program = load_program(f)
        file_shapes_ = dict(shapes) if shapes is not None else file_sweep_shapes(f)
        for dtype in dtypes:
            names = [n for n in swept_graphs(program, dtype) if ops is None or n in ops or program.op_of(n) in ops]
            # lowered once per kind of target: an sm_80 kernel decodes fp8 with integers
            for has_fp8 in sorted({t.has_fp8 for t in targets}, reverse=True):
                tgts = [t for t in targets if t.has_fp8 == has_fp8]
                with fp8.for_target(has_fp8):
                    mod = compile_module(f, dtype=dtype, ops=names, cache_dir=cache.root)
                    for name in names:
                        for shape_name, sizes in file_shapes_.items():
                            cases += _file_op_cases(mod.ops[name], sizes, tgts, which, cache, str(f), dtype,
                                                    shape_name, errors)
    errors = list({(e.file, e.op, e.dtype, e.shape, e.message): e for e in errors}.values())
    cases.sort(key=lambda c: (c.file, c.op, c.dtype, SHAPE_ORDER.get(c.shape, 9), c.kernel.name,
                              [t.name for t in targets].index(c.job.target.name)))
    return cases, errors


SHAPE_ORDER = {name: i for i, name in enumerate(SHAPE_NAMES)}


def swept_graphs(program, dtype: str) -> list[str]:
    """The graphs a sweep in ``dtype`` compiles: every op's (retyped to ``dtype``), and of a
    dtype-generic op the binding of ``dtype`` (every variable bound to it; none if it admits
    no such binding: its other bindings are other dtypes' business)."""
    chosen = {program.binding(name, dtype) for name in program.generics}
    instances = {n for info in program.generics.values() for n in info.instances.values()}
    return [n for n in program.graphs if n not in instances or n in chosen]


def _file_op_cases(op, sizes, targets, which, cache, file, dtype, shape_name, errors):
    missing = [s for s in op.graph.symbols if s not in sizes]
    if missing:
        errors.append(SweepError(file, op.name, dtype, shape_name, f"no size for {', '.join(missing)}"))
        return []
    from .sizes import size_bindings
    bindings = size_bindings(op.graph, sizes)
    from .scan import compiled_parts
    try:
        return [c for part in compiled_parts(op) for c in
                op_cases(part, size_bindings(part.graph, bindings), targets, which=which, cache=cache, file=file,
                         dtype=dtype, shape=shape_name)]
    except Exception as e:      # a spec that cannot be compiled at these sizes
        errors.append(SweepError(file, op.name, dtype, shape_name, f"{type(e).__name__}: {e}"))
        return []


def op_cases(op, bindings: Mapping[str, int], targets: list[Target], *, which: str = "all", cache=None,
             file: str = "", dtype: str = "", shape: str = "given") -> list[Case]:
    """The cases of one compiled op (runtime/module.CompiledOp) at these sizes."""
    cache = cache or op.cache
    v = variant(op, bindings)
    from .sizes import size_bindings
    vb = size_bindings(v.graph, bindings)
    out = []
    for k in launched_kernels(v.plan, vb):
        for tgt in targets:
            for role, cfg in configs_of(k, vb, tgt, which):
                if grid_is_empty(k, vb):
                    continue
                job = make_job(k, cfg, tgt, v.plan.buffers, vb, cache)
                out.append(Case(file, op.name, dtype, shape, tuple(vb.items()), k, cfg, role, job, has_dot(k)))
    return out
