"""Sharding rules derived from a level-1 graph: what sharding one size symbol does to an op.

Where it sits: an analysis, not a rewrite. It reads the graph an op's kernels are built from
(the kernel graph: after inlining, canonicalisation and the fused-pattern rewrites) and is used by
runtime/sharding.py, which registers the result with DTensor, and by ``explain()``.

For each size symbol ``s`` of the tensor parameters it asks: if every input holding an axis of
size exactly ``s`` is split along that axis (the other inputs whole), and the op runs on each
rank's pieces with ``s`` bound to the local size, what is each result?
- ``Shard(axis)``: the rank's piece of the result along that axis (``s`` survives: batch,
  heads, sequence for row-wise work, the N of a column-parallel linear);
- ``Partial``: a partial sum, the result is the sum over ranks (``s`` is contracted or summed
  and only linear work follows: the K of a linear, the F of a SwiGLU MLP);
- ``Replicate``: the result does not depend on the split inputs;
- or *needs the whole axis*, with the node and the reason (a softmax, norm, mean, top-k or
  cumsum over it, a non-linear function of a partial sum, positions along it (causal, arange),
  its size used as a value).

It is an abstract interpretation: every value gets one state per symbol, propagated node by
node with one rule per kind of primitive (pointwise with broadcasting, reductions, matmul axes,
views, slices, gathers, attention); a primitive without a rule needs the whole axis whenever a
split value reaches it (never a wrong answer, at worst a redistribution). The rules only use
shapes and attributes, so a rule is computed once per op.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..ir.dims import Sym, free_symbols
from ..ir.graph import Graph, Node, Value
from ..ir.printer import print_graph  # noqa: F401  (the graphs these rules are read against)
from ..ir.types import TensorType


# -- states ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    """Split along ``axis``. Inside the op a split axis may also be merged with whole ones by a
    reshape (``within``: the merged sizes and the split one's place among them: [B, S, D] split
    along S, reshaped to [B * S, D], is axis 0 within ((B, S), 1)): rows of it are then split,
    not a contiguous range, which row-wise work, a sum over it or a reshape back may meet, but
    a result may not."""
    axis: int
    within: tuple | None = None

    def __str__(self):
        if self.within is None:
            return f"Shard({self.axis})"
        dims, i = self.within
        return f"Shard({self.axis}, {dims[i]} within {'*'.join(map(str, dims))})"

    def at(self, axis: int) -> "Shard":
        return Shard(axis, self.within)


@dataclass(frozen=True)
class _Rep:
    def __str__(self):
        return "Replicate"


@dataclass(frozen=True)
class _Partial:
    def __str__(self):
        return "Partial(sum)"


@dataclass(frozen=True)
class Whole:
    """The axis must be whole here: ``why`` says which node needs it and for what."""
    why: str

    def __str__(self):
        return f"needs the whole axis: {self.why}"


REP, PARTIAL = _Rep(), _Partial()
State = Shard | _Rep | _Partial | Whole


@dataclass(frozen=True)
class SymbolRule:
    """What sharding one symbol does: the placement of each tensor input (None for scalars) and
    of each result, or ``why`` it cannot be sharded (placements empty)."""
    symbol: str
    inputs: tuple[Any, ...] = ()        # Shard | REP | None (a scalar parameter)
    outputs: tuple[Any, ...] = ()       # Shard | REP | PARTIAL
    why: str | None = None

    @property
    def shardable(self) -> bool:
        return self.why is None

    @property
    def kind(self) -> str:
        if not self.shardable:
            return "whole"
        partial = any(o is PARTIAL for o in self.outputs)
        if partial and any(isinstance(o, Shard) for o in self.outputs):
            return "mixed"
        if partial:
            return "partial"
        if any(isinstance(o, Shard) for o in self.outputs):
            return "shard"
        return "replicate"


@dataclass(frozen=True)
class ShardingRule:
    op: str
    params: tuple[str, ...]
    symbols: tuple[SymbolRule, ...]

    def of(self, symbol: str) -> SymbolRule:
        return next(r for r in self.symbols if r.symbol == symbol)

    def text(self) -> str:
        """One line per symbol, as ``explain()`` shows it."""
        lines = []
        for r in self.symbols:
            if not r.shardable:
                lines.append(f"{r.symbol}: needs the whole axis ({r.why}): replicated before the call")
                continue
            ins = ", ".join(f"{n} {p}" for n, p in zip(self.params, r.inputs) if p is not None)
            outs = ", ".join(str(o) for o in r.outputs)
            says = {"shard": "survives", "partial": "contracted: partial sums",
                    "mixed": "survives in some results, partial sums in others",
                    "replicate": "results do not depend on it"}[r.kind]
            lines.append(f"{r.symbol}: {says}: {ins} -> {outs}")
        return "\n".join(lines)


# -- the analysis ------------------------------------------------------------------------------
def sharding_rule(g: Graph) -> ShardingRule:
    """The sharding rule of every size symbol of ``g``'s tensor parameters."""
    return ShardingRule(g.name, tuple(p.name for p in g.params), tuple(symbol_rule(g, s) for s in g.symbols))


def symbol_rule(g: Graph, s: str) -> SymbolRule:
    env: dict[Value, State] = {}
    placements = []
    for p in g.params:
        if not p.is_tensor:
            env[p.value] = REP
            placements.append(None)
            continue
        shape = p.value.type.shape
        exact = [i for i, d in enumerate(shape) if d == _sym(s)]
        inside = [d for d in shape if d != _sym(s) and s in free_symbols([d])]
        if inside:
            return SymbolRule(s, why=f"'{p.name}' has {s} inside the size {inside[0]}")
        if len(exact) > 1:
            return SymbolRule(s, why=f"'{p.name}' has two axes of size {s}")
        env[p.value] = Shard(exact[0]) if exact else REP
        placements.append(env[p.value])
    for n in g.nodes:
        outs = transfer(n, [env[v] for v in n.inputs], s)
        for v, st in zip(n.outputs, outs):
            env[v] = st
    results = []
    for i, v in enumerate(g.outputs):
        st = env[v]
        if isinstance(st, Shard) and (st.within is not None or v.type.shape[st.axis] != _sym(s)):
            st = Whole(f"result {i} is split along a merged axis {v.type.shape[st.axis]}")
        if isinstance(st, Whole):
            return SymbolRule(s, why=st.why)
        results.append(st)
    return SymbolRule(s, tuple(placements), tuple(results))


def _sym(s: str) -> Sym:
    return Sym.of(s)


def _mentions(x, s: str) -> bool:
    """Do the attribute values mention the symbol (a size computed from it)?"""
    if isinstance(x, Sym):
        return s in free_symbols([x])
    if isinstance(x, (tuple, list)):
        return any(_mentions(y, s) for y in x)
    return False


def _where(n: Node) -> str:
    at = f" at line {n.span.line}" if n.span is not None else ""
    return f"{n.op}{at}"


def transfer(n: Node, ins: list[State], s: str) -> list[State]:
    """The states of ``n``'s outputs from its inputs' (for symbol ``s``)."""
    bad = next((x for x in ins if isinstance(x, Whole)), None)
    if bad is not None:
        return [bad] * len(n.outputs)
    rule = RULES.get(n.op)
    if rule is None:
        from ..ir import registry
        rule = KIND_RULES.get(registry.get(n.op).kind.value, _no_rule)
    attrs_free = n.op in MENTION_OK or not any(_mentions(v, s) for v in n.attrs.values())
    if not attrs_free:
        return [Whole(f"{_where(n)} uses the size {s} (positions or its value)")] * len(n.outputs)
    if all(x is REP for x in ins) and n.op not in MENTION_OK:
        return [REP] * len(n.outputs)
    out = rule(n, ins, s)
    out = out if isinstance(out, list) else [out] * len(n.outputs)
    return [_partial_ok(n, v, st, s) for v, st in zip(n.outputs, out)]


# a partial sum must be a float the ranks' pieces add up to: not an integer (each rank's sum wraps
# on its own, or is truncated, before the ranks' are added), not e4m3 (3 mantissa bits), and not
# a value that still has the split axis (the ranks' pieces have different sizes there)
PARTIAL_DTYPES = {"f16", "bf16", "f32", "f64"}


def _partial_ok(n: Node, v: Value, st, s: str):
    if st is not PARTIAL:
        return st
    if not isinstance(v.type, TensorType) or str(v.type.dtype) not in PARTIAL_DTYPES:
        return Whole(f"{_where(n)} would give a partial sum in {v.type.dtype if isinstance(v.type, TensorType) else v.type}")
    if s in free_symbols(list(v.type.shape)):
        return Whole(f"{_where(n)} gives a partial sum that still has the axis {s}")
    return st


def _no_rule(n, ins, s):
    return Whole(f"{_where(n)} has no sharding rule")


def _rank(v: Value) -> int:
    return v.type.rank if isinstance(v.type, TensorType) else 0


# pointwise: right-aligned broadcasting; linear in a partial sum for a few primitives
LINEAR_ALL = {"add", "sub", "neg", "cast"}        # partial in every non-constant operand
LINEAR_FIRST = {"mul": None, "div": 0}           # one partial operand (div: the numerator)


def _pointwise(n, ins, s):
    R = _rank(n.outputs[0])
    partial = [i for i, x in enumerate(ins) if x is PARTIAL]
    if partial:
        if any(isinstance(x, Shard) for x in ins):
            return Whole(f"{_where(n)} combines a partial sum with a split value")
        if n.op in LINEAR_ALL and len(partial) == len(ins):
            return PARTIAL
        if n.op in LINEAR_FIRST and len(partial) == 1 and LINEAR_FIRST[n.op] in (None, partial[0]):
            return PARTIAL
        return Whole(f"{_where(n)} is not linear in a partial sum over {s}")
    axis = None
    withins = {x.within for x in ins if isinstance(x, Shard)}
    if len(withins) > 1:
        return Whole(f"{_where(n)} aligns {s} with another axis")
    for v, x in zip(n.inputs, ins):
        if isinstance(x, Shard):
            a = x.axis + R - _rank(v)
            if axis is not None and a != axis:
                return Whole(f"{_where(n)} aligns {s} with another axis")
            axis = a
    for v, x in zip(n.inputs, ins):     # a whole operand must broadcast along the split axis
        if x is REP and _rank(v) > R - axis - 1 and v.type.shape[axis - R + _rank(v)] != 1:
            return Whole(f"{_where(n)} meets a whole operand along {s}")
    return Shard(axis, withins.pop())


def _reduced(n, rank):
    axes = n.attrs["axis"]
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return {a % rank for a in axes}


def _reduction(n, ins, s):
    (x,) = ins
    r = _rank(n.inputs[0])
    if n.op in ("softmax", "log_softmax"):
        if x is PARTIAL or x.axis == n.attrs["axis"] % r:
            return Whole(f"{_where(n)} normalises over {s}" if x is not PARTIAL else
                         f"{_where(n)} of a partial sum over {s}")
        return x
    red = _reduced(n, r)
    if x is PARTIAL:
        return PARTIAL if n.op in ("sum", "mean") else Whole(f"{_where(n)} of a partial sum over {s}")
    if x.axis in red:
        if n.op == "sum":
            return PARTIAL
        return Whole(f"{_where(n)} reduces over {s}" + (" (divides by its size)" if n.op == "mean" else ""))
    keep = n.attrs.get("keepdim", False)
    return x.at(x.axis if keep else x.axis - sum(1 for a in red if a < x.axis))


def _cumsum(n, ins, s):
    (x,) = ins
    if x is PARTIAL:
        return PARTIAL
    if x.axis == n.attrs["axis"] % _rank(n.inputs[0]):
        return Whole(f"{_where(n)} runs along {s}")
    return x


def _topk(n, ins, s):
    (x,) = ins
    if x is PARTIAL or x.axis == n.attrs["axis"] % _rank(n.inputs[0]):
        return Whole(f"{_where(n)} selects along {s}")
    return [x, x]


def _matmul_axes(n):
    """For each operand, its axis -> the output axis (or 'k' for the contracted one)."""
    a, b = n.inputs
    ra, rb, R = _rank(a), _rank(b), _rank(n.outputs[0])
    nb = R - (ra > 1) - (rb > 1)       # batch axes of the output
    ma = {}
    if ra == 1:
        ma[0] = "k"
    else:
        ma[ra - 1] = "k"
        ma[ra - 2] = nb
        for i in range(ra - 2):
            ma[i] = i + nb - (ra - 2)
    mb = {}
    if rb == 1:
        mb[0] = "k"
    else:
        mb[rb - 2] = "k"
        mb[rb - 1] = R - 1
        for i in range(rb - 2):
            mb[i] = i + nb - (rb - 2)
    return ma, mb


def _matmul(n, ins, s):
    xa, xb = ins
    if PARTIAL in (xa, xb):
        if xa is REP or xb is REP:
            return PARTIAL
        return Whole(f"{_where(n)} multiplies a partial sum over {s} by a split value")
    maps = _matmul_axes(n)
    targets = [m[x.axis] for m, x in zip(maps, ins) if isinstance(x, Shard)]
    if len({x.within for x in ins if isinstance(x, Shard)}) > 1:
        return Whole(f"{_where(n)} meets {s} split two ways")
    within = next(x.within for x in ins if isinstance(x, Shard))
    if "k" in targets:
        if targets == ["k", "k"]:
            return PARTIAL
        return Whole(f"{_where(n)} contracts {s} against a whole operand")
    if len(set(targets)) > 1:
        return Whole(f"{_where(n)} puts {s} on two output axes")
    axis = targets[0]
    for v, m, x in zip(n.inputs, maps, ins):   # a whole operand's batch axis there must be 1
        if x is REP and any(o == axis and v.type.shape[i] != 1 for i, o in m.items()):
            return Whole(f"{_where(n)} meets a whole operand along {s}")
    return Shard(axis, within)


def _prod(dims):
    p = 1
    for d in dims:
        p = p * d
    return p


def _reshape(n, ins, s):
    (x,) = ins
    if x is PARTIAL:
        return PARTIAL
    if x is REP:
        return REP if not _mentions(n.attrs["shape"], s) else Whole(f"{_where(n)} has a size computed from {s}")
    src = tuple(n.inputs[0].type.shape)
    dst = tuple(n.outputs[0].type.shape)
    a = x.axis
    before = _prod(src[:a])
    starts = [j for j in range(len(dst)) if _prod(dst[:j]) == before]
    if x.within is not None:        # a merged axis: kept, or split back into its sizes
        dims, i = x.within
        for j in starts:
            if dst[j] == src[a]:
                return x.at(j)
            if tuple(dst[j:j + len(dims)]) == dims:
                return Shard(j + i)
        return Whole(f"{_where(n)} moves {s} inside another axis")
    for j in starts:
        # the split axis stays the leading part of output axis j: kept, merged with the axes
        # after it, or split with s (or the whole axis) first
        if dst[j] == src[a] or dst[j] == _sym(s) or any(dst[j] == _prod(src[a:a + m]) for m in range(2, len(src) - a + 1)):
            return Shard(j)
    for k in range(a):              # merged after whole axes: [B, S, D] -> [B * S, D] with S split
        for m in range(a + 1, len(src) + 1):
            if m - k < 2:
                continue
            merged = _prod(src[k:m])
            for j in range(len(dst)):
                if _prod(dst[:j]) == _prod(src[:k]) and dst[j] == merged:
                    return Shard(j, (tuple(src[k:m]), a - k))
    return Whole(f"{_where(n)} moves {s} inside another axis")


def _transpose(n, ins, s):
    (x,) = ins
    if x is PARTIAL:
        return PARTIAL
    r = _rank(n.inputs[0])
    a, b = n.attrs["a"] % r, n.attrs["b"] % r
    return x.at(b if x.axis == a else a if x.axis == b else x.axis)


def _permute(n, ins, s):
    (x,) = ins
    if x is PARTIAL:
        return PARTIAL
    perm = [p % _rank(n.inputs[0]) for p in n.attrs["perm"]]
    return x.at(perm.index(x.axis))


def _expand(n, ins, s):
    (x,) = ins
    R = _rank(n.outputs[0])
    shape = tuple(n.attrs["shape"])
    if x is PARTIAL:
        return PARTIAL
    if isinstance(x, Shard):
        return x.at(x.axis + R - _rank(n.inputs[0]))
    hits = [i for i, d in enumerate(shape) if d == _sym(s)]   # constant along the new axis
    if len(hits) == 1 and not any(_mentions(d, s) for i, d in enumerate(shape) if i != hits[0]):
        return Shard(hits[0])
    if _mentions(shape, s):
        return Whole(f"{_where(n)} broadcasts to a size computed from {s}")
    return REP


def _fill(n, ins, s):
    shape = tuple(n.attrs["shape"])
    if not _mentions(shape, s):
        return REP
    hits = [i for i, d in enumerate(shape) if d == _sym(s)]
    if len(hits) == 1 and not any(_mentions(d, s) for i, d in enumerate(shape) if i != hits[0]):
        return Shard(hits[0])
    return Whole(f"{_where(n)} has a size computed from {s}")


def _slice(n, ins, s):
    """slice / unslice: the split axis must be taken (or placed) whole."""
    (x,) = ins
    starts, stops, steps = n.attrs["starts"], n.attrs["stops"], n.attrs["steps"]
    if x is PARTIAL:
        return PARTIAL if not _mentions((starts, stops), s) else Whole(f"{_where(n)} cuts along {s}")
    if x is REP:
        return REP if not _mentions(tuple(n.attrs.values()), s) else Whole(f"{_where(n)} cuts along {s}")
    a = x.axis
    full = n.inputs[0].type.shape[a] if n.op == "slice" else n.attrs["shape"][a]
    others = [v for i, v in enumerate(starts) if i != a] + [v for i, v in enumerate(stops) if i != a]
    if starts[a] == 0 and stops[a] == full and steps[a] == 1 and not _mentions(others, s) \
            and (n.op == "slice" or n.attrs["shape"][a] == n.inputs[0].type.shape[a]):
        return x
    return Whole(f"{_where(n)} cuts along {s}")


def _concat(n, ins, s):
    if all(x is PARTIAL for x in ins):
        return PARTIAL
    if any(x is PARTIAL for x in ins):
        return Whole(f"{_where(n)} joins a partial sum with other values")
    states = set(ins)
    if any(x is REP for x in ins) or len(states) != 1:
        return Whole(f"{_where(n)} joins split and whole values")
    (x,) = states
    if x.axis == n.attrs["axis"] % _rank(n.outputs[0]):
        return Whole(f"{_where(n)} joins along {s}")
    return x


def _take(n, ins, s):
    """take(x, idx, axis) (take_along_dim): idx matches x on every axis but ``axis``."""
    x, idx = ins
    axis = n.attrs["axis"] % _rank(n.inputs[0])
    if idx is PARTIAL:
        return Whole(f"{_where(n)} indexes with a partial sum")
    if x is PARTIAL:
        return PARTIAL if idx is REP else Whole(f"{_where(n)} of a partial sum with split indices")
    if isinstance(x, Shard) and x.axis == axis:
        return Whole(f"{_where(n)} indexes along {s}")
    if isinstance(x, Shard) and x == idx:
        return x                       # rows split alike: each rank takes from its own
    if x is REP and isinstance(idx, Shard) and idx.axis == axis:
        return idx                     # the entries taken are split
    return Whole(f"{_where(n)} splits its table and indices differently along {s}")


def _scatter_along(n, ins, s):
    """scatter_along(src, idx) (take's gradient): adds src[..., j, ...] at idx[..., j, ...]."""
    src, idx = ins
    axis = n.attrs["axis"] % _rank(n.inputs[0])
    if idx is PARTIAL or _mentions(n.attrs["size"], s):
        return Whole(f"{_where(n)} scatters along {s}")
    if src is PARTIAL:
        return PARTIAL if idx is REP else Whole(f"{_where(n)} of a partial sum with split indices")
    if isinstance(src, Shard) and src == idx:
        return PARTIAL if src.axis == axis else src
    return Whole(f"{_where(n)} splits its values and indices differently along {s}")


def _gather_rows(n, ins, s):
    """gather_rows(table, ids) (``table[ids]``): out[t..., :] = table[ids[t...], :]."""
    table, ids = ins
    ri = _rank(n.inputs[1])
    if ids is PARTIAL:
        return Whole(f"{_where(n)} indexes with a partial sum")
    if table is PARTIAL:
        return PARTIAL if ids is REP else Whole(f"{_where(n)} of a partial sum with split indices")
    if isinstance(table, Shard) and table.axis == 0:
        return Whole(f"{_where(n)} picks rows of a table split along {s}")
    if isinstance(table, Shard) and ids is REP:
        return table.at(ri + table.axis - 1)
    if table is REP and isinstance(ids, Shard):
        return ids
    return Whole(f"{_where(n)} splits its table and indices along {s}")


def _scatter_rows(n, ins, s):
    """scatter_rows(src, ids) (``table[ids]``'s gradient): out[ids[t...]] += src[t..., :]."""
    src, ids = ins
    ri = _rank(n.inputs[1])
    if ids is PARTIAL or _mentions(n.attrs["rows"], s):
        return Whole(f"{_where(n)} scatters rows along {s}")
    if src is PARTIAL:
        return PARTIAL if ids is REP else Whole(f"{_where(n)} of a partial sum with split indices")
    if isinstance(src, Shard) and src == ids:
        return PARTIAL                 # each rank adds its own tokens' rows
    if isinstance(src, Shard) and ids is REP and src.axis >= ri:
        return src.at(src.axis - ri + 1)
    return Whole(f"{_where(n)} splits its values and indices differently along {s}")


def _attention(n, ins, s):
    """flash_attention(q, k, v, *scale_and_mask) and its backward (q, k, v, lse, delta, do,
    *scale_and_mask): batch and head axes split every operand alike; the query axis may be split
    when keys and values are whole (the backward's key and value gradients are then partial sums
    over the queries). Masks broadcast against the scores [..., S, T]; lse and delta are [..., S]."""
    bwd = n.op == "flash_attention_bwd"
    R = _rank(n.inputs[0])
    if any(x is PARTIAL or isinstance(x, Shard) and x.within is not None for x in ins):
        return Whole(f"{_where(n)} of a partial sum or a merged axis")
    if any(_rank(v) != R for v in list(n.inputs[:3]) + list(n.outputs[:3 if bwd else 1])):
        return Whole(f"{_where(n)} broadcasts its operands' batch axes")

    def mapped(i, val, x):      # the operand's split axis in q's coordinates
        return x.axis if bwd and i in (3, 4) else x.axis + R - _rank(val)
    split = {i: mapped(i, val, x) for i, (val, x) in enumerate(zip(n.inputs, ins)) if isinstance(x, Shard)}
    q, k, v = ins[:3]
    if split.get(0) == R - 2 and k is REP and v is REP:
        if any(a != R - 2 for a in split.values()):
            return Whole(f"{_where(n)} splits a mask along the keys")
        return [Shard(R - 2), PARTIAL, PARTIAL] if bwd else [Shard(R - 2), Shard(R - 2)]
    axes = set(split.values())
    same_rank = all(_rank(val) == R for val in n.inputs[:3])
    if len(axes) == 1 and min(axes) < R - 2 and same_rank and all(i in split for i in (0, 1, 2)):
        a = min(axes)
        return [Shard(a)] * len(n.outputs)
    return Whole(f"{_where(n)} attends along {s}")


def _attention_mod(n, ins, s):
    """flash_attention_mod(scores, v): rows of scores independent; keys contracted."""
    sc, v = ins
    R = _rank(n.inputs[0])
    if any(x is PARTIAL or isinstance(x, Shard) and x.within is not None for x in ins):
        return Whole(f"{_where(n)} of a partial sum or a merged axis")
    if any(_rank(x) != R for x in list(n.inputs) + list(n.outputs[:1])):
        return Whole(f"{_where(n)} broadcasts its operands' batch axes")
    if isinstance(sc, Shard) and sc.axis == R - 1 or isinstance(v, Shard) and v.axis == R - 2:
        return Whole(f"{_where(n)} attends along {s}")
    axes = {x.axis + R - _rank(val) for val, x in zip(n.inputs, ins) if isinstance(x, Shard)}
    if len(axes) != 1:
        return Whole(f"{_where(n)} attends along {s}")
    (a,) = axes
    if isinstance(sc, Shard) and a < R - 2 and v is REP and n.inputs[1].type.shape[a] != 1:
        return Whole(f"{_where(n)} meets whole values along {s}")
    return [Shard(a)] * len(n.outputs)


# Sources: a literal is whole; sizes, positions and masks from a symbol are caught by the
# attribute check in transfer (their attributes mention it).
def _source(n, ins, s):
    return REP


RULES = {
    "matmul": _matmul, "matmul_i32": _matmul, "matmul_f8": _matmul,
    "sum": _reduction, "mean": _reduction, "max": _reduction, "min": _reduction,
    "softmax": _reduction, "log_softmax": _reduction,
    "cumsum": _cumsum, "topk": _topk,
    "reshape": _reshape, "transpose": _transpose, "permute": _permute, "expand": _expand,
    "slice": _slice, "unslice": _slice, "concat": _concat, "take": _take, "fill": _fill,
    "scatter_along": _scatter_along, "gather_rows": _gather_rows, "scatter_rows": _scatter_rows,
    "flash_attention": _attention, "flash_attention_bwd": _attention, "flash_attention_mod": _attention_mod,
}
KIND_RULES = {"pointwise": _pointwise, "source": _source}
# primitives whose attributes may mention the symbol (their rule reads them)
MENTION_OK = {"reshape", "expand", "fill", "slice", "unslice", "scatter_along", "scatter_rows"}
