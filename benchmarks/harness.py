"""``opforge bench``: time each workload against PyTorch eager, torch.compile and the specialist,
in one run on one device, and report FLOPs, bytes, the roofline and the speedups.

Method (the device's METHOD.md): measure the GPU's two ceilings first (a large device-to-device
copy counting bytes read plus written; a large bf16 matmul through torch); check every
implementation against the float64 reference on random inputs before timing; time with
triton.testing.do_bench (median, L2 flushed between runs). The roofline time of a workload is
max(FLOPs / matmul rate, bytes / copy bandwidth); its fraction is that over the measured time.

Without a GPU there is nothing to measure: the command says so and exits 0. ``--cpu-smoke``
runs the same code at tiny sizes through the interpreter to check the harness (JSON, plot);
its times are meaningless and are labelled so.
"""
from __future__ import annotations

import datetime as dt
import json
import platform
import sys
import traceback
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from .workloads import Workload, by_name

DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16}


def versions() -> dict:
    import triton
    from .. import __version__
    return {"torch": torch.__version__, "triton": triton.__version__, "opforge": __version__,
            "python": platform.python_version()}


def device_info(smoke: bool) -> dict:
    if smoke:
        return {"name": "CPU (Triton interpreter, smoke run: times are not kernel figures)", "smoke": True}
    p = torch.cuda.get_device_properties(0)
    return {"name": p.name, "capability": f"sm_{p.major}{p.minor}", "sms": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2**30, 1)}


def ceilings(smoke: bool, bench) -> dict:
    """The measured copy bandwidth (bytes read + written per second) and matmul rate."""
    if smoke:
        return {"copy_gbps": None, "matmul_tflops": None}
    copy = _copy_gbps(bench)
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    bm = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ bm)
    return {"copy_gbps": round(copy, 1), "matmul_tflops": round(2 * m**3 / (ms * 1e-3) / 1e12, 1)}


def _copy_gbps(bench, n: int = 1 << 28) -> float:
    """A device-to-device copy of 512 MiB of f16, counting bytes read plus bytes written."""
    src = torch.randn(n, device="cuda", dtype=torch.float16)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def make_inputs(w: Workload, sizes: dict, dtype: torch.dtype, device: str, graph):
    from ..runtime.inputs import random_inputs
    ins = random_inputs(graph, sizes, seed=0, device=device)
    ins.update({k: v for k, v in w.scalars.items() if k in ins})    # a workload's own scalars
    for name, fill in w.fills.items():                                # and integer inputs (lengths)
        ins[name] = torch.full_like(ins[name], fill(sizes))
    return [ins[p.name] for p in graph.params]


def run_workload(w: Workload, dtype_name: str, smoke: bool, bench, ceil: dict, console) -> dict:
    import opforge
    from ..runtime.reference import run_graph
    from ..runtime.tolerances import compare, tolerance_for
    sizes = w.cpu_sizes if smoke else w.sizes
    device = "cpu" if smoke else "cuda"
    mod = opforge.compile(w.spec, namespace=f"bench_{w.name}_{dtype_name}", dtype=dtype_name, ops=[w.op])
    op = getattr(mod, w.op)
    g = op.graph
    args = make_inputs(w, sizes, DTYPES[dtype_name], device, g)
    values = {p.name: a for p, a in zip(g.params, args)}
    ref = run_graph(g, values, sizes, check=True)[0]
    tol = tolerance_for(g)
    impls = {"opforge": lambda: op(*args), "eager": lambda: w.eager(*args)}
    refs = {}
    kernels = op.kernel_count
    if w.weights:
        # weights are packed once; the packed op is checked against the reference run on the
        # weights it computes with (unpacked), the dense baselines against the dense reference
        layer = op.bind(**{name: values[name] for name in w.weights})
        free = [values[n] for n in layer.free]
        impls["opforge"] = lambda: layer(*free)
        refs["opforge"] = run_graph(g, {**values, **layer.unpacked()}, sizes, check=True)[0]
        kernels = layer._packed.kernel_count
        tol = tolerance_for(g, layouts=layer.layouts)      # @auto may have chosen a W8A8 layout
    if not smoke:
        if w.compiles:
            compiled = torch.compile(w.eager, mode="max-autotune-no-cudagraphs")
            impls["torch.compile"] = lambda: compiled(*args)
        for spec_name, spec_fn in ([w.specialist] if w.specialist is not None else []) + list(w.more):
            impls[spec_name] = lambda fn=spec_fn: fn(*args)
            if w.specialist_packs and "opforge" in refs:
                # it prunes or quantizes the weight as the layout does: same reference
                refs[w.specialist[0]] = refs["opforge"]
    row = {"workload": w.name, "dtype": dtype_name, "sizes": sizes, "note": w.note, "smoke": smoke,
           "flops": w.flops(sizes), "bytes": w.bytes(sizes, DTYPES[dtype_name].itemsize),
           "kernels": kernels, "times_ms": {}, "errors": {}, "correct": {}}
    for name, fn in impls.items():
        try:
            out = fn()
            c = compare(out, refs.get(name, ref), tol)
            row["correct"][name] = c.ok
            row["errors"][name] = c.rel_err
            row["times_ms"][name] = bench(fn)
        except Exception as e:  # a failing baseline is reported, not fatal
            row["times_ms"][name] = None
            row["correct"][name] = False
            row["errors"][name] = f"{type(e).__name__}: {e}"
            console.print(f"[yellow]{w.name}/{dtype_name}: {name} failed: {e}[/]")
    t = row["times_ms"].get("opforge")
    if ceil.get("copy_gbps") and t:
        floor_ms = max(row["flops"] / (ceil["matmul_tflops"] * 1e12), row["bytes"] / (ceil["copy_gbps"] * 1e9)) * 1e3
        row["roofline_ms"] = floor_ms
        row["fraction_of_roofline"] = floor_ms / t
        row["achieved_gbps"] = row["bytes"] / (t * 1e-3) / 1e9
        row["achieved_tflops"] = row["flops"] / (t * 1e-3) / 1e12
    for base in ("eager", "torch.compile", *([w.specialist[0]] if w.specialist else []), *(n for n, _ in w.more)):
        tb = row["times_ms"].get(base)
        if t and tb and not smoke:      # interpreter times compare with nothing
            row.setdefault("speedup", {})[base] = tb / t
    return row


def table(rows: list[dict], title: str) -> Table:
    tb = Table(title=title, title_justify="left")
    for col in ("workload", "dtype", "kernels", "opforge ms", "eager ms", "compile ms", "specialist ms",
                "of roofline", "vs compile", "correct"):
        tb.add_column(col)

    def ms(x):
        return "-" if x is None else f"{x:.3f}"
    for r in rows:
        times = r["times_ms"]
        spec = next((k for k in times if k not in ("opforge", "eager", "torch.compile")), None)
        frac = r.get("fraction_of_roofline")
        sp = r.get("speedup", {}).get("torch.compile")
        tb.add_row(r["workload"], r["dtype"], str(r["kernels"]), ms(times.get("opforge")), ms(times.get("eager")),
                   ms(times.get("torch.compile")), ms(times.get(spec)) if spec else "-",
                   f"{frac:.0%}" if frac else "-", f"{sp:.2f}x" if sp else "-",
                   "yes" if all(r["correct"].values()) else "NO")
    return tb


def plot_results(rows: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [f"{r['workload']}\n{r['dtype']}" for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(11, 1.4 * len(rows) + 4), 4.8))
    fracs = [r.get("fraction_of_roofline") or 0 for r in rows]
    ax1.bar(labels, fracs, color="tab:blue")
    ax1.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax1.set_ylabel("fraction of roofline (measured ceilings)")
    ax1.set_title("opforge vs the roofline")
    bases = ["eager", "torch.compile"]
    width = 0.38
    xs = range(len(rows))
    for k, base in enumerate(bases):
        vals = [r.get("speedup", {}).get(base) or 0 for r in rows]
        ax2.bar([x + (k - 0.5) * width for x in xs], vals, width, label=f"vs {base}")
    ax2.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax2.set_xticks(list(xs))
    ax2.set_xticklabels(labels)
    ax2.set_ylabel("speedup (higher is better)")
    ax2.set_title("opforge speedup")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    if any(r.get("smoke") for r in rows):
        for ax in (ax1, ax2):
            ax.text(0.5, 0.5, "CPU smoke run:\nno kernel figures", transform=ax.transAxes, ha="center",
                    va="center", fontsize=16, color="gray", alpha=0.6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(out=None, plot=None, only=None, cpu_smoke=False, dtypes="f16,bf16", console: Console | None = None) -> int:
    """``only``: workload names (comma-separated) or a group: kernels, fusion, layouts
    (default: kernels and fusion; layouts are many shapes, run them on their own)."""
    console = console or Console()
    if not cpu_smoke and not torch.cuda.is_available():
        console.print("opforge bench: no CUDA GPU on this machine, so there is nothing to measure "
                      "(the benchmark times GPU kernels). Run it on a GPU machine; "
                      "--cpu-smoke checks the harness itself at tiny sizes.")
        return 0
    from ..runtime.timing import bench_ms
    workloads = by_name(only)
    dts = ["f16"] if cpu_smoke else [d.strip() for d in dtypes.split(",")]
    if cpu_smoke and not only:
        workloads = workloads[:4] + [w for w in workloads if w.group == "fusion"]
    info = device_info(cpu_smoke)
    ceil = ceilings(cpu_smoke, bench_ms)
    rows = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("benchmarking", total=len(workloads) * len(dts))
        for w in workloads:
            for d in dts:
                progress.update(task, description=f"{w.name} {d}")
                try:
                    rows.append(run_workload(w, d, cpu_smoke, bench_ms, ceil, console))
                except Exception as e:
                    console.print(f"[red]{w.name}/{d} failed: {e}[/]")
                    traceback.print_exc(file=sys.stderr)
                    rows.append({"workload": w.name, "dtype": d, "failed": f"{type(e).__name__}: {e}",
                                 "times_ms": {}, "correct": {"opforge": False}, "kernels": "-"})
                progress.advance(task)
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    result = {"date": date, "device": info, "versions": versions(), "ceilings": ceil, "results": rows}
    title = f"{info['name']}  {date[:10]}  copy {ceil.get('copy_gbps')} GB/s, matmul {ceil.get('matmul_tflops')} TFLOP/s"
    console.print(table([r for r in rows if "failed" not in r], title))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1, default=str))
        console.print(f"wrote {out}")
    if plot:
        plot_results(rows, plot, title)
        console.print(f"wrote {plot}")
    return 0 if all("failed" not in r and all(r["correct"].values()) for r in rows) else 1

