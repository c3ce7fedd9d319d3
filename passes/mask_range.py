"""Which keys a block of query rows can see: the key range a mask made of positions allows.

Used by the flash-attention lowering (passes/lower_flash.py), on the general form's scores
``s``: the masks are the ``where(c, x, -inf)`` nodes that end the score cone. Each condition
``c`` is read as an expression over the query position ``i`` (the scores' row axis) and the key
position ``j`` (the column axis), both built with ``arange`` and views, sizes, literals and
integer scalar parameters, combined by ``+ - *`` (by a literal), ``//`` (by a positive literal),
comparisons, ``&`` and ``|`` (and ``causal(S, T)``). For the rows ``[i_lo, i_hi]`` of one block,
a comparison with ``j`` (or ``j // C``) alone on one side bounds ``j``: ``j <= i`` gives
``j < i_hi + 1``, ``j > i - W`` gives ``j >= i_lo - W + 1``; ``&`` intersects the ranges, ``|``
takes their hull. What cannot be read so (data, ``~``, ``!=``, a comparison with ``j`` on both
sides) bounds nothing, so the range is always a superset of the kept keys: the kernel still
evaluates the mask on every tile it computes, and only tiles outside the range are skipped.

The bounds are built once as a small expression tree and evaluated two ways: as tile IR in the
kernel (:class:`TileOps`, per program) and as Python integers on the host (:class:`IntOps`) for
``explain()``'s count of the tiles computed (:func:`tile_count`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..ir.dims import evaluate
from ..ir.prims_elementwise import floor_div
from ..ir.graph import Node, Value
from ..ir.types import TensorType

# a bound: ("ilo",) ("ihi",) ("int", c) ("size", dim) ("scalar", value) ("add", a, b) ("sub", a, b)
# ("neg", a) ("mul", a, k) ("fdiv", a, C) ("min", a, b) ("max", a, b)
Tree = tuple
FLIP = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "eq": "eq"}


@dataclass(frozen=True)
class Lin:
    """cj * (j // C) + r, with r in [lo, hi] over the block's rows."""
    cj: int
    C: int
    lo: Tree
    hi: Tree


def _add(a: Tree, b: Tree) -> Tree:
    if a == ("int", 0):
        return b
    if b == ("int", 0):
        return a
    if b[0] == "neg":
        return ("sub", a, b[1])
    if b[0] == "int" and b[1] < 0:
        return ("sub", a, ("int", -b[1]))
    return ("add", a, b)


def _scale(a: Tree, C: int) -> Tree:
    return a if C == 1 else ("mul", a, C)


def _sub(a: Tree, b: Tree) -> Tree:
    if b == ("int", 0):
        return a
    return _neg(b) if a == ("int", 0) else ("sub", a, b)


def _neg(a: Tree) -> Tree:
    if a[0] == "neg":
        return a[1]
    if a[0] == "int":
        return ("int", -a[1])
    return ("neg", a)


class _Reader:
    def __init__(self, producer: dict, rank: int):
        self.producer, self.rank = producer, rank
        self.exact = True         # every condition read so far bounds j exactly

    def position_axis(self, v: Value) -> int | None:
        """The scores' axis along which v is a position, or None."""
        a = self.local_axis(v)
        return None if a is None else a + self.rank - v.type.rank

    def local_axis(self, v: Value) -> int | None:
        """v's axis along which it is arange's position (arange through unit reshapes and
        expands: ``arange(S)[:, None]``), or None."""
        n = self.producer.get(v)
        if n is None or not isinstance(v.type, TensorType):
            return None
        if n.op == "arange":
            return 0
        if n.op not in ("reshape", "expand"):
            return None
        inner = n.inputs[0]
        a = self.local_axis(inner)
        if a is None:
            return None
        if n.op == "expand":
            return a + v.type.rank - inner.type.rank
        old = [k for k, d in enumerate(inner.type.shape) if d != 1]
        new = [k for k, d in enumerate(v.type.shape) if d != 1]
        if a not in old or [inner.type.shape[k] for k in old] != [v.type.shape[k] for k in new]:
            return None
        return new[old.index(a)]

    def lin(self, v: Value) -> Lin | None:
        n = self.producer.get(v)
        if n is None or v.type.dtype.is_float or v.type.dtype.is_bool:
            return None
        if n.op == "const" and isinstance(n.attrs["value"], int):
            c = ("int", n.attrs["value"])
            return Lin(0, 1, c, c)
        if n.op == "dim":
            c = ("size", n.attrs["size"])
            return Lin(0, 1, c, c)
        axis = self.position_axis(v) if isinstance(v.type, TensorType) else None
        if axis == self.rank - 2:
            return Lin(0, 1, ("ilo",), ("ihi",))
        if axis == self.rank - 1:
            return Lin(1, 1, ("int", 0), ("int", 0))
        if n.op == "cast" and not n.inputs[0].type.dtype.is_float:
            return self.lin(n.inputs[0])
        data = self.batch_value(v)
        if data is not None:
            return data
        if n.op in ("add", "sub"):
            a, b = (self.lin_or_scalar(x) for x in n.inputs)
            if a is None or b is None:
                return None
            if n.op == "sub":
                b = Lin(-b.cj, b.C, _neg(b.hi), _neg(b.lo))
            if a.cj and b.cj and a.C != b.C:
                return None
            return Lin(a.cj + b.cj, a.C if a.cj else b.C, _add(a.lo, b.lo), _add(a.hi, b.hi))
        if n.op == "neg":
            a = self.lin(n.inputs[0])
            return None if a is None else Lin(-a.cj, a.C, _neg(a.hi), _neg(a.lo))
        if n.op in ("mul", "floordiv"):
            a, k = n.inputs
            kv = self.literal(k)
            if kv is None and n.op == "mul":
                a, k = k, a
                kv = self.literal(k)
            la = self.lin(a)
            if kv is None or la is None:
                return None
            if n.op == "mul":
                if la.cj and la.C != 1:
                    return None
                lo, hi = ("mul", la.lo, kv), ("mul", la.hi, kv)
                return Lin(la.cj * kv, 1, *((lo, hi) if kv >= 0 else (hi, lo)))
            if kv <= 0:
                return None
            if la.cj == 0:
                return Lin(0, 1, ("fdiv", la.lo, kv), ("fdiv", la.hi, kv))
            if la.cj == 1 and la.C == 1 and la.lo == la.hi == ("int", 0):
                return Lin(1, kv, ("int", 0), ("int", 0))
        return self.batch_value(v)

    def batch_value(self, v: Value) -> Lin | None:
        """An integer tensor constant along the scores' two last axes (a length per batch row,
        ``lens[:, None, None, None]``): one value per program, read by the kernel."""
        if not isinstance(v.type, TensorType) or v.type.dtype.is_float or v.type.dtype.is_bool:
            return None
        shape = (1,) * (self.rank - v.type.rank) + tuple(v.type.shape)
        if len(shape) != self.rank or shape[-1] != 1 or shape[-2] != 1:
            return None
        name = v.name
        n = self.producer.get(v)
        while name is None and n is not None and n.op in ("reshape", "expand", "slice", "cast"):
            name = n.inputs[0].name
            n = self.producer.get(n.inputs[0])
        leaf = ("data", v, name or "a value per batch entry")
        return Lin(0, 1, leaf, leaf)

    def lin_or_scalar(self, v: Value) -> Lin | None:
        if not isinstance(v.type, TensorType) and not v.type.dtype.is_float and self.producer.get(v) is None:
            return Lin(0, 1, ("scalar", v), ("scalar", v))      # an integer scalar parameter
        return self.lin(v)

    def literal(self, v: Value):
        n = self.producer.get(v)
        if n is not None and n.op == "const" and isinstance(n.attrs["value"], int) and not isinstance(n.attrs["value"], bool):
            return n.attrs["value"]
        return None

    def cond(self, c: Value):
        """(lo, hi) bounds on j (either may be None: unbounded) that c allows, or None."""
        n = self.producer.get(c)
        if n is None:
            return None
        if n.op == "logical_and":
            a, b = (self.cond(x) for x in n.inputs)
            if a is None or b is None:
                self.exact = False
                return a or b
            return (_pick("max", a[0], b[0]), _pick("min", a[1], b[1]))
        if n.op == "logical_or":
            self.exact = False       # the hull is exact for the union only
            a, b = (self.cond(x) for x in n.inputs)
            if a is None or b is None:
                return None
            return (None if a[0] is None or b[0] is None else ("min", a[0], b[0]),
                    None if a[1] is None or b[1] is None else ("max", a[1], b[1]))
        if n.op == "causal":
            return (None, causal_hi(n.attrs["S"], n.attrs["T"]))
        if n.op in ("reshape", "expand") and self.producer.get(n.inputs[0]) is not None \
                and self.producer[n.inputs[0]].op == "causal":
            return self.cond(n.inputs[0])
        if n.op not in FLIP:
            return None
        a, b = (self.lin_or_scalar(x) for x in n.inputs)
        if a is None or b is None:
            return None
        if a.cj and b.cj and a.C != b.C:
            return None
        cj, C = a.cj - b.cj, a.C if a.cj else b.C
        if cj not in (1, -1):
            return None
        # cj * (j // C) OP [b.lo - a.hi, b.hi - a.lo]
        op, dlo, dhi = n.op, _sub(b.lo, a.hi), _sub(b.hi, a.lo)
        if cj == -1:
            op, dlo, dhi = FLIP[op], _neg(dhi), _neg(dlo)
        if op == "le":
            return (None, _scale(_add(dhi, ("int", 1)), C))
        if op == "lt":
            return (None, _scale(dhi, C))
        if op == "ge":
            return (_scale(dlo, C), None)
        if op == "gt":
            return (_scale(_add(dlo, ("int", 1)), C), None)
        return (_scale(dlo, C), _scale(_add(dhi, ("int", 1)), C))    # eq


def causal_hi(S, T) -> Tree:
    """The end of the keys causal(S, T) lets the block's last row see: j <= i + T - S."""
    if S == T:
        return ("add", ("ihi",), ("int", 1))
    return ("add", ("ihi",), ("sub", ("size", T), ("sub", ("size", S), ("int", 1))))


def _pick(op, a, b):
    if a is None:
        return b
    if b is None:
        return a
    return (op, a, b)


def _text(t: Tree) -> str:
    k = t[0]
    if k in ("ilo", "ihi"):
        return {"ilo": "i_first", "ihi": "i_last"}[k]
    if k == "int":
        return str(t[1])
    if k == "size":
        return str(t[1])
    if k == "scalar":
        return t[1].name or k
    if k == "data":
        return t[2]
    if k == "neg":
        return f"-{_text(t[1])}"
    if k in ("min", "max"):
        return f"{k}({_text(t[1])}, {_text(t[2])})"
    sym = {"add": "+", "sub": "-", "mul": "*", "fdiv": "//"}[k]
    rhs = str(t[2]) if k in ("mul", "fdiv") else _text(t[2])
    if k not in ("add", "mul", "fdiv") and t[2][0] in ("add", "sub"):
        rhs = f"({rhs})"
    lhs = _text(t[1])
    if k in ("mul", "fdiv") and t[1][0] in ("add", "sub"):
        lhs = f"({lhs})"
    return f"{lhs} {sym} {rhs}"


@dataclass(frozen=True)
class KeyRange:
    lo: Tree | None
    hi: Tree | None
    # the scores under the masks, where every mask condition was read exactly (no data, no |,
    # no & with an unreadable side): then the keys every row of a block keeps are known too
    # (``kept_by_all``) and their tiles need no mask; else None
    inner: Value | None = None

    @property
    def text(self) -> str:
        return f"[{_text(self.lo) if self.lo else '0'}, {_text(self.hi) if self.hi else 'T'})"

    def bounds(self, ops, i_first, i_last, T):
        """(lo, hi) of the keys for the query positions [i_first, i_last], clamped to [0, T]."""
        env = {"ilo": i_first, "ihi": i_last}
        lo = _eval(self.lo, ops, env, "lo") if self.lo else None
        hi = _eval(self.hi, ops, env, "hi") if self.hi else None
        return (0 if lo is None else ops.maximum(lo, 0)), (T if hi is None else ops.minimum(hi, T))

    def kept_by_all(self, ops, i_first, i_last, T):
        """(lo, hi) of the keys every query position in [i_first, i_last] keeps (only where
        ``inner`` is set: every condition read exactly). Each bound is a monotone function of one
        row's position, built for the hull (its lower end from the first row, its upper end from
        the last): evaluated with the two rows swapped it gives the intersection."""
        assert self.inner is not None
        return self.bounds(ops, i_last, i_first, T)


def _eval(t: Tree, ops, env, side: str):
    """The bound's value, or None where it rests on a value the kernel cannot read as a scalar:
    unbounded on that side (-inf for a lower bound, +inf for an upper one), so min and max
    treat it as such and arithmetic with it stays unbounded."""
    k = t[0]
    if k in env:
        return env[k]
    if k == "int":
        return t[1]
    if k == "size":
        return ops.size(t[1])
    if k == "scalar":
        return ops.scalar(t[1])
    if k == "data":
        return ops.data(t[1]) if not isinstance(ops, IntOps) else ops.data_named(t[2])
    if k in ("neg", "mul", "fdiv"):
        a = _eval(t[1], ops, env, side)
        if a is None:
            return None
        return ops.sub(0, a) if k == "neg" else ops.mul(a, t[2]) if k == "mul" else ops.floordiv(a, t[2])
    a, b = _eval(t[1], ops, env, side), _eval(t[2], ops, env, side)
    if k in ("min", "max"):
        if a is None or b is None:
            keep = (k == "min") == (side == "hi")      # min of +inf, max of -inf: the other one
            return (b if a is None else a) if keep else None
        return ops.minimum(a, b) if k == "min" else ops.maximum(a, b)
    if a is None or b is None:
        return None
    return ops.add(a, b) if k == "add" else ops.sub(a, b)


def key_range_of(s: Value, producer: dict) -> KeyRange | None:
    """The key range the masks ending s's computation allow, or None (no bound found)."""
    conds = []
    x = s
    while True:
        n = producer.get(x)
        if n is None or n.op != "where":
            break
        c, a, fill = n.inputs
        f = producer.get(fill)
        if f is None or f.op != "const" or f.attrs["value"] != -math.inf:
            break
        conds.append(c)
        x = a
    reader = _Reader(producer, s.type.rank)
    lo = hi = None
    for c in conds:
        r = reader.cond(c)
        if r is not None:
            lo, hi = _pick("max", lo, r[0]), _pick("min", hi, r[1])
        else:
            reader.exact = False
    if lo is None and hi is None:
        return None
    return KeyRange(lo, hi, x if reader.exact else None)


class IntOps:
    """Host-side evaluation of the bounds, at known sizes and scalar values."""

    def __init__(self, bindings: dict, scalars: dict | None = None):
        self.bindings, self.scalars = bindings, scalars or {}

    add = staticmethod(lambda a, b: a + b)
    sub = staticmethod(lambda a, b: a - b)
    mul = staticmethod(lambda a, b: a * b)
    floordiv = staticmethod(lambda a, b: a // b)
    minimum = staticmethod(min)
    maximum = staticmethod(max)

    def size(self, d):
        return evaluate(d, self.bindings)

    def scalar(self, v: Value):
        if v.name not in self.scalars:
            raise KeyError(f"the scalar {v.name}")
        return int(self.scalars[v.name])

    def data_named(self, name: str):
        raise KeyError(f"the values of {name}")


class TileOps:
    """The same bounds as tile IR, per program (scalars: no tiles). ``read`` evaluates a data
    value at this program's batch indices (the flash template's evaluator)."""

    def __init__(self, b, names: dict | None = None, read=None):
        self.b, self.names, self.read = b, names or {}, read

    def data(self, v: Value):
        t = self.read(v) if self.read is not None else None
        return t if t is not None and tuple(t.shape) == () else None

    def add(self, a, c):
        return self.b.add(a, c)

    def sub(self, a, c):
        return self.b.sub(a, c)

    def mul(self, a, k):
        return self.b.mul(a, k)

    def floordiv(self, a, k):
        """Floor division by a positive literal, as the language's // (Triton's truncates)."""
        return floor_div(self.b, self.b.lift(a), self.b.const(k))

    def minimum(self, a, c):
        return self.b.minimum(a, c)

    def maximum(self, a, c):
        return self.b.maximum(a, c)

    def size(self, d):
        return self.b.size(d)

    def scalar(self, v: Value):
        return self.b.scalar(self.names[v], v.type.dtype)




def tile_count(kr: KeyRange | None, S: int, T: int, block_m: int, block_n: int, bindings: dict,
               scalars: dict | None = None) -> tuple[int, int]:
    """(tiles computed, tiles in the full S x T grid) at these block sizes."""
    ops = IntOps(bindings, scalars)
    total = math.ceil(S / block_m) * math.ceil(T / block_n)
    if kr is None:
        return total, total
    done = 0
    for i0 in range(0, S, block_m):
        lo, hi = kr.bounds(ops, i0, min(i0 + block_m, S) - 1, T)
        lo = lo // block_n * block_n
        done += max(0, math.ceil((hi - lo) / block_n)) if hi > lo else 0
    return done, total


def attention_text(fg, sizes: dict | None, block_m: int = 128, block_n: int = 64) -> str | None:
    """explain()'s account of each flash kernel's scores and of the key tiles it computes at
    ``sizes`` (block sizes of the first GPU preset); None when the op has no flash kernel."""
    producer = fg.graph.producers()
    lines = []
    for grp in fg.groups:
        node = next((n for n in grp.nodes if n.op in ("flash_attention", "flash_attention_mod")), None)
        if node is None:
            continue
        out = node.outputs[0]
        S = out.type.shape[-2]
        if node.op == "flash_attention_mod":
            s = node.inputs[0]
            T = s.type.shape[-1]
            kr = key_range_of(s, producer)
            cone = [n.op for n in grp.nodes if n is not node and n.op != "matmul"]
            what = "scores from the spec, evaluated per tile: " + (", ".join(cone) if cone else "q @ k.T")
        else:
            T = node.inputs[1].type.shape[-2]
            what = "scaled" if node.attrs["scale"] else "unscaled"
            what += {"none": "", "causal": ", causal", "tensor": ", a stored mask read per tile"}[node.attrs["mask"]]
            kr = None
            if node.attrs["mask"] == "causal":
                cS, cT = node.attrs["causal"]
                kr = KeyRange(None, causal_hi(cS, cT))
        lines.append(f"{grp.name}: {what}")
        if kr is None:
            lines.append("  keys: all (no mask made of positions bounds them); masked lanes are computed")
            continue
        lines.append(f"  keys of the rows [i_first, i_last] of a block: {kr.text} (other tiles never loaded)")
        if not sizes or not all(str(x) in sizes for x in fg.graph.symbols):
            lines.append("  (pass explain(sizes={...}) to count the tiles computed)")
            continue
        try:
            Sv, Tv = evaluate(S, sizes), evaluate(T, sizes)
            done, total = tile_count(kr, Sv, Tv, block_m, block_n, sizes, sizes)
        except KeyError as e:
            lines.append(f"  tiles computed depend on {e.args[0]} (a scalar can be passed in sizes to count them)")
            continue
        lines.append(f"  tiles computed at S={Sv}, T={Tv}, BLOCK_M={block_m}, BLOCK_N={block_n}: "
                     f"{done} of {total} ({100 * done / max(total, 1):.1f}%) per batch entry and head")
    return "\n".join(lines) if lines else None
