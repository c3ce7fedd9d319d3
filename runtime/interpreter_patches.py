"""bf16 in Triton's interpreter: corrections, applied once by ``device.interpreting()``.

The interpreter (``triton/runtime/interpreter.py``, Triton 3.6 and 3.9) keeps a bf16 tile as a
numpy ``uint16`` array of bit patterns, since numpy has no bfloat16. Operations that only move
those bits are right: loads, stores, broadcasts, reshapes, transposes, ``tl.where`` (a select),
``abs`` (the sign bit). Every operation that reads them as numbers is wrong:

- ``tl.dot`` calls ``np.matmul(a, b, dtype=float32)`` on the uint16 arrays: it multiplies the bit
  patterns as integers (0x3F80 for 1.0 counts as 16256), so results are off by about 1e10;
- arithmetic, comparisons, min/max (``binary_op``), unary math (``unary_op``), clamp
  (``ternary_op``), ``fma``, ``erf`` and ``rsqrt`` compute on the integers, and comparisons
  order the bit patterns (every negative value sorts above every positive one);
- casts: f32 -> bf16 truncates (round toward zero; a GPU rounds to nearest even) and turns f32
  subnormals into wrong values; int, bool and f64 -> bf16 and bf16 -> int reinterpret the number
  as bits (``astype(uint16)``: 3 becomes the subnormal 0x0003); f16 -> bf16 truncates (3.9) or
  overflows numpy (3.6);
- reductions and scans (``tl.max``/``min``/``argmax``/``sum``, ``tl.cumsum``) reduce the integers;
- ``tl.atomic_add`` on bf16 raises "Unsupported data type" from the C++ helper;
- Triton 3.6's builder has no ``get_bf16``, so a bf16 constant (``tl.full(..., tl.bfloat16)``)
  raises AttributeError.

The corrections keep bf16 data as uint16 bit patterns and change only what happens to bf16
operands: they are decoded to f32 (exact: bf16 is the top half of an f32), computed on, and
rounded back to bf16 to nearest even, as the GPU's ``cvt.rn.bf16.f32`` does. ``tl.dot`` takes
the bf16 operands exactly and accumulates in f32, as a tensor core does. f32 holds at least
2 * 8 + 2 significant bits, so computing +, -, *, / and sqrt of bf16 values in f32 and rounding
once more gives the correctly rounded bf16 result; f64 and integer sources are rounded to f32
to odd first, for the same reason. Operations on other dtypes run the interpreter's own code.

Whatever else takes a bf16 operand and is neither corrected here nor known to move bits (a
Triton version's new builder method, histograms, inline asm, extern calls, TMA descriptors)
raises ``InterpreterBf16Error`` instead of returning numbers; the executor turns it into an
``opforge.CallError``. If the corrections cannot be installed or their self-check fails (an
interpreter whose internals differ from 3.6 and 3.9), ``bf16_problem()`` says why and every op
with a bf16 value refuses to run under the interpreter (``CompiledOp.run``).

These change the interpreter of the whole process (class attributes of its builder and its
reduce/scan helpers), for bf16 operands only; site-packages is never edited. Two faults of
Triton 3.6's interpreter that touch every dtype (a store through a broadcast pointer tile, a
bool kernel argument) are mended here too (``_install_fixes``).
"""
from __future__ import annotations

import functools
import threading

import numpy as np

_lock = threading.Lock()
_state: dict = {"applied": False, "problem": None}


class InterpreterBf16Error(RuntimeError):
    """A bf16 operation the corrected interpreter cannot run right."""


# -- bf16 <-> f32 on bit patterns -----------------------------------------------------------------
def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16(x: np.ndarray, toward_zero: bool = False) -> np.ndarray:
    """Round to nearest even (or toward zero); NaN stays NaN (quiet), overflow becomes inf."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    if toward_zero:
        r = b >> np.uint32(16)
    else:
        r = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    r = np.where(nan, (b >> np.uint32(16)) | np.uint32(0x40), r)
    return r.astype(np.uint16)


def f64_to_f32_odd(x: np.ndarray) -> np.ndarray:
    """f64 -> f32 rounded to odd (truncate, then set the last bit if anything was lost), so that
    rounding the f32 to bf16 afterwards is the correct single rounding of the f64 value."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):   # beyond f32: inf, as bf16 has it too
        f = x.astype(np.float32)
    bits = np.ascontiguousarray(f).view(np.uint32)
    inexact = (f.astype(np.float64) != x) & np.isfinite(f) & ~np.isnan(x)
    even = (bits & np.uint32(1)) == 0
    up = np.abs(f.astype(np.float64)) > np.abs(x)     # nearest-even went away from zero
    fixed = np.where(up, bits - np.uint32(1), bits + np.uint32(1))
    return np.where(inexact & even, fixed, bits).astype(np.uint32).view(np.float32)


def to_bf16(data: np.ndarray, toward_zero: bool = False) -> np.ndarray:
    """Any numpy numbers -> bf16 bit patterns, rounded once."""
    data = np.asarray(data)
    if data.dtype == np.float32 or data.dtype == np.float16 or data.dtype == np.bool_:
        return f32_to_bf16(data.astype(np.float32), toward_zero)
    return f32_to_bf16(f64_to_f32_odd(data.astype(np.float64)), toward_zero)


# -- the corrections ------------------------------------------------------------------------------
def _install() -> None:
    import triton.language as tl
    from triton.runtime import interpreter as itp

    B = itp.InterpreterBuilder
    TensorHandle = itp.TensorHandle
    BF16, F32 = tl.bfloat16, tl.float32
    RTZ = itp._ir.ROUNDING_MODE.RTZ

    def is_bf16(h) -> bool:
        # the data must be bit patterns too: a comparison's handle keeps its operands' dtype
        # (the tensor around it says int1) while its data are bools
        return (isinstance(h, TensorHandle) and getattr(h.dtype, "scalar", h.dtype) == BF16
                and h.data.dtype == np.uint16)

    def num(h) -> np.ndarray:
        return bf16_to_f32(h.data) if is_bf16(h) else h.data

    def result(out: np.ndarray, tl_dtype) -> TensorHandle:
        out = np.asarray(out)
        if tl_dtype == BF16 and out.dtype.kind == "f":
            out = to_bf16(out)
        return TensorHandle(out, tl_dtype)

    orig = {name: getattr(B, name) for name in ("binary_op", "unary_op", "ternary_op", "cast_impl",
                                               "create_fp_to_fp", "create_dot", "create_fma",
                                               "create_erf", "create_rsqrt", "create_atomic_rmw")}

    def binary_op(self, lhs, rhs, op):
        if not (is_bf16(lhs) or is_bf16(rhs)):
            return orig["binary_op"](self, lhs, rhs, op)
        return result(op(num(lhs), num(rhs)), lhs.dtype.scalar)

    def unary_op(self, arg, op):
        if not is_bf16(arg):
            return orig["unary_op"](self, arg, op)
        return result(op(num(arg)), arg.dtype.scalar)

    def ternary_op(self, lhs, rhs, other, op):
        # a select (np.where) moves bits and is right as it is; clamp compares numbers
        if op is np.where or not any(is_bf16(h) for h in (lhs, rhs, other)):
            return orig["ternary_op"](self, lhs, rhs, other, op)
        return result(op(num(lhs), num(rhs), num(other)), other.dtype.scalar)

    def cast_impl(self, src, dst_type):
        dst = dst_type.scalar
        if isinstance(src, TensorHandle) and src.data.dtype == np.bool_:
            # a comparison of bf16 values: its handle keeps the operands' dtype (bf16) over bool
            # data, which the stock cast would read as bf16 bit patterns (a reshape error)
            vals = src.data.astype(np.float32)
            return TensorHandle(to_bf16(vals) if dst == BF16 else vals.astype(itp._get_np_dtype(dst)), dst)
        if not is_bf16(src) and dst != BF16:
            return orig["cast_impl"](self, src, dst_type)
        if is_bf16(src) and dst == BF16:
            return TensorHandle(src.data.copy(), dst)
        if dst == BF16:
            return TensorHandle(to_bf16(src.data), dst)
        return TensorHandle(num(src).astype(itp._get_np_dtype(dst)), dst)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        dst = dst_type.scalar
        if not is_bf16(src) and dst != BF16:
            return orig["create_fp_to_fp"](self, src, dst_type, rounding_mode)
        if is_bf16(src) and dst == BF16:
            return TensorHandle(src.data.copy(), dst)
        if is_bf16(src):       # bf16 -> f32 is exact; fp8 destinations round with the interpreter's code
            wide = TensorHandle(num(src), F32)
            if dst.primitive_bitwidth == 8:
                return orig["create_fp_to_fp"](self, wide, dst_type, rounding_mode)
            return TensorHandle(wide.data.astype(itp._get_np_dtype(dst)), dst)
        if src.dtype.scalar.primitive_bitwidth == 8:   # fp8 -> f32 is exact; then one rounding
            src = orig["create_fp_to_fp"](self, src, F32, None)
        return TensorHandle(to_bf16(src.data, toward_zero=rounding_mode == RTZ), dst)

    def dot_operand(h) -> np.ndarray:
        if is_bf16(h):
            return num(h)
        if h.dtype.scalar.is_floating() and h.dtype.scalar.primitive_bitwidth == 8:
            return itp._convert_float(h.data, h.dtype.scalar, tl.float16, None).view(np.float16).astype(np.float32)
        return h.data

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if not (is_bf16(a) or is_bf16(b)):
            return orig["create_dot"](self, a, b, d, input_precision, max_num_imprecise_acc)
        # bf16 x bf16 products are exact in f32; the sum is kept in the f32 accumulator
        acc = num(d)
        out = np.matmul(dot_operand(a), dot_operand(b), dtype=np.float32).astype(acc.dtype) + acc
        return result(out, d.dtype.scalar)

    def create_fma(self, x, y, z):
        if not any(is_bf16(h) for h in (x, y, z)):
            return orig["create_fma"](self, x, y, z)
        exact = np.multiply(num(x), num(y), dtype=np.float64) + num(z).astype(np.float64)
        return result(exact, z.dtype.scalar)

    def create_erf(self, arg):
        if not is_bf16(arg):
            return orig["create_erf"](self, arg)
        return result(itp.np_erf_fp32(num(arg)), arg.dtype.scalar)

    def create_rsqrt(self, arg):
        if not is_bf16(arg):
            return orig["create_rsqrt"](self, arg)
        return result(1 / np.sqrt(num(arg)), arg.dtype.scalar)

    fadd = itp._ir.ATOMIC_OP.FADD

    def create_atomic_rmw(self, rmw_op, ptr, val, mask, sem, scope):
        if not is_bf16(val):
            return orig["create_atomic_rmw"](self, rmw_op, ptr, val, mask, sem, scope)
        if rmw_op != fadd:
            raise InterpreterBf16Error(f"atomic {rmw_op} on bf16")
        # Programs run one after another here, so a read-add-write is atomic; lanes of one call
        # that share an address are added one at a time, each rounded to bf16 as a GPU does.
        shape = np.broadcast(ptr.data, val.data, mask.data).shape
        ptrs, vals, on = (np.ascontiguousarray(a).reshape(-1)
                          for a in np.broadcast_arrays(ptr.data, val.data, mask.data))
        load, store = itp._interpreter.load, itp._interpreter.store
        u16 = np.dtype(np.uint16)
        if len(np.unique(ptrs[on])) == int(on.sum()):      # no shared address: all lanes at once
            old = load(ptrs, on, np.zeros_like(vals), u16)
            store(ptrs, to_bf16(bf16_to_f32(old) + bf16_to_f32(vals)), on)
            return TensorHandle(old.reshape(shape), BF16)
        old = np.zeros(ptrs.shape, dtype=np.uint16)
        one, zero = np.ones(1, dtype=bool), np.zeros(1, dtype=np.uint16)
        for i in np.flatnonzero(on):
            cur = load(ptrs[i:i + 1], one, zero, u16)
            old[i] = cur[0]
            store(ptrs[i:i + 1], to_bf16(bf16_to_f32(cur) + bf16_to_f32(vals[i:i + 1])), one)
        return TensorHandle(old.reshape(shape), BF16)

    for name, fn in [("binary_op", binary_op), ("unary_op", unary_op), ("ternary_op", ternary_op),
                     ("cast_impl", cast_impl), ("create_fp_to_fp", create_fp_to_fp),
                     ("create_dot", create_dot), ("create_fma", create_fma), ("create_erf", create_erf),
                     ("create_rsqrt", create_rsqrt), ("create_atomic_rmw", create_atomic_rmw)]:
        fn.__doc__ = f"opforge: bf16 operands decoded to f32 (runtime/interpreter_patches.py)"
        setattr(B, name, fn)
    # the lambdas of the builder (create_fadd, create_exp, create_fp_trunc, ...) call these
    # through self, so they are corrected too: casts are also made with cast_impl (the
    # 3.6 builder has no get_bf16: constants are f32, cast)

    if not hasattr(B, "get_bf16"):
        # Triton 3.6's builder lacks it, so tl.full(..., tl.bfloat16) raised AttributeError
        B.get_bf16 = lambda self, value: self.create_fp_trunc(self.get_fp32(value), BF16)

    _install_reduce_scan(itp, tl, BF16)
    _guard_the_rest(B, is_bf16)


def _install_reduce_scan(itp, tl, BF16) -> None:
    R, S = itp.ReduceOps, itp.ScanOps
    min_max, rsum, cumsum, cumprod = R.min_max, R.sum, S.cumsum, S.cumprod

    def bf16_tensor(x) -> bool:
        return getattr(x.dtype, "scalar", x.dtype) == BF16 and x.handle.data.dtype == np.uint16

    def new_min_max(self, input, val_reduce_op, idx_reduce_op=None):
        x = input[0] if isinstance(input, tuple) else input
        if not bf16_tensor(x):
            return min_max(self, input, val_reduce_op, idx_reduce_op)
        data = bf16_to_f32(x.handle.data)
        val = idx = None
        if val_reduce_op:
            val = self.to_tensor(to_bf16(val_reduce_op(data, axis=self.axis, keepdims=self.keep_dims)), x.dtype)
        if idx_reduce_op:
            idx = self.to_tensor(idx_reduce_op(data, axis=self.axis, keepdims=self.keep_dims), tl.int32)
        if val is not None and idx is not None:
            return val, idx
        return val if val is not None else idx

    def new_sum(self, input):
        if not bf16_tensor(input):
            return rsum(self, input)
        s = np.sum(bf16_to_f32(input.handle.data), axis=self.axis, keepdims=self.keep_dims)
        return self.to_tensor(to_bf16(s), input.dtype)

    def scan(orig, fn):
        def new(self, input):
            if not bf16_tensor(input):
                return orig(self, input)
            return [self.to_tensor(to_bf16(fn(bf16_to_f32(input.handle.data), axis=self.axis)), input.dtype)]
        return new

    R.min_max, R.sum = new_min_max, new_sum
    S.cumsum, S.cumprod = scan(cumsum, np.cumsum), scan(cumprod, np.cumprod)
    # generic_reduce / generic_scan run the combine function through the builder: corrected above


# Builder methods that are right for bf16 as they are: they move bits (or take no tensors), or
# they only call the corrected methods above through ``self``.
MOVES_BITS = {
    "create_load", "create_store", "create_masked_load", "create_masked_store", "create_splat",
    "create_unsplat", "create_broadcast", "create_reshape", "create_trans", "create_expand_dims",
    "create_cat", "create_join", "create_split", "create_gather", "create_bitcast", "create_fabs",
    "create_atomic_cas", "create_atomic_load", "create_atomic_store", "create_addptr",
    "create_int_to_ptr", "create_ptr_to_int", "get_null_value", "get_all_ones_value",
    "create_tensor_pointer_load", "create_tensor_pointer_store", "create_make_block_ptr", "create_advance",
    "create_get_program_id", "create_get_num_programs", "create_make_range", "create_barrier",
    "create_assert", "create_assume", "get_cache_policy", "set_grid_dim", "set_grid_idx",
}
CALLS_CORRECTED = {
    "create_fadd", "create_fmul", "create_fdiv", "create_frem", "create_fsub", "create_fneg", "create_mul",
    "create_precise_divf", "create_approx_divf", "create_add", "create_sub", "create_minimumf",
    "create_minnumf", "create_maximumf", "create_maxnumf", "create_minsi", "create_minui", "create_maxsi",
    "create_maxui", "create_and", "create_or", "create_xor", "create_shl", "create_lshr",
    "create_clampf", "create_select", "create_cos", "create_exp", "create_exp2", "create_iabs",
    "create_floor", "create_ceil", "create_log", "create_log2", "create_precise_sqrt", "create_sqrt",
    "create_sin", "create_si_to_fp", "create_ui_to_fp", "create_fp_to_si", "create_fp_to_ui",
    "create_fp_ext", "create_fp_trunc", "create_int_cast", "get_bf16",
} | {f"create_{c}cmp{p}" for c, ps in (("f", ("OLT", "OGT", "OLE", "OGE", "OEQ", "ONE", "ULT", "UGT", "ULE",
                                                "UGE", "UEQ", "UNE")),
                                      ("i", ("SLE", "SLT", "SGE", "SGT", "ULE", "ULT", "UGE", "UGT", "EQ", "NE")))
      for p in ps}
CORRECTED = {"binary_op", "unary_op", "ternary_op", "cast_impl", "create_fp_to_fp", "create_dot",
             "create_fma", "create_erf", "create_rsqrt", "create_atomic_rmw"}


def _guard_the_rest(B, is_bf16) -> None:
    def bf16_in(args) -> bool:
        for a in args:
            if is_bf16(a) or (isinstance(a, (list, tuple)) and bf16_in(a)):
                return True
        return False

    def guard(name, fn):
        @functools.wraps(fn)
        def guarded(self, *args, **kwargs):
            if bf16_in(args) or bf16_in(kwargs.values()):
                raise InterpreterBf16Error(f"Triton's interpreter has no correct {name} for bf16")
            return fn(self, *args, **kwargs)
        return guarded

    known = MOVES_BITS | CALLS_CORRECTED | CORRECTED
    for name in dir(B):
        if name.startswith("__") or name in known or (name.startswith("get_") and name.endswith("_ty")):
            continue
        if name.startswith("get_") and name[4:].rstrip("0123456789").lstrip("u") in ("int", "fp"):
            continue    # get_int32(value), get_fp16(value), ...: Python numbers, no tensors
        fn = getattr(B, name)
        if callable(fn) and not isinstance(fn, type):
            setattr(B, name, guard(name, fn))


# -- self-check -----------------------------------------------------------------------------------
def _self_check() -> str | None:
    """A few builder-level operations on bf16 handles against numbers worked out by hand: a
    dot, a cast that must round to nearest even, an int cast, an add, a comparison, a max."""
    import triton.language as tl
    from triton.runtime import interpreter as itp
    b = itp.InterpreterBuilder()
    H = itp.TensorHandle
    one, three = 0x3F80, 0x4040                  # bf16 1.0, 3.0
    a = H(np.array([[one, three]], dtype=np.uint16), tl.bfloat16)
    c = H(np.array([[three], [one]], dtype=np.uint16), tl.bfloat16)
    d = H(np.zeros((1, 1), dtype=np.float32), tl.float32)
    checks = {
        "dot": (b.create_dot(a, c, d, "ieee", 0).data, np.array([[6.0]], dtype=np.float32)),
        "f32 -> bf16": (b.cast_impl(H(np.array([1.9999999, -3.0], dtype=np.float32), tl.float32),
                                     tl.bfloat16).data, np.array([0x4000, 0xC040], dtype=np.uint16)),
        "i32 -> bf16": (b.cast_impl(H(np.array([3], dtype=np.int32), tl.int32), tl.bfloat16).data,
                        np.array([three], dtype=np.uint16)),
        "add": (b.create_fadd(H(np.array([one], dtype=np.uint16), tl.bfloat16),
                              H(np.array([three], dtype=np.uint16), tl.bfloat16)).data,
                np.array([0x4080], dtype=np.uint16)),
        "compare": (b.create_fcmpOLT(H(np.array([0xBF80], dtype=np.uint16), tl.bfloat16),
                                     H(np.array([one], dtype=np.uint16), tl.bfloat16)).data, np.array([True])),
    }
    for what, (got, want) in checks.items():
        if got.dtype != want.dtype or not np.array_equal(got, want):
            return f"the corrected interpreter's bf16 {what} gives {got!r}, not {want!r}"
    return None


def _install_fixes() -> None:
    """Two faults of Triton 3.6's interpreter (NumPy 2.1), for every dtype.

    - It refuses to store through a broadcast pointer tile (``tl.store(tl.broadcast_to(ptr,
      shape), ...)``, as a row kernel of width 1 writes its result): ``np.broadcast_to`` gives a
      read-only view and the C++ store asks for writeable arrays ("array is not writeable"). The
      store only reads its pointers, values and mask, so a read-only one is copied first.
    - A Python bool kernel argument (below).
    Both are no-ops under 3.9."""
    from triton.runtime import interpreter as itp
    B = itp.InterpreterBuilder
    store = B.create_masked_store

    def writeable(h):
        if isinstance(h, itp.TensorHandle) and isinstance(h.data, np.ndarray) and not h.data.flags.writeable:
            return itp.TensorHandle(np.array(h.data), h.dtype)
        return h

    @functools.wraps(store)
    def create_masked_store(self, ptrs, value, mask, *rest):
        return store(self, writeable(ptrs), writeable(value), writeable(mask), *rest)
    B.create_masked_store = create_masked_store

    # Triton 3.6's interpreter passes a Python bool kernel argument as an int32 array typed int1,
    # which its own check then rejects ("numpy data itemsize (32 bits) exceeds dtype
    # primitive_bitwidth (1 bits)"); 3.9 makes it a bool array, as here
    convert = itp._implicit_cvt
    import triton.language as tl

    @functools.wraps(convert)
    def _implicit_cvt(arg):
        if isinstance(arg, bool):
            return tl.tensor(itp.TensorHandle(np.array([arg], dtype=np.bool_), tl.int1), tl.int1)
        return convert(arg)
    itp._implicit_cvt = _implicit_cvt


def apply() -> None:
    """Install the corrections (once per process) and check them; idempotent."""
    with _lock:
        if _state["applied"]:
            return
        _state["applied"] = True
        _install_fixes()
        try:
            _install()
            _state["problem"] = _self_check()
        except Exception as e:      # an interpreter whose internals are not those of 3.6 / 3.9
            import triton
            _state["problem"] = (f"opforge's bf16 corrections do not fit Triton {triton.__version__}'s "
                                 f"interpreter ({type(e).__name__}: {e})")


def bf16_problem() -> str | None:
    """Why bf16 cannot run under this process's interpreter, or None when it can."""
    apply()
    return _state["problem"]


def interpreter_cause(exc: BaseException) -> InterpreterBf16Error | None:
    """The InterpreterBf16Error behind an exception the interpreter wrapped, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, InterpreterBf16Error):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
