"""Packed weights as GEMM B operands, read the way the specialist kernels read them.

Where it sits: inside the GEMM lowering (passes/lower_matmul.py); the weight layouts pass
(passes/layouts.py) made the B operand a dequantising expression over packed tensors, which
the evaluator would otherwise compute element by element, loading a packed byte once for each
element it holds (an int4 byte twice, a 2:4 byte of values and of metadata four and eight
times) and each group's scale and zero once per element.

Instead the K loop takes a step of ``phases * BLOCK_K`` and runs one dot per phase p over the
k = k0 + phases * r + p (r < BLOCK_K): a sum over K in any order is the same sum, and in each
phase every element of a packed byte is at the same position, so the packed tiles are loaded
once per step and the phases' B tiles are bit arithmetic on them:

- int4 (2 phases): the bytes ``packed[n, k0 / 2 + r]``; the low nibble is k = k0 + 2r, the
  high one k0 + 2r + 1. Each group's scale and zero are one [1, BLOCK_N] row per step: the
  step stays within a group (``phases * BLOCK_K`` divides G).
- 2:4 (8 phases): one metadata byte covers two groups of four k, i.e. 8 k; the step loads
  the bytes ``meta[n, k0 / 8 + r]`` and the four value tiles ``values[n, k0 / 2 + 4r + j]``
  (j < 4: two kept values of each of the two groups), and phase p's tile is the value whose
  position in its group (2 bits of the nibble) is p % 4, else 0.

The phases' A tiles are loads with a stride of ``phases`` (the same cache lines). The
evaluator is given these tiles as *specials* for the loop body (``install``), keyed by the
phases' K index tiles; any other context evaluates the unpacking as usual.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..ir.graph import Node, Value
from ..ir.tile import TExpr
from ..ir.tile_builder import TileBuilder
from .lower_eval import GLUE, Ctx, Evaluator, address, narrow_mask


def cone(ev: Evaluator, w: Value, stop) -> list:
    """Nodes of w's in-kernel cone (not past stored values) for which ``stop(node)`` holds;
    the walk does not go past them."""
    found, seen, todo = [], set(), [w]
    while todo:
        v = todo.pop()
        if v in seen or not hasattr(v.type, "shape") or ev.is_base(v):
            continue
        seen.add(v)
        n = ev.producer[v]
        if stop(n):
            found.append(n)
            continue
        todo.extend(n.inputs)
    return found


def per_group_source(ev: Evaluator, n: Node) -> tuple | None:
    """(n, v, G) when n is ``reshape(expand(reshape(v)))``, v[N, K/G] -> [N, K/G, 1] ->
    [N, K/G, G] -> [N, K] (each group's value repeated along K), else None."""
    if n.op != "reshape" or ev.is_base(n.inputs[0]):
        return None
    e = ev.producer[n.inputs[0]]
    if e.op != "expand" or ev.is_base(e.inputs[0]):
        return None
    r = ev.producer[e.inputs[0]]
    if r.op != "reshape":
        return None
    src = r.inputs[0]
    s3, out = e.out.type.shape, n.out.type.shape
    if src.type.rank != 2 or len(s3) != 3 or len(out) != 2 or tuple(r.out.type.shape[2:]) != (1,) or \
            tuple(s3[:2]) != tuple(src.type.shape) or out[0] != s3[0] or not isinstance(s3[2], int):
        return None
    return n, src, s3[2]


def inside(b: TileBuilder, idx: tuple, shape: tuple) -> TExpr:
    """The lanes whose indices are within ``shape`` (None: index 0, always inside)."""
    mask = None
    for i, d in zip(idx, shape):
        if i is not None:
            term = b.lt(i, b.size(d))
            mask = term if mask is None else b.and_(mask, term)
    return mask


def load_tile(ev: Evaluator, v: Value, idx: tuple, hint: str) -> TExpr:
    """A stored value's tile at ``idx``, masked to its own extent."""
    return ev.b.let(ev(v, Ctx(tuple(idx), inside(ev.b, idx, v.type.shape))), hint)


@dataclass
class PackedOperands:
    """The packed B operands of one GEMM group and the phases they share."""
    kind: str                          # "int4" or "s24"
    phases: int
    block_ks: tuple
    unpacks: list                      # the unpack_int4 / unpack_24 nodes
    groups: list = field(default_factory=list)     # int4: (reshape node, source, G)
    _saved: dict = field(default_factory=dict)

    @property
    def comment(self) -> str:
        what = {"int4": "even k (low nibbles) and odd k (high nibbles)",
                "s24": "k = k0 + 8r + p, p < 8 (one metadata byte, two groups of four)"}[self.kind]
        return f"K loop over {self.phases} * BLOCK_K, one dot per phase: {what}"

    @staticmethod
    def of(ev: Evaluator, operands: list) -> "PackedOperands | None":
        """The packed B operands of a GEMM, or None (the generic loop): no B operand packed,
        operands of two kinds, or int4 groups shorter than two K blocks of 16."""
        kinds = set()
        unpacks, groups = [], []
        for w in operands:
            for n in cone(ev, w, lambda n: n.op in ("unpack_int4", "unpack_24") or per_group_source(ev, n) is not None):
                if n.op in ("unpack_int4", "unpack_24"):
                    kinds.add(n.op)
                    unpacks.append(n)
                else:
                    groups.append(per_group_source(ev, n))
        if len(kinds) != 1:
            return None
        if kinds == {"unpack_24"}:
            return PackedOperands("s24", 8, (16, 32), unpacks) if not groups else None
        sizes = [g for _, _, g in groups]
        ks = tuple(k for k in (16, 32, 64) if all(g % (2 * k) == 0 for g in sizes))
        return PackedOperands("int4", 2, ks, unpacks, groups) if ks else None

    def phase_indices(self, b: TileBuilder, k0: TExpr, rk: TExpr) -> list:
        if self.phases == 2:
            even = b.let(b.add(k0, b.mul(rk, 2)), "ks_even")
            return [even, b.let(b.add(even, 1), "ks_odd")]
        base = b.let(b.add(k0, b.mul(rk, self.phases)), "ks_p0")
        return [base] + [b.let(b.add(base, p), f"ks_p{p}") for p in range(1, self.phases)]

    def presets(self, table) -> tuple:
        out = []
        for vals, w, st in table:
            v = dict(vals)
            v["BLOCK_K"] = max([k for k in self.block_ks if k <= v["BLOCK_K"] // self.phases] or [self.block_ks[0]])
            p = (tuple(v.items()), w, st)
            if p not in out:
                out.append(p)
        return tuple(out)

    # -- the loop body's specials ----------------------------------------------------------------
    def install(self, ev: Evaluator, kbs: list, k0: TExpr, rk: TExpr) -> None:
        phase = {id(kb): p for p, kb in enumerate(kbs)}
        r = ev.b.expand_dims(rk, 1)
        unpack = self._nibbles if self.kind == "int4" else self._sparse24
        for node in self.unpacks:
            self._special(ev, node.out, unpack(ev, node, phase, k0, r))
        for node, src, g in self.groups:
            self._special(ev, node.out, self._group_row(ev, node, src, g, phase, k0))

    def uninstall(self, ev: Evaluator) -> None:
        for v, old in self._saved.items():
            if old is None:
                ev.special.pop(v, None)
            else:
                ev.special[v] = old
        self._saved = {}

    def _special(self, ev: Evaluator, v: Value, fn) -> None:
        self._saved.setdefault(v, ev.special.get(v))
        ev.special[v] = fn

    @staticmethod
    def _phased(ev: Evaluator, node: Node, phase: dict, load, pick):
        """The special of an unpacking node: at a phase's K index, ``pick(tiles, p)`` of the
        tiles ``load(i_n)`` made once per step (and per column index); elsewhere the usual glue."""
        cache = {}

        def fn(ctx: Ctx):
            i_n, i_k = ctx.idx
            p = phase.get(id(i_k))
            if p is None:
                return GLUE[node.op](ev, node, node.out, ctx)
            if id(i_n) not in cache:
                cache[id(i_n)] = load(i_n)
            return pick(cache[id(i_n)], p)
        return fn

    @staticmethod
    def _nibbles(ev: Evaluator, node: Node, phase: dict, k0, r):
        b = ev.b

        def load(i_n):
            byte = load_tile(ev, node.inputs[0], (i_n, b.add(b.floordiv(k0, 2), r)), "packed")
            return b.let(b.bitand(byte, 0xF), "lo"), b.let(b.shr(byte, 4), "hi")
        return PackedOperands._phased(ev, node, phase, load, lambda tiles, p: tiles[p])

    @staticmethod
    def _sparse24(ev: Evaluator, node: Node, phase: dict, k0, r):
        b = ev.b
        vals, meta = node.inputs

        def load(i_n):
            base = b.let(b.add(b.floordiv(k0, 2), b.mul(r, 4)), "kv")
            v = [load_tile(ev, vals, (i_n, base if j == 0 else b.add(base, j)), f"v{j}") for j in range(4)]
            byte = load_tile(ev, meta, (i_n, b.add(b.floordiv(k0, 8), r)), "meta")
            slots = []
            for h, nib in enumerate((b.let(b.bitand(byte, 0xF), "meta_lo"), b.let(b.shr(byte, 4), "meta_hi"))):
                slots.append((b.let(b.bitand(nib, 3), f"pos0_{h}"), b.let(b.bitand(b.shr(nib, 2), 3), f"pos1_{h}")))
            return v, slots

        def pick(tiles, p):
            v, slots = tiles
            h, pos = divmod(p, 4)
            i0, i1 = slots[h]
            at = b.const(pos, i0.dtype)
            dense = b.where(b.binop("eq", i0, at), v[2 * h], b.where(b.binop("eq", i1, at), v[2 * h + 1], 0.0))
            return b.let(b.cast(dense, node.out.type.dtype), "w24")
        return PackedOperands._phased(ev, node, phase, load, pick)

    @staticmethod
    def _group_row(ev: Evaluator, node: Node, src: Value, g: int, phase: dict, k0):
        b, cache = ev.b, {}

        def fn(ctx: Ctx):
            i_n, i_k = ctx.idx
            if id(i_k) not in phase:
                return GLUE[node.op](ev, node, node.out, ctx)
            if id(i_n) not in cache:        # a [1, BLOCK_N] row: consumers broadcast it
                idx = (i_n, b.let(b.floordiv(k0, g), "group"))
                if not ev.is_base(src):
                    cache[id(i_n)] = ev(src, Ctx(idx, ctx.mask))
                else:
                    name = ev.fg.names[src]
                    ev.loads.add(name)
                    ptr = address(b, name, src.type.dtype, idx, src.type.shape)
                    cache[id(i_n)] = b.let(b.load(ptr, narrow_mask(b, ctx.mask, tuple(i_n.shape))), f"{name}_row")
            return cache[id(i_n)]
        return fn
