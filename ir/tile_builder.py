"""Building level-2 kernels: typed tile expressions with broadcasting, named variables, loops,
parameters and tunables. Lowering templates (passes/lower_*.py) and the per-primitive tile
lowerings (ir/prims_*.py) build kernels through this class only.

Dtype rules for tile arithmetic: floats beat integers, wider beats narrower, and literals are
weak (they take the other operand's dtype). Narrow floats (f16, bf16, fp8) are widened to f32
before arithmetic; results stay f32 until a store or an explicit cast rounds them.
"""
from __future__ import annotations

import contextlib
import contextvars
import keyword
import re
from typing import Iterable

from .dims import Dim
from .tile import (Comment, For, GridDim, KParam, Let, PtrType, Store, TExpr, TileKernel, Tunable, var)
from .types import DType

NARROW = (DType.f16, DType.bf16, DType.f8e4m3)
I32, I64, F32, BOOL = DType.i32, DType.i64, DType.f32, DType.bool


def broadcast(a: tuple, b: tuple) -> tuple:
    n = max(len(a), len(b))
    a = (1,) * (n - len(a)) + tuple(a)
    b = (1,) * (n - len(b)) + tuple(b)
    out = []
    for x, y in zip(a, b):
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            raise ValueError(f"tile shapes {a} and {b} do not broadcast")
    return tuple(out)


def promote(a: TExpr, b: TExpr) -> DType:
    da, db = a.dtype, b.dtype
    if a.op == "const" and b.op != "const":
        return db if not (da.is_float and not db.is_float) else F32
    if b.op == "const" and a.op != "const":
        return da if not (db.is_float and not da.is_float) else F32
    if da == db:
        return da
    if da.is_float or db.is_float:
        fl = [d for d in (da, db) if d.is_float]
        return max(fl, key=lambda d: d.bits) if len(fl) == 2 else fl[0]
    if da.is_bool:
        return db
    if db.is_bool:
        return da
    return max((da, db), key=lambda d: d.bits)


# names the generated source needs for itself, and Python's keywords
RESERVED = set(keyword.kwlist) | {"tl", "triton", "float", "range", "int", "min", "max", "sum", "abs",
                                   "len", "print", "pid", "mask"}
# Tunables (block sizes, ``tl.constexpr`` arguments passed by keyword) are UPPER_CASE with an
# underscore; every other name of a kernel (parameters, variables) is kept out of that shape,
# so the two sets can never meet.
TUNABLE_NAME = re.compile(r"^[A-Z][A-Z0-9]*_[A-Z0-9_]+$")


# Index arithmetic in int64 (program ids and aranges widened at their source, so every offset
# derived from them is int64): set by the lowering of a kernel's wide variant, which the runtime
# launches when some offset could reach 2**31 (runtime/indexing.py).
INDEX64: contextvars.ContextVar[bool] = contextvars.ContextVar("INDEX64", default=False)
WIDE_SUFFIX = "_i64"   # a wide variant's kernel name: the kernel's own, plus this


@contextlib.contextmanager
def index64(on: bool = True):
    token = INDEX64.set(on)
    try:
        yield
    finally:
        INDEX64.reset(token)


def ident(text: str) -> str:
    s = re.sub(r"\W", "_", text)
    s = s if s and not s[0].isdigit() else f"v_{s}"
    if TUNABLE_NAME.match(s):
        return f"v_{s}"
    return f"{s}_" if s in RESERVED else s


class TileBuilder:
    def __init__(self, name: str):
        self.index64 = INDEX64.get()
        self.name = name + WIDE_SUFFIX if self.index64 else name
        self.params: dict[str, KParam] = {}
        self.tunables: dict[str, Tunable] = {}
        self.blocks: list[list] = [[]]
        # One namespace for every name the kernel's source defines: the kernel itself, its
        # parameters (keyed by what they hold, so one buffer's pointer is one parameter), its
        # variables and its tunables. Names are unique by construction, never by luck.
        self.used: set[str] = {self.name}
        self.param_of: dict[tuple, str] = {}
        self.defs: dict[str, TExpr] = {}     # let-bound (never re-assigned) variables' values

    # -- parameters ----------------------------------------------------------------------------
    def _param(self, hint: str, kind: str, dtype, **source) -> TExpr:
        key = (kind, source.get("buffer"), source.get("axis"), source.get("dim"))
        name = self.param_of.get(key)
        if name is None:
            name = self.fresh(hint)
            self.param_of[key] = name
            self.params[name] = KParam(name, kind, dtype, **source)
        return TExpr("arg", (name,), dtype, ())

    def ptr(self, buffer: str, elem: DType) -> TExpr:
        if elem == DType.f8e4m3:
            from . import fp8
            fp8.require_native(f"the f8e4m3 tensor '{buffer}'")
        return self._param(f"{ident(buffer)}_ptr", "ptr", PtrType(elem), buffer=buffer)

    def stride(self, buffer: str, axis: int) -> TExpr:
        return self._param(f"stride_{ident(buffer)}_{axis}", "stride", I64, buffer=buffer, axis=axis)

    def size(self, d: Dim) -> TExpr:
        """A size as a tile expression: a literal when static, else a kernel argument."""
        if isinstance(d, int):
            return self.const(d, I32)
        text = str(d).replace(" + ", "_plus_").replace(" - ", "_minus_").replace("*", "").replace("/", "_div_")
        hint = str(d) if d.is_symbol() else "size_" + re.sub(r"\W", "_", text)
        return self._param(hint, "size", I32, dim=d)

    def scalar(self, name: str, dtype: DType) -> TExpr:
        return self._param(name, "scalar", dtype, buffer=name)

    def tunable(self, t: Tunable) -> TExpr:
        if not TUNABLE_NAME.match(t.name):
            raise ValueError(f"tunable {t.name!r} must be UPPER_CASE with an underscore (BLOCK_M)")
        self.tunables.setdefault(t.name, t)
        self.used.add(t.name)
        return TExpr("arg", (t.name,), I32, ())

    # -- leaves --------------------------------------------------------------------------------
    def const(self, value, dtype: DType | None = None) -> TExpr:
        if dtype is None:
            dtype = BOOL if isinstance(value, bool) else F32 if isinstance(value, float) else I32
        return TExpr("const", (value,), dtype, ())

    def program_id(self, axis: int) -> TExpr:
        pid = TExpr("program_id", (axis,), I32, ())
        return self.convert(pid, I64) if self.index64 else pid

    def arange(self, block: str) -> TExpr:
        r = TExpr("arange", (block,), I32, (block,))
        return self.convert(r, I64) if self.index64 else r

    def full(self, shape: tuple, value, dtype: DType) -> TExpr:
        return TExpr("full", (tuple(shape), value), dtype, tuple(shape))

    # -- arithmetic ----------------------------------------------------------------------------
    def binop(self, op: str, a, b) -> TExpr:
        a, b = self.lift(a), self.lift(b)
        shape = broadcast(a.shape, b.shape)
        if op in ("lt", "le", "gt", "ge", "eq", "ne"):
            return TExpr(op, (a, b), BOOL, shape)
        if op in ("and", "or"):
            # a scalar bool meeting a tile is widened first (Triton's interpreter mistypes
            # scalar & tile, and masks then fail)
            if a.shape == () and b.shape != () and a.op != "const" and a.dtype.is_bool:
                a = TExpr("and", (self.full(b.shape, True, BOOL), a), BOOL, b.shape)
            if b.shape == () and a.shape != () and b.op != "const" and b.dtype.is_bool:
                b = TExpr("and", (self.full(a.shape, True, BOOL), b), BOOL, a.shape)
            return TExpr(op, (a, b), promote(a, b), shape)
        dt = promote(a, b)
        if op == "truediv" and not dt.is_float:
            dt = F32
        if dt in NARROW:
            dt = F32
        if dt.is_float:
            # float operands in the result's dtype, so Triton's own promotion (which keeps a
            # tensor's dtype against a scalar: f16 tile * f32 scalar is f16 there) never decides
            a, b = (x if x.dtype == dt or x.op == "const" else self.convert(x, dt) for x in (a, b))
        return TExpr(op, (a, b), dt, shape)

    def add(self, a, b):
        a, b = self.lift(a), self.lift(b)
        if _is_zero(a):
            return b
        if _is_zero(b):
            return a
        return self.binop("add", a, b)

    def sub(self, a, b):
        return a if _is_zero(self.lift(b)) else self.binop("sub", a, b)

    def mul(self, a, b):
        a, b = self.lift(a), self.lift(b)
        if _is_one(a):
            return b
        if _is_one(b):
            return a
        return self.binop("mul", a, b)

    def floordiv(self, a, b):
        return a if _is_one(self.lift(b)) else self.binop("floordiv", a, b)

    def mod(self, a, b):
        return self.binop("mod", a, b)

    def truediv(self, a, b):
        return self.binop("truediv", a, b)

    def lt(self, a, b):
        return self.binop("lt", a, b)

    def and_(self, a, b):
        if a is None:
            return b
        if b is None:
            return a
        return self.binop("and", a, b)

    def shr(self, a, bits) -> TExpr:
        """a >> bits for unsigned bytes and integers (the shift takes a's dtype)."""
        a = self.lift(a)
        bits = self.cast(self.lift(bits), a.dtype)
        return TExpr("shr", (a, bits), a.dtype, broadcast(a.shape, bits.shape))

    def shl(self, a, bits) -> TExpr:
        """a << bits for integers (the shift takes a's dtype; bits shifted out are lost)."""
        a = self.lift(a)
        bits = self.cast(self.lift(bits), a.dtype)
        return TExpr("shl", (a, bits), a.dtype, broadcast(a.shape, bits.shape))

    def bitor(self, a, b) -> TExpr:
        a, b = self.lift(a), self.lift(b)
        dt = promote(a, b)
        return TExpr("or", (self.cast(a, dt), self.cast(b, dt)), dt, broadcast(a.shape, b.shape))

    def bitand(self, a, mask: int) -> TExpr:
        a = self.lift(a)
        return TExpr("and", (a, self.const(mask, a.dtype)), a.dtype, a.shape)

    def bitcast(self, a, dtype: DType) -> TExpr:
        a = self.lift(a)
        return TExpr("bitcast", (a, dtype), dtype, a.shape)

    def unary(self, op: str, a) -> TExpr:
        a = self.lift(a)
        if op in ("neg", "abs") and not a.dtype.is_float:
            return TExpr(op, (a,), a.dtype, a.shape)
        if op == "not":
            return TExpr(op, (a,), a.dtype, a.shape)
        a = self.widen(a) if a.dtype.is_float else self.cast(a, F32)
        return TExpr(op, (a,), a.dtype, a.shape)

    def maximum(self, a, b) -> TExpr:
        return self._minmax("maximum", a, b)

    def minimum(self, a, b) -> TExpr:
        return self._minmax("minimum", a, b)

    def _minmax(self, op, a, b):
        a, b = self.lift(a), self.lift(b)
        dt = promote(a, b)
        if dt in NARROW:
            dt = F32
        return TExpr(op, (self.cast(a, dt), self.cast(b, dt)), dt, broadcast(a.shape, b.shape))

    def where(self, c, a, b) -> TExpr:
        c, a, b = self.lift(c), self.lift(a), self.lift(b)
        dt = promote(a, b)
        if dt in NARROW:
            dt = F32
        shape = broadcast(c.shape, broadcast(a.shape, b.shape))
        return TExpr("where", (c, self.cast(a, dt), self.cast(b, dt)), dt, shape)

    def cast(self, a, dtype: DType) -> TExpr:
        """Convert to ``dtype`` (float -> int truncates toward zero, as torch does). To e4m3,
        the value is first rounded in f32 (ties to even, saturating at +-448 as torch does, NaN
        kept): Triton's own conversion neither saturates nor, in the interpreter, rounds."""
        a = self.lift(a)
        if a.dtype == dtype:
            return a
        if dtype == DType.f8e4m3 and a.op != "const":
            from . import fp8
            fp8.require_native("a cast to f8e4m3")
            return self.convert(fp8.round_to_e4m3(self, a), dtype)
        return self.convert(a, dtype)

    def convert(self, a, dtype: DType) -> TExpr:
        """The plain conversion, for values ``dtype`` holds exactly (or integer targets)."""
        a = self.lift(a)
        if a.dtype == dtype:
            return a
        if a.op == "const":
            v = a.args[0]
            if dtype.is_float:
                return self.const(float(v), dtype)
            if dtype.is_bool:
                return self.const(bool(v), dtype)
            return self.const(int(v), dtype)
        return TExpr("cast", (a, dtype), dtype, a.shape)

    def widen(self, a) -> TExpr:
        a = self.lift(a)
        return self.cast(a, F32) if a.dtype in NARROW else a

    def lift(self, x) -> TExpr:
        return x if isinstance(x, TExpr) else self.const(x)

    # -- tiles ---------------------------------------------------------------------------------
    def expand_dims(self, a: TExpr, axis: int) -> TExpr:
        shape = list(a.shape)
        shape.insert(axis if axis >= 0 else len(shape) + 1 + axis, 1)
        return TExpr("expand_dims", (a, axis), a.dtype, tuple(shape))

    def broadcast_to(self, a: TExpr, shape: tuple) -> TExpr:
        if tuple(a.shape) == tuple(shape):
            return a
        return TExpr("broadcast_to", (a, tuple(shape)), a.dtype, tuple(shape))

    def block_mask(self, ptr: TExpr, mask: TExpr | None) -> TExpr | None:
        """A scalar mask of a tile access, widened to the tile (the interpreter needs it)."""
        if mask is None or mask.shape != () or ptr.shape == ():
            return mask
        return self.and_(self.full(ptr.shape, True, BOOL), mask)

    def load(self, ptr: TExpr, mask: TExpr | None, other=0) -> TExpr:
        mask = self.block_mask(ptr, mask)
        if mask is not None and ptr.shape == () and mask.shape != ():
            # a tensor of size-1 axes read under a tile's mask: the pointer takes the tile shape
            ptr = TExpr("broadcast_to", (ptr, tuple(mask.shape)), ptr.dtype, tuple(mask.shape))
        elem = ptr.dtype.elem
        if elem.is_bool:
            other = False
        elif elem.is_float:
            other = float(other)
        else:
            other = int(other)
        shape = ptr.shape if mask is None else broadcast(ptr.shape, mask.shape)
        return TExpr("load", (ptr, mask, other), elem, shape)

    def reduce(self, x: TExpr, axis: int, kind: str, propagate_nan: bool = False) -> TExpr:
        """``kind`` in sum, max, min; keeps the reduced axis as 1 (tl.sum(..., keep_dims=True)).
        Triton's max and min skip NaN; with ``propagate_nan`` a float max/min is NaN when any
        element is (torch.amax's semantics): the sum of the NaN elements (0 when there are
        none) is added to it, one more reduction over the same registers."""
        if kind == "sum":
            x = self.widen(x)
            if x.dtype.is_bool or (x.dtype.is_int and x.dtype.bits < 32):
                x = self.cast(x, I32)
        shape = list(x.shape)
        shape[axis] = 1
        out = TExpr("reduce", (x, axis, kind), x.dtype, tuple(shape))
        if propagate_nan and kind in ("max", "min") and x.dtype.is_float:
            x = self.widen(x)
            nans = TExpr("reduce", (self.where(self.binop("eq", x, x), 0.0, x), axis, "sum"), F32, tuple(shape))
            out = self.add(self.widen(out), nans)
        return out

    def argreduce(self, x: TExpr, axis: int, kind: str) -> TExpr:
        shape = list(x.shape)
        shape[axis] = 1
        return TExpr("argreduce", (x, axis, kind), I32, tuple(shape))

    def cumsum(self, x: TExpr, axis: int) -> TExpr:
        x = self.widen(x)
        if x.dtype.is_int and x.dtype.bits < 32 or x.dtype.is_bool:
            x = self.cast(x, I32)
        return TExpr("cumsum", (x, axis), x.dtype, x.shape)

    DOT_DTYPES = (DType.f16, DType.bf16, DType.f32, DType.i8, DType.f8e4m3)

    def dot(self, a: TExpr, b: TExpr, acc: TExpr, precision: str | None = None) -> TExpr:
        """acc + a @ b. ``precision`` ("ieee" or "tf32") applies to f32 operands only. Operands
        tl.dot does not take (i32, i64, u8) multiply and sum over a [M, K, N] tile instead.
        e4m3 x e4m3 products are added to ``acc`` in full f32 once per call (Triton's
        max_num_imprecise_acc = the K of the tile; Hopper's fp8 tensor cores otherwise keep
        about 14 bits of the running sum over the whole K loop)."""
        if a.dtype not in self.DOT_DTYPES or b.dtype not in self.DOT_DTYPES:
            a3 = self.cast(self.expand_dims(a, 2), acc.dtype)
            b3 = self.cast(self.expand_dims(b, 0), acc.dtype)
            prod = TExpr("mul", (a3, b3), acc.dtype, broadcast(a3.shape, b3.shape))
            summed = TExpr("reduce", (prod, 1, "sum"), acc.dtype, (prod.shape[0], 1, prod.shape[2]))
            return self.add(acc, self.reshape(summed, acc.shape))
        imprecise = a.shape[1] if a.dtype == b.dtype == DType.f8e4m3 else None
        return TExpr("dot", (a, b, acc, precision, imprecise), acc.dtype, acc.shape)

    def reshape(self, a: TExpr, shape: tuple) -> TExpr:
        return TExpr("reshape", (a, tuple(shape)), a.dtype, tuple(shape))

    def trans(self, a: TExpr) -> TExpr:
        return TExpr("trans", (a,), a.dtype, tuple(reversed(a.shape)))

    def cdiv(self, a, b) -> TExpr:
        """(a + b - 1) // b, written out: the interpreter cannot nest tl.cdiv calls."""
        a, b = self.lift(a), self.lift(b)
        return self.floordiv(self.sub(self.add(a, b), 1), b)

    # -- statements ----------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        """A name no other definition of this kernel has (parameters and variables alike)."""
        base = hint if hint in ("mask",) else ident(hint or "t")
        name = base
        k = 1
        while name in self.used:
            name = f"{base}_{k}"
            k += 1
        self.used.add(name)
        return name

    def let(self, expr, hint: str = "t") -> TExpr:
        expr = self.lift(expr)
        if expr.op in ("var", "arg", "const"):
            return expr
        v = var(self.fresh(hint), expr.dtype, expr.shape)
        self.blocks[-1].append(Let(v, expr))
        self.defs[v.name] = expr
        return v

    def assign(self, v: TExpr, expr: TExpr) -> None:
        """Re-assign a variable (loop-carried accumulators)."""
        expr = self.lift(expr)
        if expr.dtype != v.dtype:
            expr = self.cast(expr, v.dtype)
        if tuple(expr.shape) != tuple(v.shape):
            expr = self.broadcast_to(expr, v.shape)
        self.blocks[-1].append(Let(v, expr))

    def declare(self, expr, hint: str) -> TExpr:
        """A new variable that a loop will re-assign (never folded into its uses)."""
        expr = self.lift(expr)
        v = var(self.fresh(hint), expr.dtype, expr.shape)
        self.blocks[-1].append(Let(v, expr))
        return v

    def store(self, ptr: TExpr, value: TExpr, mask: TExpr | None) -> None:
        ptr, value, mask = self._store_shapes(ptr, value, mask)
        elem = ptr.dtype.elem
        if value.dtype != elem:
            value = self.cast(value, elem)
        self.blocks[-1].append(Store(ptr, value, mask))

    def _store_shapes(self, ptr: TExpr, value: TExpr, mask: TExpr | None):
        """A store's pointer, value and mask at one tile shape (tl.store wants the pointer at
        least as wide as the value and the mask; masked-off duplicates write nothing)."""
        shape = broadcast(ptr.shape, value.shape)
        if mask is not None:
            shape = broadcast(shape, mask.shape)
        if shape != tuple(ptr.shape):
            ptr = TExpr("broadcast_to", (ptr, shape), ptr.dtype, shape)
        if shape != tuple(value.shape) and value.shape != ():
            value = self.broadcast_to(value, shape)
        if mask is not None and mask.shape == () and shape != ():
            mask = self.and_(self.full(shape, True, BOOL), mask)
        return ptr, value, mask

    def atomic_add(self, ptr: TExpr, value: TExpr, mask: TExpr | None) -> None:
        ptr, value, mask = self._store_shapes(ptr, value, mask)
        elem = ptr.dtype.elem
        if value.dtype != elem:
            value = self.cast(value, elem)
        self.blocks[-1].append(Store(ptr, value, mask, atomic_add=True))

    def comment(self, text: str) -> None:
        self.blocks[-1].append(Comment(text))

    @contextlib.contextmanager
    def loop(self, hint: str, start, stop, step):
        i = var(self.fresh(hint), I32, ())
        self.blocks.append([])
        try:
            yield i
        finally:
            body = self.blocks.pop()
            self.blocks[-1].append(For(i, self.lift(start), self.lift(stop), self.lift(step), tuple(body)))

    # -- the kernel ----------------------------------------------------------------------------
    def kernel(self, grid: Iterable[GridDim], doc: str = "", warps=(4,), stages=(1,), presets=(),
               extents=(), family: str = "") -> TileKernel:
        assert len(self.blocks) == 1, "unclosed loop"
        order = {"ptr": 0, "size": 1, "stride": 2, "scalar": 3}
        params = sorted(self.params.values(), key=lambda p: order[p.kind])
        return TileKernel(self.name, tuple(params), tuple(self.tunables.values()), tuple(grid),
                          tuple(self.blocks[0]), doc, tuple(warps), tuple(stages), tuple(presets), tuple(extents),
                          family)


def _is_zero(e: TExpr) -> bool:
    return e.op == "const" and not isinstance(e.args[0], bool) and e.args[0] == 0


def _is_one(e: TExpr) -> bool:
    return e.op == "const" and not isinstance(e.args[0], bool) and e.args[0] == 1


