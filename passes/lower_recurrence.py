"""Lowering a scan as one kernel: the carries on chip across all steps.

Pipeline position: a template of passes/plan.py, for a group of kind ``recurrence`` (one scan
node, ir/prims_scan.py). runtime/scan.py compiles each scan of an op this way where the template
can (``LoweringError`` otherwise: the op keeps running the body step by step) and uses it for
the calls that need no gradient.

The kernel: a grid over tiles of the carries' leading axis (a batch or head axis, whose rows
the body must keep apart), the other axes whole, one tile each (the next power of two of their
size). A program loads or fills its carries, then for each step evaluates the carries' next
values and the step's outputs at the carry's indices with lower_eval's Evaluator, as every
template does: the step slices are loads at row t, closed-over values are loads, pointwise work
and views are index arithmetic and tile ops. Two kinds of node the Evaluator does not place are
done here: a reduction over a non-leading axis (tl.sum / max / min along that tile axis) and a
matmul ``[L, K] @ [K, N]`` of a rank-2 carry-dependent value by anything evaluable (tl.dot over
the whole K; the weight's tile is read at every step, from L2 on a GPU). The step's outputs are
stored at t, the carries kept (lanes past the end held at zero, so a contraction over them adds
nothing), and after the last step the final carries stored. The carries live in their own dtype
between steps, as the step-by-step form keeps them.

What it does not take (LoweringError, with the reason ``explain()`` prints): carries of
different shapes or of rank 0, a body that mixes the rows of the leading axis (a reduction or a
contraction over it), a carry read at other indices than its own (a shifted or transposed
read), a matmul of rank other than 2, a step output without the leading axis first, and nodes
of other kinds (softmax, sort, ...). Gated outer-product recurrences (GLA) also get a chunked
form (passes/lower_chunked_scan.py), chosen past SEQUENTIAL_MAX_STEPS steps. Not built yet:
``tl.associative_scan`` over the steps.
"""
from __future__ import annotations

from ..ir import registry
from ..ir.dims import Dim
from ..ir.graph import Graph, Value
from ..ir.prims_scan import scan_layout
from ..ir.registry import Kind
from ..ir.tile import Alternative, GridDim, Guard, TExpr, Tunable
from ..ir.tile_builder import TileBuilder, broadcast
from ..ir.types import DType, ScalarType, TensorType
from .groups import FusedGraph, Group
from .lower_eval import Ctx, Evaluator, LoweringError, address, conjuncts
from .lower_matmul import f32_precision
from .lower_row import IDENTITY, kernel_name

REDUCTIONS = {"sum": "sum", "mean": "sum", "max": "max", "min": "min"}
TILE_MAX = 1 << 15


# the largest whole (untiled) extent of a program's carry tile: a matmul's weight tile is that
# square (128 x 128 f32: 64 KiB of shared memory for the dot's operand); other bodies keep
# [BLOCK_L, extent, BLOCK_D] tiles in registers
WHOLE_MAX_DOT = 128
WHOLE_MAX = 256


# a scan in the chunked form (passes/lower_chunked_scan.py) runs sequentially up to this many
# steps (decoding), in chunks beyond
SEQUENTIAL_MAX_STEPS = 8
CHUNKED_E_MAX = 256


def lower_recurrence(fg: FusedGraph, group: Group) -> list:
    """The sequential kernel, guarded by the extent a program keeps whole (runtime/scan.py runs
    the steps where no alternative's guard holds); for a gated outer-product recurrence, the
    chunked kernel past SEQUENTIAL_MAX_STEPS steps."""
    from .lower_chunked_scan import chunked_alternative
    (node,) = group.nodes
    r = Recurrence(fg, group, node)
    kernel = r.kernel()
    whole: Dim = 1
    for d in range(1, len(r.shape)):
        if d not in r.tiled:
            whole = whole * r.shape[d]
    limit = WHOLE_MAX_DOT if r.has_dot else WHOLE_MAX
    E = r.shape[-2] if len(r.shape) >= 3 else 1
    try:
        chunked = chunked_alternative(fg, group, node, kernel_name(fg, group, "_chunked"),
                                      Guard("at_most", (E, CHUNKED_E_MAX)))
    except LoweringError:
        chunked = None           # a form the detection let through but the template cannot place
    if chunked is not None:
        length = node.attrs["length"]
        return [Alternative((kernel,), Guard("both_at_most", (length, SEQUENTIAL_MAX_STEPS, whole, limit))), chunked]
    if whole == 1:
        return [(kernel, None, 0)]
    return [(kernel, whole, limit)]


class _BodyEvaluator(Evaluator):
    """The Evaluator over the body graph: the step index is the loop's, a closed-over value is
    the scan's operand (its buffer), a step slice is a load at row t."""

    def __init__(self, b, body_fg, group, index: Value | None, step: TExpr):
        super().__init__(b, body_fg, group)
        self.index, self.step = index, step

    def scalar(self, v: Value) -> TExpr:
        """The step index, a literal, a closed-over scalar argument, or a scalar the body
        computes from those (``cast(t, f32)``), computed in the kernel."""
        if v is self.index:
            return self.step
        n = self.producer.get(v)
        if n is not None and n.op != "const":
            prim = registry.get(n.op)
            if prim.kind is not Kind.POINTWISE or any(not isinstance(x.type, ScalarType) for x in n.inputs):
                raise LoweringError(f"{self.group.name}: the body's scalar {n.op} is not computable in the kernel", n)
            return self.b.let(prim.extra["tile"](self.b, [self.scalar(x) for x in n.inputs], dict(n.attrs)),
                              v.name or n.op)
        if n is None and v not in self.fg.names:
            raise LoweringError(f"{self.group.name}: the scalar '{v.name}' of the body has no value in the kernel")
        return super().scalar(v)


def body_evaluator(b: TileBuilder, fg: FusedGraph, group: Group, node, body: Graph, step: TExpr,
                   carry_read: str) -> _BodyEvaluator:
    """The Evaluator over a scan's ``body`` (its node's, or one with nodes added) in a kernel of
    the scan: closed-over values read from the scan's operands' buffers, a step slice from its
    input at index ``step`` (a scalar, or a tile of steps) along the sliced axis, the carries
    only where a template binds them (elsewhere a LoweringError: the carry ``carry_read``)."""
    a = node.attrs
    first, k = (1 if a["uses_index"] else 0), a["carries"]
    params = [p.value for p in body.params]
    carried, sliced, _ = scan_layout(a)
    closed = zip(params[first + k + sliced:], node.inputs[carried + sliced:])
    names = {}
    for p, x in closed:
        if x in fg.names:
            names[p] = fg.names[x]
        elif isinstance(p.type, TensorType):
            raise LoweringError(f"{group.name}: the body reads a value ({p.name}) that is not in memory")
    grp = Group(group.name, "recurrence", body.nodes, ())
    ev = _BodyEvaluator(b, FusedGraph(body, (grp,), (), names), grp, params[0] if first else None, step)

    def unreadable(c: Value):
        def value(ctx: Ctx):
            raise LoweringError(f"{group.name}: the carry '{c.name}' {carry_read}")
        return value
    for c in params[first:first + k]:
        ev.special[c] = unreadable(c)

    def step_slice(x: Value, axis: int):
        def value(ctx: Ctx):
            idx = list(ctx.idx)
            idx.insert(axis, step)
            return ev.load_buffer(fg.names[x], x.type.dtype, idx, x.type.shape, ctx.mask)
        return value
    for p, x, axis in zip(params[first + k:first + k + sliced], node.inputs[carried:carried + sliced], a["slice_axes"]):
        ev.special[p] = step_slice(x, axis)
    return ev


class Recurrence:
    def __init__(self, fg: FusedGraph, group: Group, node):
        self.fg, self.group, self.node = fg, group, node
        a = node.attrs
        self.body: Graph = a["body"]
        self.k = a["carries"]
        first = 1 if a["uses_index"] else 0
        params = [p.value for p in self.body.params]
        self.carries = params[first:first + self.k]
        carried, _, _ = scan_layout(a)
        self.inits = node.inputs[:carried]
        shapes = {tuple(c.type.shape) for c in self.carries}
        if len(shapes) != 1:
            raise LoweringError(f"{group.name}: the carries have different shapes "
                                f"({', '.join(str(c.type) for c in self.carries)})")
        self.shape = tuple(self.carries[0].type.shape)
        if not self.shape:
            raise LoweringError(f"{group.name}: a carry of rank 0 (no axis to tile)")
        self.name = kernel_name(fg, group)
        self.b = TileBuilder(self.name)
        self.has_dot = any(n.op == "matmul" for n in self.body.nodes)
        self.fresh: dict = {}
        self.k_rows: dict = {}
        self.dims = self._dims()
        self.tiled = self._tiled()

    # -- the tile space ------------------------------------------------------------------------
    def _axis_index(self, d: int, block: str) -> TExpr:
        b = self.b
        i = b.arange(block)
        for pos in range(len(self.shape)):
            if pos != d:
                i = b.expand_dims(i, pos)
        return i

    def index_for(self, d: int, size: Dim) -> TExpr | None:
        """The index tile along tile axis d over ``size`` elements: the carry's own where the
        size is the carry's, else a tile of its own (memoised, so two reads share it)."""
        if size == 1:
            return None
        if d < len(self.idx) and size == self.shape[d] and self.idx[d] is not None:
            return self.idx[d]
        if d in self.tiled:
            raise LoweringError(f"{self.group.name}: a value of {size} elements along the carries' axis {d} "
                                f"({self.shape[d]}), which the grid tiles")
        key = (d, size)
        if key not in self.fresh:
            t = Tunable(f"BLOCK_X{len(self.fresh)}", covers=size, lo=16 if self.has_dot else 1, hi=TILE_MAX)
            self.b.tunable(t)
            self.fresh[key] = self.b.let(self._axis_index(d, t.name), f"x{len(self.fresh)}")
        return self.fresh[key]

    def ctx(self, idx, sizes) -> Ctx:
        """The context of these indices: the carries' own (and its mask, so that what was
        evaluated there is reused) where they are the carries' indices."""
        if tuple(idx) == tuple(self.canon.idx):
            return self.canon
        return Ctx(tuple(idx), self.mask_of(idx, sizes))

    def rows_of(self, block: str) -> TExpr:
        """arange(block) along tile axis 0: a dot's K index for its right operand."""
        if block not in self.k_rows:
            self.k_rows[block] = self.b.let(self.b.expand_dims(self.b.arange(block), 1), "k_rows")
        return self.k_rows[block]

    def mask_of(self, idx, sizes) -> TExpr | None:
        m = None
        for i, s in zip(idx, sizes):
            if i is not None:
                term = self.b.lt(i, self.b.size(s))
                m = term if m is None else self.b.and_(m, term)
        return m

    def _dims(self) -> dict:
        """Which tile axis each axis of each body value runs along, where it follows from the
        carries (None where not known): pointwise results align their operands from the right,
        views keep or permute them, reductions drop them, a matmul keeps its rows' axis."""
        R = len(self.shape)
        dims: dict = {c: tuple(range(R)) for c in self.carries}
        for n in self.body.nodes:
            if not n.outputs or not isinstance(n.out.type, TensorType):
                continue
            out = tuple(n.out.type.shape)
            ins = [(tuple(v.type.shape), dims.get(v)) for v in n.inputs if isinstance(v.type, TensorType)]
            got: list = [None] * len(out)
            if n.op in ("reshape",):
                src, dsrc = ins[0]
                if dsrc is not None and [d for d in src if d != 1] == [d for d in out if d != 1]:
                    kept = iter([dd for dd, s in zip(dsrc, src) if s != 1])
                    got = [None if s == 1 else next(kept) for s in out]
            elif n.op in ("transpose", "permute"):
                src, dsrc = ins[0]
                if dsrc is not None:
                    if n.op == "transpose":
                        got = list(dsrc)
                        got[n.attrs["a"]], got[n.attrs["b"]] = got[n.attrs["b"]], got[n.attrs["a"]]
                    else:
                        got = [dsrc[p] for p in n.attrs["perm"]]
            elif n.op in REDUCTIONS:
                src, dsrc = ins[0]
                if dsrc is not None:
                    axes = n.attrs["axis"]
                    got = [None if i in axes else dd for i, dd in enumerate(dsrc)] if n.attrs["keepdim"] else \
                        [dd for i, dd in enumerate(dsrc) if i not in axes]
            elif n.op == "matmul":
                (sa, da), (sb, db) = ins
                got = [None] * len(out)
                if da is not None and len(sa) >= 2:
                    got[-2] = da[-2]
                if db is not None and len(sb) >= 2:
                    got[-1] = db[-1]
            else:                   # pointwise, slice, expand, cast: aligned from the right
                for s, ds in ins:
                    if ds is None:
                        continue
                    off = len(out) - len(s)
                    for i, (sz, dd) in enumerate(zip(s, ds)):
                        if off + i >= 0 and sz != 1 and got[off + i] is None:
                            got[off + i] = dd
            dims[n.out] = tuple(got)
        return dims

    def _tiled(self) -> tuple[int, ...]:
        """The carry axes the grid tiles: the leading one, and every other that no reduction
        reduces and no matmul contracts (GLA's value axis, a channel axis), where the dims
        analysis can tell; an axis it cannot place counts as contracted."""
        R = len(self.shape)
        contracted: set = set()
        for n in self.body.nodes:
            if n.op in REDUCTIONS:
                x = n.inputs[0]
                over = [(ax, x.type.shape[ax]) for ax in n.attrs["axis"]]
                d_x = self.dims.get(x, (None,) * x.type.rank)
            elif n.op == "matmul":
                x = n.inputs[0]
                over = [(x.type.rank - 1, x.type.shape[-1])]
                d_x = self.dims.get(x, (None,) * x.type.rank)
            else:
                continue
            for ax, size in over:
                d = d_x[ax] if ax < len(d_x) else None
                if d is not None:
                    contracted.add(d)
                else:
                    contracted |= {f for f in range(1, R) if self.shape[f] == size} or set(range(1, R))
        return (0,) + tuple(d for d in range(1, R) if d not in contracted and self.shape[d] != 1)

    # -- the kernel ----------------------------------------------------------------------------
    def kernel(self):
        b, a = self.b, self.node.attrs
        R = len(self.shape)
        if len(self.tiled) > 3:
            raise LoweringError(f"{self.group.name}: {len(self.tiled)} independent carry axes (the grid has 3)")
        small = (16, 32, 64) if self.has_dot else (1, 2, 4, 8)
        blocks: list = [Tunable("BLOCK_L", small, cpu=16 if self.has_dot else 2)]
        for d in range(1, R):
            if d in self.tiled:
                blocks.append(Tunable(f"BLOCK_D{d}", (16, 32, 64), cpu=16))
            else:
                blocks.append(Tunable(f"BLOCK_D{d}", covers=self.shape[d], lo=16 if self.has_dot else 1, hi=TILE_MAX))
        lead = blocks[0]
        for t in blocks:
            b.tunable(t)
        b.comment("program ids -> the tile of the carries this program keeps (axes no step mixes)")
        self.idx: list = []
        for g, d in enumerate(self.tiled):
            pid = b.let(b.program_id(g), f"pid_{d}")
            i = b.add(b.mul(pid, b.tunable(blocks[d])), self._axis_index(d, blocks[d].name))
            self.idx.append((d, b.let(b.cast(i, DType.i64), "rows" if d == 0 else f"i{d}")))
        for d in range(1, R):
            if d not in self.tiled:
                self.idx.append((d, None if self.shape[d] == 1 else b.let(self._axis_index(d, blocks[d].name), f"i{d}")))
        self.idx = [i for _, i in sorted(self.idx, key=lambda x: x[0])]
        mask = b.let(self.mask_of(self.idx, self.shape), "mask")
        self.canon = Ctx(tuple(self.idx), mask)
        full = tuple(lead.name if d == 0 else (blocks[d].name if self.shape[d] != 1 else 1) for d in range(R))

        b.comment("the carries, on chip for all steps")
        fills = a["fills"]
        inits = iter(self.inits)
        vars_ = []
        for c, fill in zip(self.carries, fills):
            dt = c.type.dtype
            if fill is not None:
                tile = b.full(full, fill, dt)
            else:
                src = next(inits)
                ptr = address(b, self.fg.names[src], dt, self.idx, src.type.shape)
                tile = b.broadcast_to(b.load(ptr, mask), full)
            vars_.append(b.declare(b.cast(tile, dt), c.name or "carry"))

        length = a["length"]
        with b.loop("i", 0, b.size(length), 1) as i:
            step = b.sub(b.sub(b.size(length), 1), i) if a["reverse"] else i
            step = b.let(b.cast(step, DType.i64), "t")
            ev = self._evaluator(step)
            for c, v in zip(self.carries, vars_):
                ev.bind(c, self.canon, v)
            b.comment("this step's next carries and outputs")
            nexts = [ev(v, self.canon) for v in self.body.outputs[:self.k]]
            for j, v in enumerate(self.node.outputs[:len(self.body.outputs) - self.k]):
                if v not in self.group.outputs:
                    continue
                o = self.body.outputs[self.k + j]
                ctx = self.output_ctx(o)
                at = [step] + list(ctx.idx)
                b.store(address(b, self.fg.buffer(self.group, v), v.type.dtype, at, v.type.shape), ev(o, ctx), ctx.mask)
            for c, v, nxt in zip(self.carries, vars_, nexts):
                b.assign(v, b.cast(b.where(mask, b.broadcast_to(nxt, full), 0.0), c.type.dtype))
        b.comment("the final carries")
        m = len(self.body.outputs) - self.k
        for v, var in zip(self.node.outputs[m:], vars_):
            if v in self.group.outputs:
                b.store(address(b, self.fg.buffer(self.group, v), v.type.dtype, self.idx, v.type.shape), var, mask)
        streamed = " (each matmul's weight tile read at every step)" if self.has_dot else ""
        return b.kernel([GridDim.of(self.shape[d], blocks[d].name) for d in self.tiled],
                        doc=f"{self.group.name} (scan): the carries on chip, {length} steps in one program "
                            f"per tile of the leading axis{streamed}",
                        warps=(4, 8) if self.has_dot else (1, 2, 4, 8), family="recurrence")

    def output_ctx(self, o: Value) -> Ctx:
        shape = tuple(o.type.shape)
        dims = list(self.dims.get(o, (None,) * len(shape)))
        if not shape or shape[0] != self.shape[0] or dims[0] not in (0, None):
            raise LoweringError(f"{self.group.name}: a step output of shape {o.type} does not have the carries' "
                                f"leading axis ({self.shape[0]}) first")
        dims[0] = 0
        used = {d for d in dims if d is not None}
        if len(used) != len([d for d in dims if d is not None]):
            raise LoweringError(f"{self.group.name}: a step output's axes run along one carry axis twice")
        free = [d for d in range(len(self.shape)) if d not in used]
        for ax, d in enumerate(dims):
            if d is None and shape[ax] != 1:
                same = [f for f in free if self.shape[f] == shape[ax]]
                pick = (same or free or [None])[0]
                if pick is None:
                    raise LoweringError(f"{self.group.name}: a step output of shape {o.type} has more axes than the carries")
                dims[ax] = pick
                free.remove(pick)
        idx = [self.index_for(d, s) if d is not None else None for d, s in zip(dims, shape)]
        return self.ctx(idx, shape)

    # -- evaluation ----------------------------------------------------------------------------
    def _evaluator(self, step: TExpr) -> _BodyEvaluator:
        ev = body_evaluator(self.b, self.fg, self.group, self.node, self.body, step,
                            "is read at other indices than its own (a shifted, transposed or broadcast read)")
        for n in self.body.nodes:
            if n.op in REDUCTIONS:
                ev.special[n.out] = ev.memoised(self._reduction(ev, n))
            elif n.op == "matmul":
                ev.special[n.out] = ev.memoised(self._matmul(ev, n))
        return ev

    def _spanned(self, idx) -> set:
        out: set = set()
        for i in idx:
            if i is not None:
                out |= {d for d, s in enumerate(i.shape) if s != 1}
        return out

    def _reduction(self, ev: Evaluator, n):
        b = self.b
        kind = REDUCTIONS[n.op]
        x = n.inputs[0]
        axes, keep = n.attrs["axis"], n.attrs["keepdim"]

        def value(ctx: Ctx):
            if keep:
                idx = list(ctx.idx)
            else:
                it = iter(ctx.idx)
                idx = [None if i in axes else next(it) for i in range(x.type.rank)]
            taken = self._spanned(idx)
            over, bounds = [], []
            for ax in axes:
                size = x.type.shape[ax]
                if size == 1:
                    idx[ax] = None
                    continue
                d = self.dims.get(x, (None,) * x.type.rank)[ax]
                if d is None or d in taken:
                    free = [f for f in range(len(self.shape)) if f not in taken]
                    same = [f for f in free if self.shape[f] == size]
                    if not (same or free):
                        raise LoweringError(f"{self.group.name}: a reduction needs more tile axes than the carries have", n)
                    d = (same or free)[0]
                if d == 0:
                    raise LoweringError(f"{self.group.name}: {n.op} over the carries' leading axis mixes the rows "
                                        f"the programs keep apart", n)
                idx[ax] = self.index_for(d, size)
                taken.add(d)
                over.append(d)
                bounds.append(b.lt(idx[ax], b.size(size)))
            # the caller's mask says which of ITS lanes are wanted: its terms along a reduced axis
            # (a concat's branch, a broadcast read's range) are not about the summed lanes
            kept = [c for c in (conjuncts(b, ctx.mask) if ctx.mask is not None else [])
                    if not self._spanned([c]) & set(over)]
            mask = None
            for term in kept + bounds:
                mask = term if mask is None else b.and_(mask, term)
            if tuple(idx) == tuple(self.canon.idx):
                mask = self.canon.mask
            tile = ev(x, Ctx(tuple(idx), mask))
            if mask is not None:
                tile = b.broadcast_to(tile, broadcast(tuple(tile.shape), tuple(mask.shape)))
                tile = b.where(mask, tile, IDENTITY[kind])
            for d in over:
                tile = b.reduce(tile, d, kind, propagate_nan=kind != "sum")
            if n.op == "mean":
                count: Dim = 1
                for ax in axes:
                    count = count * x.type.shape[ax]
                tile = b.truediv(tile, b.cast(b.size(count), DType.f32))
            return b.let(tile, n.out.name or n.op)
        return value

    def _matmul(self, ev: Evaluator, n):
        b = self.b
        A, B = n.inputs

        def value(ctx: Ctx):
            if A.type.rank != 2 or B.type.rank != 2 or len(self.shape) != 2:
                raise LoweringError(f"{self.group.name}: a matmul in the body of rank {A.type.rank} x {B.type.rank} "
                                    f"(this lowering takes [L, K] @ [K, N] with rank-2 carries)", n)
            i_m, i_n = ctx.idx
            if i_m is None or self._spanned([i_m]) != {0} or (i_n is not None and self._spanned([i_n]) != {1}):
                raise LoweringError(f"{self.group.name}: a matmul whose rows are not the carries' leading axis", n)
            K = A.type.shape[1]
            i_k = self.index_for(1, K)
            if i_k is None:
                raise LoweringError(f"{self.group.name}: a matmul over K = 1", n)
            block_k = i_k.shape[1]
            i_k_rows = self.rows_of(block_k)
            a_ctx = self.ctx((i_m, i_k), (self.shape[0], K))
            a_mask = a_ctx.mask
            at = ev(A, a_ctx)
            at = b.where(a_mask, b.broadcast_to(at, broadcast(tuple(at.shape), tuple(a_mask.shape))), 0.0)
            b_mask = b.lt(i_k_rows, b.size(K))
            if i_n is not None:      # lanes of the tile past the output's end read in bounds; their results are masked
                b_mask = b.and_(b_mask, b.lt(i_n, b.size(B.type.shape[1])))
            bt = ev(B, Ctx((i_k_rows, i_n), b_mask))
            bt = b.where(b_mask, b.broadcast_to(bt, broadcast(tuple(bt.shape), tuple(b_mask.shape))), 0.0)
            da, db = A.type.dtype, B.type.dtype            # the operands' own dtypes (the masks' 0.0 is f32)
            wide = da if da == db and da in (DType.f16, DType.bf16) else DType.f32
            at, bt = b.let(b.cast(at, wide), "lhs"), b.let(b.cast(bt, wide), "rhs")
            acc = b.full((at.shape[0], bt.shape[1]), 0.0, DType.f32)
            out = b.dot(at, bt, acc, f32_precision() if wide == DType.f32 else None)
            return b.let(out, n.out.name or "mm")
        return value

