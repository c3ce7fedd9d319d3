"""The ``opforge`` command line (click for arguments, rich for terminal output).

    opforge check FILES... [--target sm_90a [--dtype f16,bf16] [--configs all]]
    opforge show FILE --op NAME --stage graph|fused|tile|triton|ttgir|ptx|sass [--target sm_90a] [--shape ...]
    opforge run FILE --op NAME --shape M=128,D=256 [--dtype f16] [--bench]
    opforge bench [--out results.json] [--plot roofline.png]
    opforge bench --host [--out host.json]        # host time per call, launches stubbed
    opforge bench --static [--out static.json]    # bytes requested from global memory
    opforge demo [FILES...]

Spec and call errors print as FILE:LINE:COL with a caret and exit 1, without a traceback.
"""
from __future__ import annotations

import functools
import sys

import click

from .runtime.console import make_console

# the terminal's width on a terminal, no width limit when piped; soft_wrap: error reports and
# printed IR keep their lines. Commands import what they need (torch) when they run, so
# ``opforge --help`` starts without it.
console = make_console()
errors = make_console(stderr=True)

STAGES = ("graph", "fused", "tile", "triton")
NATIVE_STAGES = ("ttgir", "ptx", "sass")


def friendly_errors(fn):
    """SpecError and CallError become a message and exit code 1; anything else is a bug."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        from . import CallError, SpecError
        try:
            return fn(*a, **kw)
        except (SpecError, CallError) as e:
            errors.print(str(e), markup=False)
            sys.exit(1)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="opforge")
def main():
    """opforge: compile .opf model specs into fused Triton kernels registered as PyTorch ops."""


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--shape", "shape", default=None, help="sizes to compile at, M=128,D=256 (default: the file's "
              "'# shapes:' line; --target: its '# decode:' and '# prefill:' lines)")
@click.option("--target", "targets", multiple=True, help="also compile every kernel natively for this GPU "
              "(sm_80, sm_89, sm_90a; repeatable) and check its resources")
@click.option("--dtype", "dtypes", default="f16", show_default=True, help="with --target: float dtypes, f16,bf16")
@click.option("--configs", type=click.Choice(["heuristic", "first", "all"]), default="all", show_default=True,
              help="with --target: the heuristic config only, it and the autotuner's first candidate, or every candidate")
@click.option("--markdown", "markdown", type=click.Path(dir_okay=False), default=None,
              help="with --target: also write the table as markdown here")
@click.option("--verbose", "-v", is_flag=True, help="with --target: list every note (ptxas warnings, no wgmma)")
@friendly_errors
def check(files, shape, targets, dtypes, configs, markdown, verbose):
    """Check FILES: parse them, then run the pipeline up to kernels (fusion, lowering, codegen; nothing
    runs). With --target, compile every kernel of every op for that GPU and report registers, spills,
    shared memory and tensor-core use; exit 1 if a kernel fails to compile, spills, or needs more shared
    memory than the GPU has. Errors print as FILE:LINE:COL with a caret."""
    from .runtime.check_pipeline import check_pipeline
    ok = True
    for file in files:
        ok &= check_pipeline(file, shape, console, errors)
    if targets and ok:
        ok &= _native_check(files, shape, targets, dtypes, configs, markdown, verbose)
    sys.exit(0 if ok else 1)


def _native_check(files, shape, targets, dtypes, configs, markdown, verbose) -> bool:
    from .runtime.check_report import rich_table, markdown_table
    from .runtime.native_check import native_check
    from .runtime.sizes import parse_shapes
    from .runtime.targets import target
    tgts = [target(t) for t in targets]
    shapes = {"given": parse_shapes(shape)} if shape else None
    res = native_check(list(files), tgts, dtypes=tuple(d for d in dtypes.split(",") if d), which=configs,
                       shapes=shapes, progress=console.is_terminal)
    if console.is_terminal:
        console.print(rich_table(res.rows))
    else:                      # piped: aligned plain text at full width, one row per line
        from .runtime.check_report import HEADERS, plain_table
        console.print(plain_table(res.rows, HEADERS, keep_all=True), markup=False)
    if markdown:
        from pathlib import Path
        Path(markdown).write_text(markdown_table(res.rows))
    for e in res.errors:
        errors.print(f"{e.file}: {e.op} ({e.dtype}, {e.shape}): not compiled: {e.message}", markup=False)
    for p in res.problems:
        errors.print(f"error: {p}", markup=False)
    shown = res.notes if verbose else res.notes[:10]
    for n in shown:
        console.print(f"note: {n}", markup=False)
    if len(res.notes) > len(shown):
        console.print(f"note: ... and {len(res.notes) - len(shown)} more notes (--verbose lists them)")
    kernels = len({(c.kernel.name, c.dtype) for c in res.cases})
    console.print(f"{len(res.cases)} compile(s) of {kernels} kernel(s) for {', '.join(t.name for t in tgts)} "
                  f"({res.compiled} compiled, the rest from the cache): "
                  + ("no problems" if res.ok else f"{len(res.problems)} problem(s)"))
    return res.ok


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--op", "op_name", required=True, help="the op to show")
@click.option("--stage", type=click.Choice(STAGES + NATIVE_STAGES), default="graph", show_default=True)
@click.option("--shape", "shape", default=None, help="sizes for stages that depend on them, M=128,D=256 (native "
              "stages default to the file's '# prefill:' line, else its '# shapes:' line)")
@click.option("--target", "target", default="sm_90a", show_default=True,
              help="the GPU of the native stages (ttgir, ptx, sass): sm_80, sm_89, sm_90a")
@click.option("--kernel", "kernel", default=None, help="native stages: only the kernels whose name contains this")
@friendly_errors
def show(file, op_name, stage, shape, target, kernel):
    """Print one stage of the compilation of an op. ttgir, ptx and sass compile the op's kernels for
    --target at their heuristic config (no GPU needed)."""
    from .frontend import graph_name, load_program
    from .passes.pipeline import canonical_graph
    program = load_program(file)
    op_name = graph_name(program, op_name)      # a generic op: its first binding
    if stage == "graph":
        from .ir.printer import print_graph
        console.print(print_graph(canonical_graph(program, op_name)), markup=False)
        return
    from .runtime.module import compile_module
    if stage in NATIVE_STAGES:
        from .ir import fp8
        from .runtime.targets import target as target_of
        with fp8.for_target(target_of(target).has_fp8):     # the kernels that GPU would get
            _show_native(file, compile_module(file, ops=[op_name]).ops[op_name], stage, shape, target, kernel)
        return
    mod = compile_module(file, ops=[op_name])
    console.print(getattr(mod, op_name).stage_text(stage), markup=False, soft_wrap=True)


def _show_native(file, op, stage, shape, target, kernel):
    from .runtime.binding import CallError
    from .runtime.native import NativeCompiler
    from .runtime.sizes import file_directive, file_shapes, parse_shapes
    from .runtime.sweep import op_cases
    from .runtime.targets import target as target_of
    sizes = {**file_shapes(file), **file_directive(file, "prefill"), **parse_shapes(shape)}
    missing = [s for s in op.graph.symbols if s not in sizes]
    if missing:
        raise CallError(f"{op.name}: give the sizes {', '.join(missing)} with --shape")
    from .runtime.sizes import size_bindings
    cases = [c for c in op_cases(op, size_bindings(op.graph, sizes), [target_of(target)], which="heuristic")
             if kernel is None or kernel in c.kernel.name]
    for c, r in zip(cases, NativeCompiler(op.cache).compile([c.job for c in cases])):
        head = f"{c.kernel.name} for {r.target} at {c.config} ({', '.join(f'{k}={v}' for k, v in c.bindings)})"
        console.print(f"// ---- {head} ----", markup=False)
        if not r.ok:
            console.print(f"// does not compile: {r.error}", markup=False)
            continue
        x = r.resources
        console.print(f"// {x.registers} registers, {x.spill_stores} B spill stores, {x.spill_loads} B spill loads, "
                      f"{x.stack} B stack, {x.shared} B shared memory, tensor cores: {x.tensor_core_text()}, "
                      f"async loads: {', '.join(x.loads) or 'none'}", markup=False)
        for w in x.warnings:
            console.print(f"// {w}", markup=False)
        console.print(r.stage(stage), markup=False, soft_wrap=True)


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--op", "op_name", required=True, help="the op to run")
@click.option("--shape", "shape", default=None, help="sizes, M=128,D=256 (defaults: a '# shapes:' line in FILE)")
@click.option("--dtype", type=click.Choice(["f32", "f16", "bf16"]), default=None,
              help="run the op's float tensors in this dtype instead of the spec's")
@click.option("--seed", default=0, show_default=True, help="seed of the random inputs")
@click.option("--reference", is_flag=True, help="run only the reference executor")
@click.option("--bench", "bench", is_flag=True, help="also time the compiled op")
@friendly_errors
def run(file, op_name, shape, dtype, seed, reference, bench):
    """Run an op on seeded random inputs and compare it with the reference executor."""
    from .runtime.runner import run_op
    ok = run_op(file, op_name, shape, dtype=dtype, seed=seed, reference_only=reference, bench=bench,
                console=console)
    sys.exit(0 if ok else 1)


@main.command()
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="write results JSON here")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="write a roofline plot here")
@click.option("--only", default=None, help="workload names (comma-separated) or a group: kernels, fusion, layouts, attention, recurrences")
@click.option("--dtypes", default="f16,bf16", show_default=True, help="dtypes to run the workloads in")
@click.option("--cpu-smoke", is_flag=True, help="tiny shapes on the CPU interpreter: checks the harness, times nothing useful")
@click.option("--host", "host", is_flag=True,
              help="host time per call of the example ops with kernel launches stubbed (any machine)")
@click.option("--static", "static", is_flag=True,
              help="bytes each workload's kernels request from global memory, against the compulsory bytes")
def bench(out, plot, only, dtypes, cpu_smoke, host, static):
    """Benchmark the workloads against PyTorch eager, torch.compile and specialist libraries."""
    if host:
        from .benchmarks.host import main as host_main
        sys.exit(host_main(out=out, console=console))
    if static:
        from .benchmarks.static import main as static_main
        sys.exit(static_main(out=out, only=only, console=console))
    from .benchmarks.harness import main as bench_main
    sys.exit(bench_main(out=out, plot=plot, only=only, cpu_smoke=cpu_smoke, dtypes=dtypes, console=console))


@main.command()
@click.argument("files", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option("--reference", is_flag=True, help="run only the reference executor")
@friendly_errors
def demo(files, reference):
    """Compile and run every op of the examples (or FILES) and check each against the reference."""
    from .runtime.runner import demo as run_demo
    ok = run_demo(list(files) or None, reference_only=reference, console=console)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
