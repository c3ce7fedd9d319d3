"""Tolerances by dtype, in one place, and the comparison every test and command uses.

A compiled result is compared with the float64 reference executor two ways: the relative
Frobenius error ||out - ref|| / ||ref||, and elementwise |out - ref| <= atol * rms(ref) +
rtol * |ref| (so one wrong element cannot hide in a good norm). The dtype that sets the
tolerance is the narrowest float dtype anywhere in the op, since every rounding there counts.
f32 allows for TF32 dots on GPUs (about 3e-4). Below a narrow dtype's smallest normal, every
element may also be off by the dtype's resolution there (RESOLUTION). Integer and bool results
must match exactly. NaN never passes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ir.graph import Graph
from ..ir.types import DType


@dataclass(frozen=True)
class Tol:
    norm: float
    rtol: float
    atol: float


TOLERANCES: dict[DType, Tol] = {
    DType.f64: Tol(1e-9, 1e-9, 1e-9),
    DType.f32: Tol(1e-3, 2e-3, 2e-3),
    DType.f16: Tol(5e-3, 1e-2, 1e-2),
    DType.bf16: Tol(3e-2, 6e-2, 6e-2),
    DType.f8e4m3: Tol(1e-1, 2.5e-1, 2.5e-1),
}

PRECISION_ORDER = [DType.f8e4m3, DType.bf16, DType.f16, DType.f32, DType.f64]

# The spacing of the smallest values of an output dtype (its subnormals): a result below its
# smallest normal cannot be nearer the exact value than this, however right the kernel is (f16
# rounds 3e-8 to 0 or 6e-8), so every element may also be off by this much.
RESOLUTION = {torch.float16: 2.0 ** -24, torch.bfloat16: 2.0 ** -133, torch.float8_e4m3fn: 2.0 ** -9}

# Layouts whose kernels also round what the dense math does not: @quant(int8, act=int8)
# quantizes each activation row to int8 at run time (a step of max|x| / 127 per row), and
# @quant(fp8, act=fp8) to e4m3 (3 mantissa bits: up to 1/16 of each value, about 2.5% of the
# output's norm), which the reference on the unpacked weight does not model; their outputs are
# compared with these.
ACTIVATION_INT8 = Tol(2e-2, 8e-2, 8e-2)
ACTIVATION_FP8 = Tol(5e-2, 1.5e-1, 1.5e-1)
ACTIVATION = {"int8": ACTIVATION_INT8, "fp8": ACTIVATION_FP8}


def graph_dtypes(g: Graph) -> set[DType]:
    out = {p.value.type.dtype for p in g.params}
    for n in g.nodes:
        out.update(v.type.dtype for v in n.outputs)
    return out


def tolerance_for(g: Graph, extra: Tol | None = None, layouts: dict | None = None) -> Tol:
    """``layouts``: the layouts in effect by weight name (a bound layer's ``layouts``, where
    ``@auto`` has chosen one; None for dense), else the ones the spec declares."""
    floats = [d for d in PRECISION_ORDER if d in graph_dtypes(g)]
    tol = TOLERANCES[floats[0]] if floats else TOLERANCES[DType.f32]
    for p in g.params:
        layout = layouts.get(p.name, p.layout) if layouts is not None else p.layout
        act = dict(layout.kwargs).get("act") if layout is not None else None
        if act:
            tol = loosest(tol, ACTIVATION[act])
    return loosest(tol, extra) if extra is not None else tol


# A gradient holds the forward's roundings (through the values it saved) and the backward's own:
# gradients are compared with twice the forward's tolerance. Measured on the Llama block in f16
# (16 seeds and sizes), PyTorch's own f16 autograd needs 1.5x the forward's tolerance, opforge's
# kernels (FlashAttention-2's backward among them) 2x.
GRADIENT_FACTOR = 2.0


def gradient_tolerance_for(g: Graph, layouts: dict | None = None) -> Tol:
    t = tolerance_for(g, layouts=layouts)
    return Tol(t.norm * GRADIENT_FACTOR, t.rtol * GRADIENT_FACTOR, t.atol * GRADIENT_FACTOR)


def loosest(a: Tol, b: Tol) -> Tol:
    return Tol(max(a.norm, b.norm), max(a.rtol, b.rtol), max(a.atol, b.atol))


@dataclass(frozen=True)
class Comparison:
    ok: bool
    rel_err: float
    max_abs_err: float
    worst_index: tuple[int, ...] | None
    message: str


def compare(out: torch.Tensor, ref: torch.Tensor, tol: Tol) -> Comparison:
    if tuple(out.shape) != tuple(ref.shape):
        return Comparison(False, float("inf"), float("inf"), None,
                          f"shape {tuple(out.shape)} against the reference's {tuple(ref.shape)}")
    if not (out.dtype.is_floating_point or ref.dtype.is_floating_point):
        bad = out.cpu() != ref.cpu()
        n = int(bad.sum())
        idx = tuple(int(i) for i in bad.nonzero()[0]) if n else None
        return Comparison(n == 0, float(n), float(n), idx,
                          "exact" if n == 0 else f"{n} of {out.numel()} elements differ, first at {idx}")
    floor = RESOLUTION.get(out.dtype, 0.0)
    o = out.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    if out.numel() == 0:
        return Comparison(True, 0.0, 0.0, None, "empty")
    if torch.isnan(o).any() and not torch.isnan(r).any():
        idx = tuple(int(i) for i in torch.isnan(o).nonzero()[0])
        return Comparison(False, float("nan"), float("nan"), idx, f"NaN at {idx}")
    finite = torch.isfinite(r)
    same_inf = (o == r) & ~finite
    diff = torch.where(finite, (o - r).abs(), torch.where(same_inf, 0.0, float("inf")))
    rf = torch.where(finite, r, 0.0)
    denom = float(torch.linalg.vector_norm(rf))
    err = float(torch.linalg.vector_norm(torch.where(finite, o - r, 0.0)))
    rel = err / (denom or 1.0)
    scale = float(torch.sqrt((rf * rf).mean())) or 1.0
    bound = tol.atol * scale + tol.rtol * rf.abs() + floor
    excess = diff - bound
    worst = int(torch.argmax(excess))
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), o.shape))
    ok = bool((excess <= 0).all()) and (rel <= tol.norm or err <= floor * out.numel() ** 0.5)
    max_abs = float(diff.max())
    msg = (f"rel err {rel:.2e} (limit {tol.norm:.0e}), max |diff| {max_abs:.3g}"
           + ("" if ok else f"; worst at {idx}: {float(o.reshape(-1)[worst]):.6g} vs {float(r.reshape(-1)[worst]):.6g}"))
    return Comparison(ok, rel, max_abs, idx, msg)


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: Tol, what: str = "output") -> Comparison:
    c = compare(out, ref, tol)
    if not c.ok:
        raise AssertionError(f"{what}: {c.message}")
    return c
