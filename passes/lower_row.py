"""Lowering row groups (pointwise chains with the reductions that consume or produce them) and
copy groups to level-2 kernels.

The group's domain splits into outer axes, flattened into rows, and inner axes (the reduced
axes, or the last axis of a pointwise group), flattened into columns; each program owns
BLOCK_M rows. Three schedules:
- pointwise: a 2-D grid of [BLOCK_M, BLOCK_N] tiles, no loops;
- single: a reduction group whose rows fit one tile (BLOCK_N covers the inner extent): one load
  per element, every reduction in registers (rms_norm, softmax);
- looped: longer rows; one pass over the row per reduction, then a final pass for the outputs.
Reduction groups get both the single and the looped kernel; the launch picks by the inner
extent (SINGLE_PASS_MAX).
"""
from __future__ import annotations

from ..ir.dims import Dim
from ..ir.graph import Value
from ..ir.tile import GridDim, TExpr, TileKernel, Tunable
from ..ir.tile_builder import TileBuilder
from ..ir.types import DType
from .fusion import FusedGraph, Group
from .lower_eval import Ctx, Evaluator, LoweringError, address, unflatten

SINGLE_PASS_MAX = 16384
IDENTITY = {"sum": 0.0, "max": float("-inf"), "min": float("inf")}


def prod(dims) -> Dim:
    out: Dim = 1
    for d in dims:
        out = out * d
    return out


class RowFrame:
    """Rows and columns of a row-shaped kernel, their masks, and the canonical contexts."""

    def __init__(self, b: TileBuilder, domain: tuple, inner_axes: tuple[int, ...], *, block_m: Tunable,
                 block_n: Tunable, tile_cols: bool):
        self.b = b
        self.domain = tuple(domain)
        self.inner = tuple(inner_axes)
        self.outer = tuple(a for a in range(len(domain)) if a not in self.inner)
        self.n_rows = prod(domain[a] for a in self.outer)
        self.n_cols = prod(domain[a] for a in self.inner)
        self.BM = b.tunable(block_m)
        self.BN = b.tunable(block_n)
        b.comment("program id -> the rows of this tile")
        pid = b.let(b.program_id(0), "pid_m")
        rows = b.add(b.mul(pid, self.BM), b.expand_dims(b.arange(block_m.name), 1))
        self.rows = b.let(b.cast(rows, DType.i64), "rows")
        self.row_mask = b.let(b.lt(self.rows, b.size(self.n_rows)), "row_mask")
        self.outer_idx = self.decompose(self.rows, self.outer, "r")
        self.reduced = Ctx(tuple(self.outer_idx.get(a) for a in range(len(domain))), self.row_mask)
        self.col_base = None
        if tile_cols:
            pid_n = b.let(b.program_id(1), "pid_n")
            self.col_base = b.mul(pid_n, self.BN)

    def columns(self, start: TExpr | None = None) -> Ctx:
        """The canonical full context for the columns starting at start (or this tile's)."""
        b = self.b
        base = start if start is not None else self.col_base
        cols = b.expand_dims(b.arange(self.BN.name), 0)
        if base is not None:
            cols = b.add(base, cols)
        cols = b.let(cols, "cols")
        col_mask = b.lt(cols, b.size(self.n_cols))
        mask = b.let(b.and_(self.row_mask, col_mask), "mask")
        inner_idx = self.decompose(cols, self.inner, "c")
        idx = tuple(self.outer_idx.get(a, inner_idx.get(a)) for a in range(len(self.domain)))
        return Ctx(idx, mask)

    def decompose(self, lin: TExpr, axes, tag: str) -> dict[int, TExpr]:
        """Row-major multi-index of a flattened index over the given axes (size-1 axes omitted)."""
        real = [a for a in axes if self.domain[a] != 1]
        idx = unflatten(self.b, lin, [self.domain[a] for a in real], tag)
        return {a: i for a, i in zip(real, idx)}


def output_ctx(frame: RowFrame, v: Value, full: Ctx) -> Ctx | None:
    """Where a stored value of the group is written from: the full context, or the reduced
    one (keepdim or squeezed shape); None if it fits neither."""
    shape = tuple(v.type.shape)
    if shape == frame.domain:
        return full
    keep = tuple(1 if a in frame.inner else d for a, d in enumerate(frame.domain))
    if shape == keep:
        return frame.reduced
    drop = tuple(d for a, d in enumerate(frame.domain) if a not in frame.inner)
    if shape == drop:
        return Ctx(tuple(frame.outer_idx.get(a) for a in frame.outer), frame.row_mask)
    return None


def store(ev: Evaluator, name: str, v: Value, ctx: Ctx) -> None:
    tile = ev(v, ctx)
    ev.b.store(address(ev.b, name, v.type.dtype, ctx.idx, v.type.shape), tile, ctx.mask)


def kernel_name(fg: FusedGraph, group: Group, suffix: str = "") -> str:
    return f"{fg.graph.name}_{group.name}{suffix}"


# -- reductions ---------------------------------------------------------------------------------
def reduction_steps(group: Group):
    """(node, kind, input function) per pass over the row, in dependency order. softmax and
    log_softmax take two: the row max, then the sum of exp(x - max)."""
    steps = []
    for n in group.nodes:
        if n.op in ("sum", "mean", "max", "min"):
            steps.append((n, "sum" if n.op == "mean" else n.op, "x"))
        elif n.op in ("softmax", "log_softmax"):
            steps.append((n, "max", "x"))
            steps.append((n, "sum", "exp"))
    return steps


def step_input(ev: Evaluator, n, what: str, ctx: Ctx, results: dict) -> TExpr:
    x = ev(n.inputs[0], ctx)
    if what == "exp":
        return ev.b.unary("exp", ev.b.sub(x, results[(n, "max")]))
    return x


def bind_reduction(ev: Evaluator, frame: RowFrame, n, results: dict) -> None:
    b = ev.b
    if n.op in ("sum", "mean", "max", "min"):
        kind = "sum" if n.op == "mean" else n.op
        r = results[(n, kind)]
        if n.op == "mean":
            r = b.let(b.truediv(r, b.cast(b.size(frame.n_cols), DType.f32)), n.out.name or "mean")
        ev.bind(n.out, frame.reduced if n.attrs["keepdim"] else
                Ctx(tuple(frame.outer_idx.get(a) for a in frame.outer), frame.row_mask), r)
        return
    m, s = results[(n, "max")], results[(n, "sum")]
    inv = b.let(b.truediv(1.0, s), "inv_sum") if n.op == "softmax" else b.let(b.unary("log", s), "log_sum")

    def value(ctx: Ctx, n=n, m=m, inv=inv):
        x = ev(n.inputs[0], ctx)
        if n.op == "softmax":
            return b.let(b.mul(b.unary("exp", b.sub(x, m)), inv), n.out.name or "softmax")
        return b.let(b.sub(b.sub(x, m), inv), n.out.name or "log_softmax")
    ev.special[n.out] = value


def reduce_tile(b: TileBuilder, kind: str, tile: TExpr, mask: TExpr) -> TExpr:
    return b.reduce(b.where(mask, tile, IDENTITY[kind]), 1, kind, propagate_nan=True)


def combine(b: TileBuilder, kind: str, acc: TExpr, x: TExpr) -> TExpr:
    if kind == "sum":
        return b.add(acc, x)
    return b.maximum(acc, x) if kind == "max" else b.minimum(acc, x)


# -- templates ----------------------------------------------------------------------------------
def lower_row(fg: FusedGraph, group: Group) -> list[tuple[TileKernel, Dim | None, int]]:
    """The kernels of a row or copy group: [(kernel, guard extent, guard max)], tried in order."""
    steps = reduction_steps(group)
    if not steps:
        return [(_lower(fg, group, "pointwise", []), None, 0)]
    inner_extent = prod(group.domain[a] for a in group.axes)
    return [(_lower(fg, group, "single", steps), inner_extent, SINGLE_PASS_MAX),
            (_lower(fg, group, "looped", steps), None, 0)]


def _lower(fg: FusedGraph, group: Group, schedule: str, steps) -> TileKernel:
    suffix = "_looped" if schedule == "looped" else ""
    b = TileBuilder(kernel_name(fg, group, suffix))
    domain = group.domain
    if schedule == "pointwise":
        inner = (len(domain) - 1,) if domain else ()
        bm = Tunable("BLOCK_M", (1, 2, 4, 8, 16, 32), cpu=16)
        bn = Tunable("BLOCK_N", (32, 64, 128, 256, 512, 1024), cpu=64)
    elif schedule == "single":
        inner = group.axes
        bm = Tunable("BLOCK_M", (1, 2, 4, 8, 16), cpu=8)
        bn = Tunable("BLOCK_N", covers=prod(domain[a] for a in inner), hi=SINGLE_PASS_MAX)
    else:
        inner = group.axes
        bm = Tunable("BLOCK_M", (1, 2, 4), cpu=4)
        bn = Tunable("BLOCK_N", (512, 1024, 2048, 4096), cpu=256)
    frame = RowFrame(b, domain, inner, block_m=bm, block_n=bn, tile_cols=schedule == "pointwise")
    ev = Evaluator(b, fg, group)
    outputs = [(v, fg.buffer(group, v)) for v in group.outputs]
    full_outs, reduced_outs = [], []
    probe = Ctx(tuple(range(len(domain))), None)  # shapes only
    for v, name in outputs:
        where = output_ctx(frame, v, probe)
        if where is None:
            raise LoweringError(f"{group.name}: cannot store {v} in domain {domain}",
                                next((n for n in group.nodes if v in n.outputs), None))
        (full_outs if where is probe else reduced_outs).append((v, name))

    results: dict = {}
    if schedule in ("pointwise", "single"):
        ctx = frame.columns()
        for n, kind, what in steps:
            b.comment(f"reduce: {n.op} ({kind})")
            results[(n, kind)] = b.let(reduce_tile(b, kind, step_input(ev, n, what, ctx, results), ctx.mask),
                                       f"{n.out.name or n.op}_{kind}")
            if all((n, k) in results for k in _kinds(n)):
                bind_reduction(ev, frame, n, results)
        b.comment("epilogue: compute and store the results")
        for v, name in reduced_outs:
            store(ev, name, v, output_ctx(frame, v, ctx))
        for v, name in full_outs:
            store(ev, name, v, ctx)
    else:
        for n, kind, what in steps:
            b.comment(f"pass over the row: {n.op} ({kind})")
            acc = b.declare(b.full(("BLOCK_M", "BLOCK_N"), IDENTITY[kind], DType.f32), f"acc_{kind}")
            with b.loop("start", 0, b.size(frame.n_cols), frame.BN) as start:
                ctx = frame.columns(start)
                x = b.widen(step_input(ev, n, what, ctx, results))
                b.assign(acc, combine(b, kind, acc, b.where(ctx.mask, x, IDENTITY[kind])))
            results[(n, kind)] = b.let(b.reduce(acc, 1, kind, propagate_nan=True), f"{n.out.name or n.op}_{kind}")
            if all((n, k) in results for k in _kinds(n)):
                bind_reduction(ev, frame, n, results)
        if reduced_outs:
            b.comment("store the per-row results")
            for v, name in reduced_outs:
                store(ev, name, v, output_ctx(frame, v, frame.reduced))
        if full_outs:
            b.comment("final pass: compute and store the full results")
            with b.loop("start", 0, b.size(frame.n_cols), frame.BN) as start:
                ctx = frame.columns(start)
                for v, name in full_outs:
                    store(ev, name, v, ctx)
    grid = [GridDim.of(frame.n_rows, "BLOCK_M")]
    if schedule == "pointwise":
        grid.append(GridDim.of(frame.n_cols, "BLOCK_N"))
    doc = {"pointwise": "pointwise tiles", "single": "one tile per row: reductions in registers",
           "looped": "long rows: one pass per reduction, then the outputs"}[schedule]
    return b.kernel(grid, doc=f"{group.name} ({group.kind}): {doc}", warps=(2, 4, 8), stages=(1,))


def _kinds(n) -> tuple[str, ...]:
    if n.op in ("softmax", "log_softmax"):
        return ("max", "sum")
    return ("sum" if n.op == "mean" else n.op,)
