"""``opforge bench --static``: the bytes each benchmark workload's kernels request from global
memory at the workload's sizes, counted from the level-2 kernels (runtime/traffic.py; no kernel
runs, any machine), against the compulsory bytes (the op's inputs and outputs once) and, for the
weights, against the weights' own size.

Weights: the bound (packed) parameters of the layout workloads, and for the others every
parameter that is the B operand of a contraction (so attention's k and v count as weights).
Layout weights are packed on the meta device (shapes only) to build the packed op. The
configuration is the heuristic one the GPU uses before autotuning (runtime/config.py
``heuristic_config``), each step's first applicable alternative.

Besides the workloads, ``DECODE`` holds decode-shaped cases the issue names (the Llama
``swiglu_mlp`` at B=32, S=1).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .workloads import EXAMPLES, WORKLOADS, Workload, by_name

LLAMA = (EXAMPLES / "llama.opf").read_text()

# (name, spec, op, sizes): decode shapes outside the timed workloads
DECODE = [("swiglu_mlp_B32_S1", LLAMA, "swiglu_mlp", {"B": 32, "S": 1, "D": 4096, "F": 11008})]


def packed_op(op, weights: tuple[str, ...], sizes: dict):
    """The op compiled for its layout weights at ``sizes`` (as ``bind`` does), from weights on
    the meta device: (the packed op, the names of its bound buffers)."""
    from ..ir.torch_dtypes import to_torch
    from ..runtime.packing import pack
    params = {p.name: p for p in op.graph.params}
    chosen, shapes, bound_sizes, bound = {}, {}, {}, []
    for name in weights:
        p = params[name]
        shape = tuple(sizes[str(d)] if not isinstance(d, int) else d for d in p.value.type.shape)
        for d, n in zip(p.value.type.shape, shape):
            if not isinstance(d, int):
                bound_sizes[str(d)] = n
        if p.layout is None or p.layout.kind == "auto":
            shapes[name], _ = shape, bound.append(name)
            continue
        chosen[name] = p.layout
        w = torch.empty(shape, dtype=to_torch(p.value.type.dtype), device="meta")
        for suffix, t in pack(p.layout, w, name).items():
            shapes[f"{name}_{suffix}"] = tuple(t.shape)
            bound.append(f"{name}_{suffix}")
    return op.packed_variant(chosen, bound_sizes, shapes, bound=tuple(weights)), bound


def workload_traffic(name: str, spec: str, op_name: str, sizes: dict, weights: tuple = ()):
    import opforge
    from ..runtime.traffic import op_traffic
    mod = opforge.compile(spec, namespace=f"static_{name.replace(':', '')}", dtype="f16", ops=[op_name])
    op = getattr(mod, op_name)
    if weights:
        op, _ = packed_op(op, weights, sizes)       # its bound parameters are the weights
    from ..runtime.sizes import size_bindings
    return op_traffic(op, size_bindings(op.graph, sizes))


def measure(only: str | None = None, decode: bool = True) -> dict:
    rows = {}
    workloads: list[Workload] = WORKLOADS if not only else by_name(only)
    for w in workloads:
        rows[w.name] = workload_traffic(w.name, w.spec, w.op, w.sizes, w.weights)
    if decode and not only:
        for name, spec, op, sizes in DECODE:
            rows[name] = workload_traffic(name, spec, op, sizes)
    return rows


def main(out=None, only=None, console=None) -> int:
    from rich.console import Console
    from rich.table import Table
    console = console or Console()
    rows = measure(only)
    tb = Table(title="bytes requested from global memory (static count; heuristic config, first applicable "
                     "alternative)", title_justify="left")
    for col in ("workload", "kernels", "requested MB", "compulsory MB", "ratio", "weights req. MB", "weights MB",
                "weight ratio", "exact"):
        tb.add_column(col)
    for name, t in rows.items():
        wr = f"{t.weight_requested / t.weight_bytes:.2f}x" if t.weight_bytes else "-"
        tb.add_row(name, str(len(t.kernels)), f"{t.requested / 1e6:,.1f}", f"{t.compulsory / 1e6:,.1f}",
                   f"{t.requested / t.compulsory:.2f}x", f"{t.weight_requested / 1e6:,.1f}" if t.weight_bytes else "-",
                   f"{t.weight_bytes / 1e6:,.1f}" if t.weight_bytes else "-", wr,
                   "yes" if t.exact else "upper bound")
    console.print(tb)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        data = {"config": "heuristic_config (runtime/config.py), each step's first applicable alternative",
                "workloads": {name: t.as_json() for name, t in rows.items()}}
        Path(out).write_text(json.dumps(data, indent=1))
        console.print(f"wrote {out}")
    return 0
