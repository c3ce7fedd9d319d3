"""What ``opforge run`` and ``opforge demo`` do: seeded random inputs, the compiled op (or the
reference executor), and the comparison with the float64 reference, printed as a table."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ..frontend import graph_name, load_program
from ..passes.pipeline import canonical_graph, prepared_graph
from .console import make_console
from .inputs import random_inputs
from .reference import run_graph
from .sizes import file_shapes, resolve_shapes
from .tolerances import compare, tolerance_for

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def default_device() -> torch.device:
    from .device import kernel_device
    return kernel_device()


def execution_path() -> str:
    from .device import describe
    return describe()


def _prepare(file, op_name, shape, dtype):
    program = load_program(file)
    name = graph_name(program, op_name, dtype)     # a generic op: the binding of dtype
    g = prepared_graph(program, name, dtype)
    bindings = resolve_shapes(g, str(file), shape, op=op_name)
    return program, g, bindings, name


def run_op(file, op_name, shape=None, *, dtype=None, seed=0, reference_only=False, bench=False,
           console: Console | None = None):
    console = console or make_console()
    program, g, bindings, op_name = _prepare(file, op_name, shape, dtype)
    device = torch.device("cpu") if reference_only else default_device()
    inputs = random_inputs(g, bindings, seed=seed, device=str(device))
    ref = run_graph(g, inputs, bindings, check=True)
    sizes = ", ".join(f"{k}={v}" for k, v in bindings.items())
    if reference_only:
        path = "reference executor (PyTorch, spec dtypes)"
        t0 = time.perf_counter()
        outs = run_graph(g, inputs, bindings)
        elapsed = time.perf_counter() - t0
    else:
        from .module import compile_module
        mod = compile_module(file, dtype=dtype, ops=[op_name])
        op = getattr(mod, op_name)
        path = execution_path()
        args = [inputs[p.name] for p in g.params]
        t0 = time.perf_counter()
        res = op(*args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        outs = list(res) if isinstance(res, tuple) else [res]
    tol = tolerance_for(g)
    table = Table(title=f"{op_name}  ({sizes})", title_justify="left")
    for col in ("result", "shape", "dtype", "vs float64 reference", "status"):
        table.add_column(col, overflow="fold")
    all_ok = True
    for i, (o, r) in enumerate(zip(outs, ref)):
        c = compare(o, r, tol)
        all_ok &= c.ok
        table.add_row(str(i), str(list(o.shape)), str(o.dtype).replace("torch.", ""), c.message,
                      "[green]ok[/]" if c.ok else "[red]MISMATCH[/]")
    console.print(f"ran [bold]{op_name}[/] from {file} via {path} in {elapsed * 1e3:.1f} ms (first call "
                  f"includes compilation)")
    console.print(table)
    if bench and not reference_only:
        from .timing import time_op
        ms = time_op(op, args)
        console.print(f"time: {ms:.4f} ms per call ({'do_bench median' if device.type == 'cuda' else 'wall clock, interpreter'})")
    return all_ok


def example_files() -> list[Path]:
    return sorted(EXAMPLES.glob("*.opf"))


def demo(files=None, *, reference_only=False, console: Console | None = None) -> bool:
    """Every op of every example: compile, run on seeded inputs, compare with the reference."""
    console = console or make_console()
    files = [Path(f) for f in files] if files else example_files()
    path = "reference executor" if reference_only else execution_path()
    console.print(f"opforge demo: {len(files)} spec file(s), running via {path}")
    table = Table(title_justify="left")
    for col in ("spec", "op", "sizes", "kernels", "time", "vs float64 reference", "status"):
        table.add_column(col, overflow="fold")     # a narrow terminal wraps names, never cuts them
    all_ok = True
    matched, mismatched, skipped = [], [], []
    generic = []          # (op, bindings) of the dtype-generic ops: each binding runs as its own row
    for f in files:
        program = load_program(f)
        shapes = file_shapes(str(f))
        generic += [(info.name, len(info.instances)) for info in program.generics.values()]
        for name in program.graphs:
            g = canonical_graph(program, name)
            missing = [s for s in g.symbols if s not in shapes]
            if missing:
                table.add_row(f.name, name, f"no sizes for {', '.join(missing)}", "", "", "", "[yellow]skipped[/]")
                skipped.append(name)
                continue
            from .sizes import size_bindings
            bindings = size_bindings(g, shapes)
            sizes = ",".join(f"{k}={v}" for k, v in bindings.items())
            op, kernels = None, "-"
            if not reference_only:
                from ..frontend.diagnostics import SpecError
                from .module import compile_module
                try:
                    op = getattr(compile_module(f, ops=[name]), name)
                except SpecError as e:
                    table.add_row(f.name, name, sizes, "", "", "", f"[yellow]not compiled: {e.message}[/]")
                    skipped.append(name)
                    continue
                kernels = str(op.kernel_count)
            device = "cpu" if reference_only else str(default_device())
            inputs = random_inputs(g, bindings, seed=0, device=device)
            ref = run_graph(g, inputs, bindings, check=True)
            layer = None
            t0 = time.perf_counter()
            if op is None:
                outs = run_graph(g, inputs, bindings)
            elif any(p.layout is not None for p in g.params):
                # layout weights are packed once (bind), then the reference runs on the weights
                # the kernels actually compute with (unpacked)
                layer = op.bind(**{p.name: inputs[p.name] for p in g.params if p.layout is not None})
                kernels = f"{layer._packed.kernel_count} ({', '.join(str(v) for v in layer.layouts.values())})"
                t0 = time.perf_counter()
                res = layer(*[inputs[n] for n in layer.free])
                outs = list(res) if isinstance(res, tuple) else [res]
                ref = run_graph(g, {**inputs, **layer.unpacked()}, bindings, check=True)
            else:
                res = op(*[inputs[p.name] for p in g.params])
                outs = list(res) if isinstance(res, tuple) else [res]
            elapsed = time.perf_counter() - t0
            tol = tolerance_for(g, layouts=layer.layouts if layer is not None else None)
            cs = [compare(o, r, tol) for o, r in zip(outs, ref)]
            ok = all(c.ok for c in cs)
            all_ok &= ok
            (matched if ok else mismatched).append(name)
            worst = max(cs, key=lambda c: c.rel_err)
            table.add_row(f.name, name, sizes, kernels, f"{elapsed * 1e3:.0f} ms", f"rel err {worst.rel_err:.1e}",
                          "[green]ok[/]" if ok else f"[red]{worst.message}[/]")
    console.print(table)
    console.print(demo_summary(matched, mismatched, skipped))
    if generic:
        console.print("(each binding of a dtype-generic op is counted as an op: "
                      + ", ".join(f"{name} has {n}" for name, n in generic) + ")")
    return all_ok


def demo_summary(matched: list, mismatched: list, skipped: list) -> str:
    """The demo's last line: how many ops ran and matched, and every op that was not run (a
    full match is claimed only when every op ran)."""
    total = len(matched) + len(mismatched) + len(skipped)
    if not mismatched and not skipped:
        return "the 1 op matches the reference" if total == 1 else f"all {total} ops match the reference"
    parts = []
    if mismatched:
        parts.append(f"[red]{len(mismatched)} of {total} ops do not match the reference: {', '.join(mismatched)}[/]")
    parts.append(f"{len(matched)} of {total} ops match the reference")
    if skipped:
        parts.append(f"[yellow]{len(skipped)} skipped (not run): {', '.join(skipped)}[/]")
    return "; ".join(parts)
