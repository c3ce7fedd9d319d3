"""``@auto(tol=T)``: choose a weight's layout on the real weight, when it is bound.

Each applicable layout (int8, int4 with the largest group of 128/64/32 that divides K, fp8,
2:4; and, where the weight is used only as x @ w.T, low rank at the tolerance, block-sparse
where blocks are empty, and W8A8 in int8 and in fp8 when calibration inputs are given) is
packed and run on
calibration inputs (the caller's, else seeded random ones of the spec's shapes, with sizes the
weights do not bind set to CALIBRATION_SIZE). Its error is the relative Frobenius distance of
the op's output from the output with the dense weight. A layout whose error exceeds the
tolerance is never chosen; of the rest (dense always qualifies), the fastest wins: timed with
do_bench on a GPU, estimated on the CPU from the bytes each kernel must move and its FLOPs at
nominal H100 rates (the interpreter's wall clock says nothing about a GPU; W8A8 counts its
quantized activations, written and read once, and runs its FLOPs at twice the f16 rate). The
table of candidates is kept for explain().
"""
from __future__ import annotations

import torch

from ..ir.dims import evaluate
from ..ir.graph import Attrs, Layout
from ..frontend.diagnostics import SpecError
from ..ir.types import TensorType
from ..passes.layouts import contraction_uses
from .binding import CallError
from .inputs import random_inputs
from .packing import LOWRANK_MAX, lowrank_rank, pack, packed_bytes
from .reference import run_graph

CALIBRATION_SIZE = 32
NOMINAL_GBPS = 3000.0       # H100 copy bandwidth, for CPU estimates only
NOMINAL_TFLOPS = 700.0


def candidates(w: torch.Tensor, tol: float, contraction: bool = False, activations: bool = False) -> list[Layout]:
    """``contraction``: the weight is used only as x @ w.T, so layouts that replace the
    contraction (block-sparse, low rank, W8A8) apply. ``activations``: the caller gave
    calibration inputs, without which W8A8 is not tried (its error depends on the activations'
    outlier channels, which seeded random inputs do not have)."""
    n, k = w.shape
    out = [Layout("quant", ("int8",)), Layout("quant", ("fp8",))]
    if contraction and activations:
        out += [Layout("quant", ("int8",), Attrs({"act": "int8"})), Layout("quant", ("fp8",), Attrs({"act": "fp8"}))]
    if k % 2 == 0:
        for g in (128, 64, 32):
            if k % g == 0:
                out.append(Layout("quant", ("int4",), Attrs({"group": g})))
                break
    if k % 4 == 0:
        out.append(Layout("sparse", ((2, 4),)))
    if not contraction:
        return out
    r = lowrank_rank(w, tol)
    if r <= LOWRANK_MAX and (n + k) * r < n * k:
        out.append(Layout("lowrank", (), Attrs({"rank": r})))
    bs = 32
    if n >= bs and k >= bs:
        tiles = w[: n // bs * bs, : k // bs * bs].reshape(n // bs, bs, k // bs, bs)
        if bool((tiles == 0).all(dim=3).all(dim=1).any()):
            out.append(Layout("sparse", (), Attrs({"block": bs})))
    return out


def calibration_inputs(op, weights: dict, calibration) -> tuple[dict, dict]:
    """(values by parameter name, size bindings)."""
    g = op.graph
    if calibration is not None:
        from .binding import bind_sizes
        given = dict(calibration)
        given.update(weights)
        bindings: dict[str, int] = {}
        for p in g.params:   # sizes from what was given; others get CALIBRATION_SIZE
            if p.name in given and isinstance(p.value.type, TensorType):
                for d, s in zip(p.value.type.shape, given[p.name].shape):
                    if not isinstance(d, int) and d.is_symbol():
                        bindings.setdefault(str(d), int(s))
        for s in g.symbols:
            bindings.setdefault(s, CALIBRATION_SIZE)
        values = random_inputs(g, bindings, seed=0, device=str(next(iter(weights.values())).device))
        values.update(given)
        return values, bind_sizes(g, {p.name: values.get(p.name, p.default) for p in g.params})
    bindings: dict[str, int] = {}
    for p in g.params:
        if p.name in weights:
            for d, s in zip(p.value.type.shape, weights[p.name].shape):
                if not isinstance(d, int) and d.is_symbol():
                    bindings[str(d)] = int(s)
    for s in g.symbols:
        bindings.setdefault(s, CALIBRATION_SIZE)
    values = random_inputs(g, bindings, seed=0, device=str(next(iter(weights.values())).device))
    values.update(weights)
    return values, bindings


def estimate_ms(op, packed: dict | None, name: str, bindings, layout: Layout | None = None) -> float:
    g = op.graph
    act = layout is not None and bool(dict(layout.kwargs).get("act"))
    moved = 0
    for p in g.params:
        if isinstance(p.value.type, TensorType):
            if p.name == name and packed is not None:
                moved += packed_bytes(packed)
                continue
            n = p.value.type.dtype.itemsize
            for d in p.value.type.shape:
                n *= evaluate(d, bindings)
            moved += n
    flops = 0
    for nd in g.nodes:
        if nd.op == "matmul":
            a, b = nd.inputs
            m = 1
            for d in nd.out.type.shape:
                m *= evaluate(d, bindings)
            flops += 2 * m * evaluate(a.type.shape[-1], bindings)
    if act:     # the quantized activations (a byte each), written and read back
        for mm in contraction_uses(g, next(p for p in g.params if p.name == name), layout):
            numel = 1
            for d in mm.inputs[0].type.shape:
                numel *= evaluate(d, bindings)
            moved += 2 * numel
    rate = NOMINAL_TFLOPS * (2 if act else 1)
    return max(moved / (NOMINAL_GBPS * 1e9), flops / (rate * 1e12)) * 1e3


def choose_layout(op, name: str, w: torch.Tensor, tol: float, weights: dict, calibration):
    """(the chosen layout or None for dense, the report rows)."""
    from .timing import bench_ms
    values, bindings = calibration_inputs(op, weights, calibration)
    g = op.graph
    dense_ref = run_graph(g, values, bindings, check=True)[0]
    on_gpu = torch.cuda.is_available()
    rows = []
    results = []
    order = [p.name for p in g.params]
    dense_ms = estimate_ms(op, None, name, bindings) if not on_gpu else \
        bench_ms(lambda: op(*[values[p] for p in order]))
    results.append((None, 0.0, dense_ms, sum(t.numel() * t.element_size() for t in [w])))
    param = next(p for p in g.params if p.name == name)
    try:
        contraction_uses(g, param, param.layout)
        contraction = True
    except SpecError:
        contraction = False
    for layout in candidates(w, tol, contraction, activations=calibration is not None):
        try:
            packed = pack(layout, w, name)
        except CallError:
            continue
        sizes = {str(d): int(n) for d, n in zip(op.graph.params[[p.name for p in op.graph.params].index(name)].value.type.shape, w.shape)
                 if not isinstance(d, int) and d.is_symbol()}
        variant = op.packed_variant({name: layout}, sizes, {f"{name}_{k}": tuple(t.shape) for k, t in packed.items()})
        args = []
        for p in variant.graph.params:
            if p.name.startswith(f"{name}_") and p.name[len(name) + 1:] in packed:
                args.append(packed[p.name[len(name) + 1:]])
            else:
                args.append(values[p.name])
        out = variant(*args)
        out = out[0] if isinstance(out, tuple) else out
        err = float((out.double() - dense_ref).norm() / dense_ref.norm().clamp_min(1e-30))
        ms = bench_ms(lambda: variant(*args)) if on_gpu else estimate_ms(op, packed, name, bindings, layout)
        results.append((layout, err, ms, packed_bytes(packed)))
    ok = [r for r in results if r[1] <= tol]
    best = min(ok, key=lambda r: r[2])
    how = "us (do_bench)" if on_gpu else "us (estimate)"
    rows.append(f"{'layout':<26} {'rel error':>10} {how:>14} {'weight bytes':>13}")
    for layout, err, ms, nbytes in results:
        mark = "  <- chosen" if layout is best[0] else ("" if err <= tol else "  over tol")
        rows.append(f"{str(layout) if layout else 'dense':<26} {err:>10.2e} {ms * 1e3:>14.3g} {nbytes:>13}{mark}")
    if not on_gpu:
        rows.append("(no GPU: times are estimated from the bytes each kernel must move and its FLOPs "
                    "at nominal H100 rates)")
    return best[0], rows
