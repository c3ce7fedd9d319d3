"""The ``opforge`` command line (click for arguments, rich for terminal output).

    opforge check FILE
    opforge show FILE --op NAME --stage graph|fused|tile|triton
    opforge run FILE --op NAME --shape M=128,D=256 [--dtype f16] [--bench]
    opforge bench [--out results.json] [--plot roofline.png]
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
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@friendly_errors
def check(file):
    """Parse and check FILE; errors print as FILE:LINE:COL with a caret."""
    from .frontend import load_program
    from .passes.pipeline import canonical_graph
    program = load_program(file)
    for name in program.graphs:
        canonical_graph(program, name)
    for name, g in program.graphs.items():
        params = ", ".join(f"{p.name}: {p.value.type}" + (f" {p.layout}" if p.layout else "") for p in g.params)
        results = ", ".join(str(t) for t in g.result_types)
        console.print(f"  [bold]{name}[/]({params}) -> {results}", markup=True)
    console.print(f"{file}: {len(program.graphs)} op(s), no errors")


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--op", "op_name", required=True, help="the op to show")
@click.option("--stage", type=click.Choice(STAGES), default="graph", show_default=True)
@click.option("--shape", "shape", default=None, help="sizes for stages that depend on them, M=128,D=256")
@friendly_errors
def show(file, op_name, stage, shape):
    """Print one stage of the compilation of an op."""
    from .frontend import get_op, load_program
    from .passes.pipeline import canonical_graph
    program = load_program(file)
    get_op(program, op_name)
    if stage == "graph":
        from .ir.printer import print_graph
        console.print(print_graph(canonical_graph(program, op_name)), markup=False)
        return
    from .runtime.module import compile_module
    mod = compile_module(file, ops=[op_name])
    console.print(getattr(mod, op_name).stage_text(stage), markup=False, soft_wrap=True)


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
@click.option("--only", default=None, help="workload names (comma-separated) or a group: kernels, fusion, layouts")
@click.option("--dtypes", default="f16,bf16", show_default=True, help="dtypes to run the workloads in")
@click.option("--cpu-smoke", is_flag=True, help="tiny shapes on the CPU interpreter: checks the harness, times nothing useful")
def bench(out, plot, only, dtypes, cpu_smoke):
    """Benchmark the workloads against PyTorch eager, torch.compile and specialist libraries."""
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
