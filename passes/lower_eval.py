"""Evaluating level-1 values as tiles: the heart of lowering.

A *context* gives, for each axis of a value, the tile of indices at which the kernel wants it
(None for "index 0", a broadcast axis), and the mask of valid lanes. Evaluating a value at a
context emits tile IR:
- a stored value (a parameter or another group's output) becomes a masked load at
  ``base + sum(index * stride)``;
- a pointwise node evaluates its operands at the broadcast contexts and applies its primitive's
  tile lowering (ir/prims_elementwise.py);
- glue changes the context and recurses: permute/transpose reorder it, slice shifts and scales
  it, expand zeroes broadcast axes, reshape linearises and splits it, concat selects between
  its operands with masks, gather_rows loads indices and uses them, causal compares indices.
So views, concats and gathers never touch memory; they are index arithmetic on the loads.
Values the template has already computed for a context (a reduction's result, a matmul's
accumulator) are *bound* and returned as they are. Results are memoised per (value, context).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir import fp8, registry
from ..ir.dims import Dim
from ..ir.graph import Node, Value
from ..ir.registry import Kind
from ..ir.tile import TExpr
from ..ir.tile_builder import TileBuilder, broadcast
from ..ir.types import DType, ScalarType
from .fusion import FusedGraph, Group, node_class


class LoweringError(Exception):
    """The template cannot lower this group as formed. ``node`` is the node it could not place
    (evaluate at the context it needed, or store), where known: passes/plan.py then forms the
    groups again with that node in a group of its own."""

    def __init__(self, message: str, node: Node | None = None):
        super().__init__(message)
        self.node = node


@dataclass(frozen=True, eq=False)
class Ctx:
    idx: tuple            # TExpr | None per axis of the value
    mask: TExpr | None

    def key(self):
        return (tuple(None if i is None else id(i) for i in self.idx),
                None if self.mask is None else id(self.mask))

    def with_idx(self, idx) -> "Ctx":
        return Ctx(tuple(idx), self.mask)


class Evaluator:
    def __init__(self, b: TileBuilder, fg: FusedGraph, group: Group):
        self.b = b
        self.fg = fg
        self.group = group
        self.inside = set(group.nodes)
        self.producer: dict[Value, Node] = fg.graph.producers()
        self.memo: dict = {}
        self.bound: dict = {}          # (value, index key) -> tile
        self.special: dict = {}        # value -> function(ctx) -> tile, for any context
        self.loads: set[str] = set()   # buffers this kernel reads
        self._keep: list = []          # contexts kept alive so their ids stay unique

    # -- entry points --------------------------------------------------------------------------
    def bind(self, v: Value, ctx: Ctx, tile) -> None:
        """The template already has v at this context (a mask does not change a value): a tile,
        or a function of the context for values computed from bound ones (softmax)."""
        self._keep.append(ctx)
        self.bound[(v, index_key(v, ctx))] = tile

    def __call__(self, v: Value, ctx: Ctx) -> TExpr:
        self._keep.append(ctx)
        hit = self.bound.get((v, index_key(v, ctx)))
        if hit is not None:
            return hit(ctx) if callable(hit) else hit
        if v in self.special:
            return self.special[v](ctx)
        key = (v, ctx.key())
        hit = self.memo.get(key)
        if hit is not None and self._open(hit[1]):
            return hit[0]      # reuse only while the block that computed it is still open
        out = self._eval(v, ctx)
        self.memo[key] = (out, id(self.b.blocks[-1]))
        return out

    def memoised(self, fn):
        """A special (a function of the context) whose tiles are reused as evaluated ones are:
        per context, while the block that computed them is open."""
        cache: dict = {}

        def value(ctx: Ctx) -> TExpr:
            key = ctx.key()
            hit = cache.get(key)
            if hit is not None and self._open(hit[1]):
                return hit[0]
            self._keep.append(ctx)
            out = fn(ctx)
            cache[key] = (out, id(self.b.blocks[-1]))
            return out
        return value

    def _open(self, block_id: int) -> bool:
        return block_id in {id(blk) for blk in self.b.blocks}

    # -- dispatch ------------------------------------------------------------------------------
    def is_base(self, v: Value) -> bool:
        n = self.producer.get(v)
        if n is None:
            return True           # a parameter
        if n in self.inside:
            return False
        return node_class(n, self.fg.recompute) == "compute"

    def _eval(self, v: Value, ctx: Ctx) -> TExpr:
        if isinstance(v.type, ScalarType):
            return self.scalar(v)
        if self.is_base(v):
            return self.load(v, ctx)
        n = self.producer[v]
        prim = registry.get(n.op)
        if n.op in GLUE:
            return GLUE[n.op](self, n, v, ctx)
        if prim.kind is Kind.POINTWISE:   # in the group, or recomputed here (fg.recompute)
            return self.pointwise(n, ctx)
        raise LoweringError(f"{self.group.name}: {n.op} is not evaluable at a context here", n)

    def scalar(self, v: Value) -> TExpr:
        n = self.producer.get(v)
        if n is not None and n.op == "const":
            return self.b.const(n.attrs["value"], n.attrs["dtype"])
        return self.b.scalar(self.fg.names[v], v.type.dtype)

    def load(self, v: Value, ctx: Ctx) -> TExpr:
        return self.load_buffer(self.fg.names[v], v.type.dtype, ctx.idx, v.type.shape, ctx.mask)

    def load_buffer(self, name: str, dtype: DType, idx, shape, ctx_mask) -> TExpr:
        """Buffer ``name`` (of ``shape``) at indices ``idx`` under a context's mask, in the
        context's tile shape (a scan's step slice passes its step index among ``idx``)."""
        self.loads.add(name)
        ptr = address(self.b, name, dtype, idx, shape)
        # the tile the indices span (an index along a size-1 axis counts: its mask term says
        # "index 0 only", though the address ignores it)
        spanned = ()
        for i in idx:
            if i is not None:
                spanned = broadcast(spanned, tuple(i.shape))
        mask = narrow_mask(self.b, ctx_mask, spanned if spanned else ptr.shape)
        tile = self.b.load(ptr, mask)
        if mask is not ctx_mask:     # the context's tile shape, as consumers expect (no memory)
            full = self.b.load(ptr, ctx_mask).shape
            if tuple(tile.shape) != tuple(full):
                tile = self.b.broadcast_to(self.b.let(tile, f"{name}_row"), full)
        return self.b.let(tile, f"{name}_tile")

    def pointwise(self, n: Node, ctx: Ctx) -> TExpr:
        out_shape = n.out.type.shape
        args = []
        for x in n.inputs:
            if isinstance(x.type, ScalarType):
                args.append(self.scalar(x))
            else:
                args.append(self(x, broadcast_ctx(ctx, out_shape, x.type.shape)))
        tile = registry.get(n.op).extra["tile"](self.b, args, dict(n.attrs))
        return self.b.let(tile, n.out.name or n.op)

    # -- helpers for templates -----------------------------------------------------------------
    def size(self, d: Dim) -> TExpr:
        return self.b.size(d)


def conjuncts(b: TileBuilder, m: TExpr) -> list[TExpr]:
    """The terms of a mask that is a chain of ``&`` (through let-bound variables)."""
    d = b.defs.get(m.name) if m.op == "var" else m
    if d is not None and d.op == "and" and d.dtype == DType.bool:
        return conjuncts(b, d.args[0]) + conjuncts(b, d.args[1])
    return [m]


def narrow_mask(b: TileBuilder, mask: TExpr | None, shape: tuple) -> TExpr | None:
    """The mask of a load whose indices span less than the context (a per-column scale read
    inside a K loop: indices [1, BLOCK_N], mask [BLOCK_K, BLOCK_N]): without the terms that vary
    only along axes the indices do not, so the load stays [1, BLOCK_N] instead of a full tile
    (Triton would pipeline every copy through shared memory). The lanes it now reads are at
    addresses the kept terms already make valid, and the value is the same along the dropped
    axes; consumers mask what they reduce or multiply (reductions and computed dot operands go
    through tl.where)."""
    if mask is None or not shape or tuple(mask.shape) == tuple(shape):
        return mask
    rank = max(len(shape), len(mask.shape))
    p = (1,) * (rank - len(shape)) + tuple(shape)
    kept, dropped = [], False
    for c in conjuncts(b, mask):
        cs = (1,) * (rank - len(c.shape)) + tuple(c.shape)
        if all(x == 1 or y != 1 for x, y in zip(cs, p)):
            kept.append(c)
        elif all(x == 1 or y == 1 for x, y in zip(cs, p)):
            dropped = True
        else:
            return mask          # a term over the pointer's axes and others: keep it whole
    if not dropped or not kept:
        return mask
    out = kept[0]
    for c in kept[1:]:
        out = b.and_(out, c)
    return out


def address(b: TileBuilder, name: str, dtype: DType, idx, shape=None) -> TExpr:
    """The pointer to element ``idx`` of buffer ``name``: base + sum(index * stride). Axes whose
    index is None (index 0), or whose size in ``shape`` is 1, add nothing."""
    off = None
    for axis, i in enumerate(idx):
        if i is None or (shape is not None and shape[axis] == 1):
            continue
        term = b.mul(i, b.stride(name, axis))
        off = term if off is None else b.add(off, term)
    ptr = b.ptr(name, dtype)
    return ptr_add(ptr, off) if off is not None else ptr


def unflatten(b: TileBuilder, lin: TExpr, dims, tag: str) -> list:
    """Row-major indices of a flattened index over ``dims``; None for size-1 axes."""
    out: list = []
    inner = 1
    for a in reversed(range(len(dims))):
        d = dims[a]
        if d == 1:
            out.insert(0, None)
            continue
        q = b.floordiv(lin, b.size(inner)) if inner != 1 else lin
        out.insert(0, b.let(b.mod(q, b.size(d)) if a else q, f"{tag}{a}"))
        inner = inner * d
    return out


def index_key(v: Value, ctx: Ctx) -> tuple:
    """The indices that matter for v: an axis of size 1 is index 0 whatever the context says."""
    shape = v.type.shape
    return tuple(None if i is None or (k < len(shape) and shape[k] == 1) else id(i) for k, i in enumerate(ctx.idx))


def ptr_add(ptr: TExpr, offset: TExpr) -> TExpr:
    from ..ir.tile_builder import broadcast
    return TExpr("add", (ptr, offset), ptr.dtype, broadcast(ptr.shape, offset.shape))


def broadcast_ctx(ctx: Ctx, out_shape, in_shape) -> Ctx:
    """NumPy broadcasting: operand axes align to the right; size-1 axes read index 0."""
    off = len(out_shape) - len(in_shape)
    idx = []
    for k, d in enumerate(in_shape):
        idx.append(None if d == 1 else ctx.idx[k + off])
    return ctx.with_idx(idx)


# -- glue: context transformations -------------------------------------------------------------
def _permute(ev: Evaluator, n: Node, v: Value, ctx: Ctx) -> TExpr:
    perm = n.attrs["perm"]
    idx = [None] * len(perm)
    for i, p in enumerate(perm):
        idx[p] = ctx.idx[i]
    return ev(n.inputs[0], ctx.with_idx(idx))


def _transpose(ev: Evaluator, n: Node, v: Value, ctx: Ctx) -> TExpr:
    idx = list(ctx.idx)
    a, b = n.attrs["a"], n.attrs["b"]
    idx[a], idx[b] = idx[b], idx[a]
    return ev(n.inputs[0], ctx.with_idx(idx))


def _expand(ev: Evaluator, n: Node, v: Value, ctx: Ctx) -> TExpr:
    return ev(n.inputs[0], broadcast_ctx(ctx, v.type.shape, n.inputs[0].type.shape))


def _slice(ev: Evaluator, n: Node, v: Value, ctx: Ctx) -> TExpr:
    b = ev.b
    idx = []
    for i, start, step in zip(ctx.idx, n.attrs["starts"], n.attrs["steps"]):
        if i is None:
            idx.append(None if start == 0 else ev.size(start))
            continue
        j = b.mul(i, step) if step != 1 else i
        idx.append(b.add(j, ev.size(start)) if start != 0 else j)
    return ev(n.inputs[0], ctx.with_idx(idx))


def _reshape(ev: Evaluator, n: Node, v: Value, ctx: Ctx) -> TExpr:
    src = n.inputs[0].type.shape
    dst = v.type.shape
    if [d for d in src if d != 1] == [d for d in dst if d != 1]:
        # only size-1 axes come or go: the other axes keep their indices
        kept = iter([i for i, d in zip(ctx.idx, dst) if d != 1])
        return ev(n.inputs[0], ctx.with_idx([None if d == 1 else next(kept) for d in src]))
    b = ev.b
    lin = None   # the row-major linear index of the element, None while it is 0
    for i, d in zip(ctx.idx, dst):
        if lin is not None:
            lin = b.mul(lin, ev.size(d))
        if i is not None:
            lin = i if lin is None else b.add(lin, i)
    if lin is None:
        return ev(n.inputs[0], ctx.with_idx([None] * len(src)))
    lin = b.let(lin, "lin")
    idx = []
    inner: Dim = 1
    for d in reversed(src):
        if d == 1:
            idx.append(None)
            continue
        q = b.floordiv(lin, ev.size(inner)) if inner != 1 else lin
        idx.append(b.mod(q, ev.size(d)))
        inner = inner * d
    return ev(n.inputs[0], ctx.with_idx(list(reversed(idx))))


def _concat(ev: Evaluator, n: Node, v: Value, ctx: Ctx) -> TExpr:
    b = ev.b
    axis = n.attrs["axis"]
    i = ctx.idx[axis]
    if i is None:
        return ev(n.inputs[0], ctx)
    start: Dim = 0
    branches = []
    for x in n.inputs:
        size = x.type.shape[axis]
        lo, hi = ev.size(start), ev.size(start + size)
        inside = b.let(b.and_(b.binop("ge", i, lo), b.lt(i, hi)), "in_part")
        idx = list(ctx.idx)
        idx[axis] = b.sub(i, lo)
        tile = ev(x, Ctx(tuple(idx), b.and_(ctx.mask, inside)))
        branches.append((inside, tile))
        start = start + size
    out = branches[-1][1]
    for inside, tile in reversed(branches[:-1]):
        out = b.where(inside, tile, out)
    return b.let(out, "cat")


def _gather_rows(ev: Evaluator, n: Node, v: Value, ctx: Ctx) -> TExpr:
    table, ids = n.inputs
    r = ids.type.rank
    rows = ev(ids, ctx.with_idx(ctx.idx[:r]))
    rows = ev.b.let(ev.b.cast(rows, DType.i64), "row_ids")
    return ev(table, ctx.with_idx((rows,) + tuple(ctx.idx[r:])))


def _causal(ev: Evaluator, n: Node, v: Value, ctx: Ctx) -> TExpr:
    """j <= i + T - S, written j + S <= i + T so that no size argument is negative (S > T)."""
    b = ev.b
    i, j = (x if x is not None else b.const(0) for x in ctx.idx)
    S, T = n.attrs["S"], n.attrs["T"]
    if S == T:
        return b.let(b.binop("le", j, i), "causal")
    return b.let(b.binop("le", b.add(j, ev.size(S)), b.add(i, ev.size(T))), "causal")


def _arange(ev: Evaluator, n: Node, v: Value, ctx: Ctx) -> TExpr:
    """A position is its own index."""
    (i,) = ctx.idx
    return ev.b.let(ev.b.cast(i if i is not None else ev.b.const(0), DType.i64), "pos")


def _unpack_int4(ev: Evaluator, n: Node, v: Value, ctx: Ctx) -> TExpr:
    """u8 nibble k of row n: byte k // 2, low half for even k."""
    b = ev.b
    i_n, i_k = ctx.idx
    byte = ev(n.inputs[0], ctx.with_idx((i_n, b.floordiv(i_k, 2) if i_k is not None else None)))
    shift = b.mul(b.mod(i_k, 2), 4) if i_k is not None else 0
    return b.let(b.bitand(b.shr(byte, shift), 0xF), "nibble")


def _unpack_24(ev: Evaluator, n: Node, v: Value, ctx: Ctx) -> TExpr:
    """2:4: group g = k // 4 keeps values 2g and 2g+1 at the positions in its meta nibble."""
    b = ev.b
    vals, meta = n.inputs
    i_n, i_k = ctx.idx
    k = i_k if i_k is not None else b.const(0)
    grp = b.let(b.floordiv(k, 4), "group")
    pos = b.mod(k, 4)
    v0 = ev(vals, ctx.with_idx((i_n, b.mul(grp, 2))))
    v1 = ev(vals, ctx.with_idx((i_n, b.add(b.mul(grp, 2), 1))))
    byte = ev(meta, ctx.with_idx((i_n, b.floordiv(grp, 2))))
    nib = b.let(b.bitand(b.shr(byte, b.mul(b.mod(grp, 2), 4)), 0xF), "meta")
    i0, i1 = b.bitand(nib, 3), b.bitand(b.shr(nib, 2), 3)
    pos = b.cast(pos, i0.dtype)
    dense = b.where(b.binop("eq", pos, i0), v0, b.where(b.binop("eq", pos, i1), v1, 0.0))
    return b.let(b.cast(dense, v.type.dtype), "w24")


def _fp8_bits(ev: Evaluator, n: Node, v: Value, ctx: Ctx) -> TExpr:
    return ev.b.let(fp8.decode(ev.b, ev(n.inputs[0], ctx)), "fp8")


def _fill(ev: Evaluator, n: Node, v: Value, ctx: Ctx) -> TExpr:
    return ev.b.const(n.attrs["value"], n.attrs["dtype"])


def _unslice(ev: Evaluator, n: Node, v: Value, ctx: Ctx) -> TExpr:
    """The slice's values where the index is one the slice took ((i - start) / step for
    start <= i < stop on the step), zero elsewhere."""
    b = ev.b
    idx, inside = [], None
    for i, start, stop, step, d in zip(ctx.idx, n.attrs["starts"], n.attrs["stops"], n.attrs["steps"],
                                       n.out.type.shape):
        if start == 0 and step == 1 and stop == d:
            idx.append(i)
            continue
        i0 = i if i is not None else b.const(0)
        rel = b.sub(i0, ev.size(start)) if start != 0 else i0
        ok = b.and_(b.binop("ge", rel, 0), b.lt(i0, ev.size(stop)))
        if step != 1:
            ok = b.and_(ok, b.binop("eq", b.mod(rel, step), 0))
            rel = b.floordiv(rel, step)
        inside = b.and_(inside, ok)
        idx.append(rel)
    if inside is None:
        return ev(n.inputs[0], ctx.with_idx(idx))
    inside = b.let(inside, "in_slice")
    tile = ev(n.inputs[0], Ctx(tuple(idx), b.and_(ctx.mask, inside)))
    return b.let(b.where(inside, tile, 0.0), "unsliced")


def _scatter_along(ev: Evaluator, n: Node, v: Value, ctx: Ctx) -> TExpr:
    """out[.., j, ..] = sum over the k selections of src where idx == j (k unrolled)."""
    from ..ir.prims_select import SCATTER_ALONG_MAX
    b = ev.b
    src, ids = n.inputs
    axis = n.attrs["axis"]
    k = src.type.shape[axis]
    if not isinstance(k, int) or k > SCATTER_ALONG_MAX:
        raise LoweringError(f"{ev.group.name}: a scatter of {k} selections per position (the gradient of topk or take) "
                            f"is unrolled up to {SCATTER_ALONG_MAX}", n)
    j = ctx.idx[axis] if ctx.idx[axis] is not None else b.const(0)
    out = None
    for kk in range(k):
        sel = list(ctx.idx)
        sel[axis] = b.const(kk) if k != 1 else None
        c = Ctx(tuple(sel), ctx.mask)
        hit = b.binop("eq", b.cast(ev(ids, c), DType.i64), b.cast(j, DType.i64))
        term = b.where(hit, ev(src, c), 0.0)
        out = term if out is None else b.add(out, term)
    return b.let(out, "scattered")


def _take(ev: Evaluator, n: Node, v: Value, ctx: Ctx) -> TExpr:
    b = ev.b
    x, ids = n.inputs
    axis = n.attrs["axis"]
    at = b.let(b.cast(ev(ids, ctx), DType.i64), "taken")
    idx = list(ctx.idx)
    idx[axis] = at
    return ev(x, ctx.with_idx(idx))


GLUE = {"fill": _fill, "unslice": _unslice, "scatter_along": _scatter_along, "take": _take,
        "unpack_int4": _unpack_int4, "unpack_24": _unpack_24, "fp8_bits": _fp8_bits,
        "permute": _permute, "transpose": _transpose, "expand": _expand, "slice": _slice,
        "reshape": _reshape, "concat": _concat, "gather_rows": _gather_rows, "causal": _causal, "arange": _arange}
