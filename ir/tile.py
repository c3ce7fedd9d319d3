"""Level 2: tile-level kernels.

One :class:`TileKernel` per fusion group: parameters (pointers, sizes, strides, scalars), block
sizes as tunables with candidate values, and a body of statements over tiles. Expressions are
one node class, ``TExpr(op, args, dtype, shape)`` (tinygrad's shape of IR): ``shape`` is the
tile shape in block names and 1s (``("BLOCK_M", 1)``), ``()`` for scalars. The vocabulary is
Triton's core (OPS below), so codegen is a table from op to text and takes no decisions.

The host side of a compiled op is a :class:`Plan`: buffers (inputs, intermediates, outputs),
scalars evaluated on the host, and one :class:`Launch` per kernel saying how each kernel
argument and the grid are computed from the bound sizes and the chosen config.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from .dims import Dim
from .types import DType


@dataclass(frozen=True)
class PtrType:
    elem: DType

    def __str__(self) -> str:
        return f"*{self.elem}"


TDType = DType | PtrType

# op -> kind (leaf, arith, compare, math, mem, tile). ``maximum`` and ``minimum`` of floats give
# NaN when either operand is NaN (torch.maximum's semantics, not C's fmax).
OPS: dict[str, str] = {
    "var": "leaf", "arg": "leaf", "const": "leaf", "program_id": "leaf", "arange": "leaf",
    "add": "arith", "sub": "arith", "mul": "arith", "truediv": "arith", "floordiv": "arith", "mod": "arith",
    "neg": "arith", "and": "arith", "or": "arith", "not": "arith", "shr": "arith", "shl": "arith",
    "lt": "compare", "le": "compare", "gt": "compare", "ge": "compare", "eq": "compare", "ne": "compare",
    "exp": "math", "exp2": "math", "log": "math", "log2": "math", "sqrt": "math", "rsqrt": "math",
    "sin": "math", "cos": "math", "abs": "math", "erf": "math", "floor": "math", "sigmoid": "math",
    "maximum": "math", "minimum": "math", "where": "math", "cast": "math", "cdiv": "math",
    "bitcast": "math",
    "load": "mem", "expand_dims": "tile", "broadcast_to": "tile", "full": "tile", "dot": "tile",
    "reduce": "tile", "argreduce": "tile", "cumsum": "tile", "trans": "tile", "reshape": "tile",
}


@dataclass(frozen=True, eq=False)
class TExpr:
    op: str
    args: tuple
    dtype: TDType
    shape: tuple = ()

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"unknown tile op {self.op!r}")

    @property
    def name(self) -> str:
        assert self.op in ("var", "arg")
        return self.args[0]

    def __repr__(self) -> str:
        return f"TExpr({self.op}, {self.dtype}, {list(self.shape)})"


def var(name: str, dtype: TDType, shape: tuple = ()) -> TExpr:
    return TExpr("var", (name,), dtype, tuple(shape))


# -- statements ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Let:
    var: TExpr
    value: TExpr


@dataclass(frozen=True)
class Store:
    ptr: TExpr
    value: TExpr
    mask: TExpr | None = None
    atomic_add: bool = False     # tl.atomic_add: several programs add into one element


@dataclass(frozen=True)
class For:
    var: TExpr
    start: TExpr
    stop: TExpr
    step: TExpr
    body: tuple


@dataclass(frozen=True)
class Comment:
    text: str


Stmt = Let | Store | For | Comment


# -- kernels ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KParam:
    """A kernel parameter and where the host gets it: ``ptr`` (the tensor ``buffer``),
    ``stride`` (``buffer``'s stride along ``axis``), ``size`` (the value of ``dim`` under the
    call's bindings) or ``scalar`` (the host scalar ``buffer``)."""
    name: str
    kind: str
    dtype: TDType
    buffer: str | None = None
    axis: int | None = None
    dim: Dim | None = None


@dataclass(frozen=True)
class Tunable:
    """A block size. Either a free choice among ``candidates`` (autotuned on a GPU, ``cpu`` on
    the interpreter), or, with ``covers`` set, the next power of two of that extent (a tile that
    spans a whole row), clamped to ``[lo, hi]``."""
    name: str
    candidates: tuple[int, ...] = ()
    cpu: int = 16
    covers: Dim | None = None
    lo: int = 1
    hi: int = 1 << 16
    # or fixed by a rule of sizes shared with other kernels: (name in TUNABLE_RULES, sizes...)
    rule: tuple | None = None


def _moe_block(slots, experts):
    from .prims_fused import moe_block
    return moe_block(slots, experts)


TUNABLE_RULES = {"moe_block": _moe_block, "split_k": lambda *a: _split_k(*a), "split_kv": lambda *a: _split_kv(*a)}


@dataclass(frozen=True)
class GridDim:
    """One grid axis: the product of ``cdiv(extent, block)`` (or ``extent`` where block is
    None) over its parts. An extent that is a string names a tunable whose chosen value is the
    count (``GridDim.count("SPLIT_K")``: one program per split)."""
    parts: tuple[tuple[Dim | str, str | None], ...]

    @staticmethod
    def of(extent: Dim, block: str | None = None) -> "GridDim":
        return GridDim(((extent, block),))

    @staticmethod
    def count(tunable: str) -> "GridDim":
        return GridDim(((tunable, None),))


@dataclass(frozen=True)
class TileKernel:
    name: str
    params: tuple[KParam, ...]
    tunables: tuple[Tunable, ...]
    grid: tuple[GridDim, ...]
    body: tuple
    doc: str = ""
    # configurations the autotuner may time: (tunable values..., num_warps, num_stages) choices
    warps: tuple[int, ...] = (4,)
    stages: tuple[int, ...] = (1,)
    # explicit candidate configurations ((name, value)..., num_warps, num_stages) replacing the
    # product of the candidates, where that product is too large to time (matmuls)
    presets: tuple = ()
    # the extent each block size tiles, (("BLOCK_M", M), ("BLOCK_K", K), ...): what the heuristic
    # config's shape buckets read (runtime/config.py)
    extents: tuple = ()
    # what the lowering built, where the autotuner's rules differ by template: "flash" (an
    # attention forward kernel over loaded scores), "flash_mod" (scores computed on the tile),
    # "flash_bwd"; "" for the rest (runtime/autotune.fits)
    family: str = ""


# -- the host plan ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Buffer:
    """A tensor of the compiled op: an input parameter, an intermediate, or an output."""
    name: str
    dtype: DType
    shape: tuple[Dim, ...]
    kind: str            # "input" | "temp" | "output"
    zeroed: bool = False  # starts as zeros (a kernel adds into it)


def _split_k(m, n, k, batch):
    """K splits for a matmul whose output tiles are too few to fill the GPU (decode shapes):
    double while there are fewer than ~96 tile-programs and each split keeps >= 256 of K."""
    tiles = -(-m // 64) * -(-n // 64) * batch
    s = 1
    if k >= 1024:
        while s < SPLIT_MAX and tiles * s < 96 and k // (2 * s) >= 256:
            s *= 2
    return s


def _split_kv(s, t, batch):
    """Key splits for attention with few query blocks (decode): the same doubling rule."""
    programs = -(-s // 16) * batch
    n = 1
    if t >= 512:
        while n < SPLIT_MAX and programs * n < 96 and t // (2 * n) >= 128:
            n *= 2
    return n


SPLIT_MAX = 16

# guards that are heuristics (the autotuner may time the alternatives instead of trusting them);
# the others mark what a kernel can do at all (one pass while the row fits a tile)
TIMED_GUARDS = {"split_k", "split_kv"}

GUARD_RULES = {
    "at_most": (lambda extent, limit: extent <= limit, "{0} <= {1}"),
    "both_at_most": (lambda a, la, b, lb: a <= la and b <= lb, "{0} <= {1} and {2} <= {3}"),
    "split_k": (lambda m, n, k, b: _split_k(m, n, k, b) > 1, "split_k({0}, {1}, {2}, {3}) > 1"),
    "split_kv": (lambda s, t, b: _split_kv(s, t, b) > 1, "split_kv({0}, {1}, {2}) > 1"),
}


@dataclass(frozen=True)
class Guard:
    """When a launch applies: a named rule of the call's sizes (GUARD_RULES)."""
    rule: str
    args: tuple

    def holds(self, bindings) -> bool:
        from .dims import evaluate
        return bool(GUARD_RULES[self.rule][0](*(evaluate(a, bindings) for a in self.args)))

    def __str__(self) -> str:
        from .dims import format_dim
        return GUARD_RULES[self.rule][1].format(*(format_dim(a) for a in self.args))


@dataclass(frozen=True)
class Launch:
    """One alternative of a plan step: ``kernel``, then the kernels in ``then`` (which read
    what it wrote to scratch buffers), used when ``guard`` holds (else the step's next one)."""
    kernel: TileKernel
    group: str = ""
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    guard: Guard | None = None
    then: tuple[TileKernel, ...] = ()

    @property
    def kernels(self) -> tuple[TileKernel, ...]:
        return (self.kernel,) + self.then


@dataclass(frozen=True)
class Alternative:
    """What a lowering template returns: kernels run in order when the guard holds, and the
    scratch buffers they share."""
    kernels: tuple[TileKernel, ...]
    guard: Guard | None = None
    scratch: tuple = ()


@dataclass(frozen=True)
class Plan:
    op: str
    buffers: dict[str, Buffer]
    inputs: tuple[str, ...]              # parameter buffers and scalars, in parameter order
    host_nodes: tuple = ()               # level-1 nodes evaluated on the host (scalars)
    scalars: dict[str, Any] = field(default_factory=dict)   # host scalar name -> level-1 value
    steps: tuple[tuple[Launch, ...], ...] = ()   # in order; each step's alternatives by guard
    outputs: tuple[str, ...] = ()

    @property
    def kernels(self) -> tuple[TileKernel, ...]:
        return tuple(k for step in self.steps for lnch in step for k in lnch.kernels)


def atomic_buffers(k: TileKernel) -> set[str]:
    """Buffers the kernel adds into with atomics (they must be zeroed before each run)."""
    names = set()
    params = {p.name: p for p in k.params}
    for s in walk(k.body):
        if isinstance(s, Store) and s.atomic_add:
            stack = [s.ptr]
            while stack:
                e = stack.pop()
                if e.op == "arg" and e.args[0] in params and params[e.args[0]].kind == "ptr":
                    names.add(params[e.args[0]].buffer)
                stack.extend(x for x in e.args if isinstance(x, TExpr))
    return names


def walk(stmts: Sequence) -> list:
    """Every statement, loops flattened, in order."""
    out = []
    for s in stmts:
        out.append(s)
        if isinstance(s, For):
            out.extend(walk(s.body))
    return out
