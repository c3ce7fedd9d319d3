"""``opforge bench --host``: the host time of one call of each example op, kernels not run.

How: every op is compiled as usual and called as a user calls it (``mod.op(*args)``, or the
bound module for ops with layout weights), through the torch dispatcher, the argument checks
and the launch record; only the launch step itself is swapped: ``PlanRunner.launcher`` becomes a
stub that receives each kernel's call (function, grid, configuration) and its argument list and
returns. So the time is everything opforge and torch do on the host per call except Triton's
own launch (its argument binding and the driver call), on any machine, GPU or not.

Next to it, in the same run and interleaved with it (so both see the same load): the time of as
many trivial torch ops as the op launches kernels (``torch.add`` of two 8-element tensors on
the kernels' device), and the dispatch cost of each registration path (a do-nothing op defined
each way, called through ``torch.ops``).

Timing: after a warm-up (the first call builds the launch record), ``ROUNDS`` rounds of
``calls`` calls each; the figure is the fastest round's mean, in microseconds per call.
"""
from __future__ import annotations

import datetime as dt
import json
import platform
import time
from pathlib import Path

import torch

ROUNDS = 15


def _per_call_us(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def interleaved(fns: dict, calls: int, rounds: int = ROUNDS) -> dict:
    """The fastest round of each callable, the rounds taken in turn."""
    for fn in fns.values():
        for _ in range(max(10, calls // 10)):
            fn()
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], _per_call_us(fn, calls))
    return best


class StubLauncher:
    """The launch step, replaced: receives the call and its arguments, counts, returns."""

    def __init__(self):
        self.launches = 0
        self.last = None

    def __call__(self, call, args) -> None:
        self.launches += 1
        self.last = (call.grid, args)


def example_calls(files=None):
    """(FILE:OP, a zero-argument callable running one call, the op whose runner launches,
    kernels) for every example op at its file's ``# shapes:`` sizes."""
    from ..runtime.inputs import random_inputs
    from ..runtime.module import compile_module
    from ..runtime.runner import example_files
    from ..runtime.sizes import file_shapes
    out = []
    for f in files or example_files():
        shapes = file_shapes(str(f))
        mod = compile_module(f, namespace=f"host_{Path(f).stem}")
        for name, op in mod.ops.items():
            g = op.graph
            if any(s not in shapes for s in g.symbols):
                continue
            from ..runtime.sizes import size_bindings
            bindings = size_bindings(g, shapes)
            ins = random_inputs(g, bindings, seed=0, device=str(_device()))
            if any(p.layout is not None for p in g.params):
                layer = op.bind(**{p.name: ins[p.name] for p in g.params if p.layout is not None})
                free = [ins[n] for n in layer.free]
                out.append((f"{Path(f).name}:{name}", lambda layer=layer, free=free: layer(*free), layer._packed))
            else:
                args = [ins[p.name] for p in g.params]
                out.append((f"{Path(f).name}:{name}", lambda op=op, args=args: op(*args), op))
    return out


def _device() -> torch.device:
    from ..runtime.device import kernel_device
    return kernel_device()


def dispatch_costs(calls: int, rounds: int = ROUNDS) -> dict:
    """us per call of a do-nothing op registered each way, and of torch.add, in one run."""
    from ..runtime.library import _LIBRARIES
    x = torch.randn(8, device=_device())
    y = torch.empty_like(x)
    ns = "opforge_dispatch_probe"
    lib = _LIBRARIES.get(ns)
    if lib is None:
        lib = _LIBRARIES[ns] = torch.library.Library(ns, "FRAGMENT")
        lib.define("library(Tensor x) -> Tensor")
        lib.impl("library", lambda t: y, "CompositeExplicitAutograd")
        torch.library.register_fake(f"{ns}::library", lambda t: torch.empty_like(t))

        def body(t: torch.Tensor) -> torch.Tensor:
            return y
        torch.library.custom_op(f"{ns}::custom_op", body, mutates_args=())
        torch.library.register_fake(f"{ns}::custom_op", lambda t: torch.empty_like(t))
        torch.library.triton_op(f"{ns}::triton_op", body, mutates_args=())
    ops = getattr(torch.ops, ns)
    return interleaved({"library": lambda: ops.library.default(x), "custom_op": lambda: ops.custom_op.default(x),
                        "triton_op": lambda: ops.triton_op.default(x), "torch.add": lambda: torch.add(x, x)},
                       calls, rounds)


def measure(files=None, calls: int = 400, rounds: int = ROUNDS) -> dict:
    a = torch.randn(8, device=_device())
    b = torch.randn(8, device=_device())
    ops = {}
    for label, run, op in example_calls(files):
        from ..runtime.scan import compiled_parts
        stub = StubLauncher()
        for part in compiled_parts(op):     # an op with a scan launches through each of its pieces
            part.runner.launcher = stub
        run()
        kernels = stub.launches
        trivial = [torch.add] * kernels

        def torch_ops(trivial=trivial):
            for f in trivial:
                f(a, b)
        t = interleaved({"op": run, "torch": torch_ops}, calls, rounds)
        ops[label] = {"us_per_call": round(t["op"], 2), "kernels": kernels, "torch_ops_us": round(t["torch"], 2),
                      "ratio": round(t["op"] / t["torch"], 2) if t["torch"] else None}
    return {"ops": ops, "dispatch_us": {k: round(v, 2) for k, v in dispatch_costs(4 * calls, rounds).items()}}


def machine() -> dict:
    import os
    import triton
    return {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "kernel_device": str(_device()), "python": platform.python_version(), "torch": torch.__version__,
            "triton": triton.__version__, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "method": "launch step stubbed (PlanRunner.launcher); fastest of interleaved rounds"}


def main(out=None, console=None, calls: int = 400) -> int:
    from rich.console import Console
    from rich.table import Table
    console = console or Console()
    res = measure(calls=calls)
    res["machine"] = machine()
    tb = Table(title=f"host time per call, kernel launches stubbed ({res['machine']['kernel_device']}, "
                     f"{res['machine']['date'][:10]})", title_justify="left")
    for col in ("op", "kernels", "us per call", "same number of torch.add, us", "ratio"):
        tb.add_column(col)
    for name, r in res["ops"].items():
        tb.add_row(name, str(r["kernels"]), f"{r['us_per_call']:.1f}", f"{r['torch_ops_us']:.1f}", f"{r['ratio']:.2f}x")
    console.print(tb)
    d = res["dispatch_us"]
    console.print("registration dispatch, a do-nothing op through torch.ops (us per call): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in d.items()))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=1))
        console.print(f"wrote {out}")
    return 0
