"""Static estimates of what a kernel needs at a config, before anything is compiled: shared
memory and registers per thread. The autotuner prunes with them (runtime/autotune.fits) and the
heuristic config shrinks its pipeline to fit (runtime/config.py); on a GPU the compiler's own
figures then have the last word (runtime/native.py).

Shared memory, read from the kernel's body as Triton allocates it:
- every load inside a loop is pipelined: one buffer per stage of the tile the load reads, in the
  pointer's element type (an int4 GEMM's packed bytes, zero points and scales all count, a
  per-column scale only as [1, BLOCK_N]);
- a dot operand that is computed (dequantised weights, fp8 decoded through integers) or loaded
  before the loop (attention's query tile) is staged through shared memory once more in the
  dot's type;
- besides the pipeline, the largest tile the kernel holds (its accumulator, converted between
  layouts in the epilogue, or a row being reduced) may need a scratch copy: the estimate takes
  the larger of the two, as Triton's allocator reuses the pipeline's buffers after the loop.
tests/test_native_sweep.py checks that this bounds the compiled figure from above for every
config of the examples' CPU sweep.

Registers: the loop-carried accumulators (one f32/i32 per element per thread) plus, in the K
loop, the live tile temporaries: the operands, and for a computed operand every intermediate of
its dequantisation (f32 values count one register per element per thread, 16-bit ones half, bytes
a quarter), LIVE_SHARE of them live at once. A rough estimate, used only to drop configs that
could not avoid spilling; the compiler's figure decides on a GPU (NativePrune) and in the
native check. Spills that ptxas makes at low register counts (a 12-byte stack slot in some
16-row mma.sync tiles) are not predicted.
"""
from __future__ import annotations

from ..ir.tile import For, Let, TExpr, TileKernel, walk
from ..ir.types import DType
from .config import Config

POINTER_BYTES = 8
# the share of the K loop's temporaries counted as live at once (ptxas reuses registers): fitted
# to the compiled figures of the examples' GEMMs on sm_90a, where configs whose count passes 255
# spilled and few below it did
LIVE_SHARE = 0.4


def _elems(shape, v: dict) -> int:
    n = 1
    for s in shape:
        n *= v.get(s, 1) if isinstance(s, str) else int(s)
    return n


def _itemsize(dt) -> float:
    if dt == DType.bool:
        return 1
    return dt.itemsize if hasattr(dt, "itemsize") else POINTER_BYTES


def _exprs(e: TExpr):
    stack = [e]
    while stack:
        x = stack.pop()
        yield x
        stack.extend(a for a in x.args if isinstance(a, TExpr))


def _loops(k: TileKernel) -> list[For]:
    return [s for s in walk(k.body) if isinstance(s, For)]


def _loop_loads(loop: For) -> list[TExpr]:
    out = []
    for s in walk(loop.body):
        if isinstance(s, Let):
            out.extend(x for x in _exprs(s.value) if x.op == "load")
    return out


def _dots(stmts) -> list[TExpr]:
    return [x for s in walk(stmts) if isinstance(s, Let) for x in _exprs(s.value) if x.op == "dot"]


def _defs(stmts) -> dict[str, TExpr]:
    return {s.var.name: s.value for s in walk(stmts) if isinstance(s, Let)}


def _is_loaded(e: TExpr, defs: dict) -> bool:
    """A dot operand that is a load (through variables), not computed from one."""
    while e.op == "var" and e.name in defs:
        e = defs[e.name]
    return e.op == "load"


def _name(e: TExpr) -> str | None:
    return e.name if e.op == "var" else None


def shared_memory(k: TileKernel, cfg: Config) -> int:
    v = cfg.as_dict()
    stages = max(cfg.num_stages, 1)
    defs = _defs(k.body)
    pipeline = 0
    for loop in _loops(k):
        per_stage = sum(_elems(x.shape, v) * _itemsize(x.dtype) for x in _loop_loads(loop))
        inner = {s.var.name for s in walk(loop.body) if isinstance(s, Let)}
        # computed operands are staged through shared memory, and so are operands loaded before
        # the loop (attention's query tile)
        staged = sum(_elems(op.shape, v) * _itemsize(op.dtype) for d in _dots(loop.body)
                     for op in d.args[:2] if not _is_loaded(op, defs) or _name(op) not in inner)
        pipeline = max(pipeline, per_stage * stages + staged)
    largest = max((_elems(s.var.shape, v) * max(_itemsize(s.var.dtype), 4) for s in walk(k.body)
                   if isinstance(s, Let) and isinstance(s.var.dtype, DType)), default=0)
    return int(max(pipeline, largest))


def _accumulators(k: TileKernel) -> set[str]:
    return {d.args[2].name for d in _dots(k.body) if d.args[2].op == "var"}


def accumulator_elements(k: TileKernel, cfg: Config) -> float:
    """Elements of the dots' accumulators each thread holds."""
    v = cfg.as_dict()
    accs, seen, n = _accumulators(k), set(), 0.0
    for s in walk(k.body):
        if isinstance(s, Let) and s.var.name in accs and s.var.name not in seen:
            seen.add(s.var.name)
            n += _elems(s.var.shape, v)
    return n / (32 * cfg.num_warps)


def registers(k: TileKernel, cfg: Config) -> float:
    """Estimated registers per thread."""
    v = cfg.as_dict()
    threads = 32 * cfg.num_warps
    accs = _accumulators(k)
    acc_regs = accumulator_elements(k, cfg)
    temps = 0.0
    for loop in _loops(k):
        for s in walk(loop.body):
            if isinstance(s, Let) and s.var.name not in accs and isinstance(s.var.dtype, DType) and s.var.shape:
                temps += _elems(s.var.shape, v) / threads * _itemsize(s.var.dtype) / 4
    return acc_regs + LIVE_SHARE * temps
