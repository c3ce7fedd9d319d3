"""Static figures of merit: the bytes a kernel requests from global memory at given sizes,
counted from its level-2 IR, its grid and a configuration (no kernel runs).

Every program's loads and stores are counted, a byte requested twice counted twice: for each
``load`` (and ``store``), the lanes its mask lets through times the element size, in every
iteration of its enclosing loops, in every program of the grid. The count is exact where the
masks and loop bounds are functions of program ids, loop variables, sizes and block sizes,
which is what the templates write: the index and mask arithmetic of the kernel is evaluated with
numpy for all programs at once (in chunks), values read from memory stay unknown, and a mask that
is a conjunction of per-axis tests (``rows < M`` and ``ks < K``) is counted as the product of
its factors' counts, so no [programs, BLOCK_M, BLOCK_K] array is built. So the last tile of an
axis is bounded by its mask, and a loop whose bounds differ per program (split-K's share of K,
causal attention's key range) runs as far as each program's bounds say.

Where a mask or a loop bound depends on values read from memory (MoE routing: which row blocks
are live, which slots are padding), the count takes every such test as passing (an upper
bound) and says so (``exact=False``, with the reason).

The op-level figures (``op_traffic``) add up each step's chosen alternative (the first whose
guard holds, as the GPU runs without autotuning) with the heuristic configuration
(runtime/config.py ``heuristic_config``) of each kernel, and compare with the compulsory bytes
(every input and output of the op once) and, for the weights (bound or packed parameters and
every parameter that is the B operand of a contraction), with the weights' own size.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ..ir.dims import evaluate
from ..ir.tile import For, Let, Store, TExpr, TileKernel
from ..ir.tile_builder import broadcast
from ..ir.types import DType
from .config import Config, heuristic_config
from .records import contiguous_strides

CHUNK = 4096          # programs evaluated together


class _Unknown:
    """A value read from memory (or computed from one): not known statically."""
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN = _Unknown()


class NotCountable(Exception):
    pass


@dataclass
class Conj:
    """A mask kept as the conjunction of its factors (each a bool array over programs and the
    tile axes, broadcastable), counted without building the whole tile."""
    factors: list

    def materialize(self):
        return functools.reduce(np.logical_and, self.factors)


@dataclass
class KernelTraffic:
    kernel: str
    config: Config
    programs: int
    loaded: dict = field(default_factory=dict)     # buffer -> bytes loaded
    stored: dict = field(default_factory=dict)     # buffer -> bytes stored (atomic adds included)
    notes: list = field(default_factory=list)      # why a count is an upper bound

    @property
    def exact(self) -> bool:
        return not self.notes

    @property
    def requested(self) -> int:
        return sum(self.loaded.values()) + sum(self.stored.values())


@dataclass
class OpTraffic:
    op: str
    bindings: dict
    kernels: list                 # KernelTraffic of the chosen kernels, in launch order
    compulsory: int               # inputs and outputs of the op, once
    weights: dict                 # weight buffer -> its bytes
    buffer_bytes: dict            # every buffer -> its bytes

    @property
    def requested(self) -> int:
        return sum(k.requested for k in self.kernels)

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def weight_requested(self) -> int:
        return sum(b for k in self.kernels for name, b in k.loaded.items() if name in self.weights)

    @property
    def exact(self) -> bool:
        return all(k.exact for k in self.kernels)

    def as_json(self) -> dict:
        return {"requested_bytes": self.requested, "compulsory_bytes": self.compulsory,
                "weight_bytes_requested": self.weight_requested, "weight_bytes": self.weight_bytes,
                "exact": self.exact,
                "kernels": {k.kernel: {"requested_bytes": k.requested, "loaded": k.loaded, "stored": k.stored,
                                       "programs": k.programs, "config": str(k.config), "exact": k.exact,
                                       "notes": k.notes} for k in self.kernels}}


# -- one kernel ---------------------------------------------------------------------------------------
def kernel_traffic(k: TileKernel, bindings: Mapping[str, int], buffer_shapes: Mapping[str, tuple],
                   scalars: Mapping[str, Any] | None = None, config: Config | None = None) -> KernelTraffic:
    """The bytes ``k`` requests at ``bindings``: ``buffer_shapes`` gives each buffer's shape (for
    its strides), ``scalars`` the host scalars' values where known, ``config`` the block sizes
    (the heuristic configuration if not given)."""
    cfg = config or heuristic_config(k, bindings)
    from .executor import PlanRunner
    from ..ir.tile import Launch
    grid = PlanRunner.grid(Launch(k), bindings, cfg)
    total = int(np.prod(grid)) if grid else 1
    out = KernelTraffic(k.name, cfg, total)
    ev = _Evaluator(k, bindings, buffer_shapes, scalars or {}, cfg, out)
    for start in range(0, total, CHUNK):
        ev.run_programs(grid, start, min(total, start + CHUNK))
    out.loaded = {b: int(v) for b, v in ev.loaded.items()}
    out.stored = {b: int(v) for b, v in ev.stored.items()}
    out.notes = sorted(ev.notes)
    return out


@dataclass
class Bound:
    """An upper bound of a value that depends on memory: a bool array whose true lanes include
    the true ones, or an int array at least the true value."""
    value: Any


def _kind(v) -> str:
    return "unknown" if v is UNKNOWN else "bound" if isinstance(v, Bound) else "exact"


def _inner(v):
    """The array of an exact value or a bound (a conjunction built)."""
    v = v.value if isinstance(v, Bound) else v
    return v.materialize() if isinstance(v, Conj) else v


class _Thunk:
    """An integer or boolean value of a ``Let``, computed when a mask or a loop bound needs it
    (most index arithmetic only forms addresses, which the count never needs), from the
    variables as they were when the ``Let`` ran."""
    __slots__ = ("expr", "scope", "val")

    def __init__(self, expr: TExpr, scope: dict):
        self.expr, self.scope, self.val = expr, scope, None


class _Evaluator:
    """Walks a kernel's body for a chunk of programs. Each statement's loads are counted when it
    runs; values are computed on demand: index and mask arithmetic in numpy (arrays of
    [programs or 1, *tile]), anything read from memory, any float and any address UNKNOWN."""

    def __init__(self, k: TileKernel, bindings, buffer_shapes, scalars, cfg: Config, out: KernelTraffic):
        self.k, self.cfg = k, cfg
        self.blocks = cfg.as_dict()
        self.params = {p.name: p for p in k.params}
        self.values: dict[str, Any] = {}
        for p in k.params:
            if p.kind == "size":
                self.values[p.name] = np.array([evaluate(p.dim, bindings)], dtype=np.int64)
            elif p.kind == "stride":
                self.values[p.name] = np.array([contiguous_strides(buffer_shapes[p.buffer])[p.axis]], dtype=np.int64)
            elif p.kind == "scalar":
                v = scalars.get(p.buffer, UNKNOWN)
                self.values[p.name] = UNKNOWN if v is UNKNOWN else np.array([v])
            else:
                self.values[p.name] = UNKNOWN
        for name, v in self.blocks.items():
            self.values[name] = np.array([v], dtype=np.int64)
        self.loaded: dict[str, float] = {}
        self.stored: dict[str, float] = {}
        self.notes: set[str] = set()
        self._buffer_of: dict[int, str] = {}
        self._loads: dict[int, list] = {}
        self._vars: dict[int, tuple] = {}

    # -- statements ----------------------------------------------------------------------------------
    def run_programs(self, grid, lo: int, hi: int) -> None:
        p = np.arange(lo, hi, dtype=np.int64)
        self.pids = []
        for n in grid:
            self.pids.append(p % n)
            p = p // n
        self.env: dict[str, Any] = {}
        self.block(self.k.body, np.ones(hi - lo))

    def block(self, stmts, weight) -> None:
        env = self.env
        for s in stmts:
            if isinstance(s, Let):
                self.effects(s.value, weight)
                env[s.var.name] = self.lazy(s.value)
            elif isinstance(s, Store):
                for e in (s.ptr, s.value, s.mask):
                    if e is not None:
                        self.effects(e, weight)
                mask = self.value(s.mask, env) if s.mask is not None else None
                shape = s.ptr.shape if s.mask is None else broadcast(s.ptr.shape, s.mask.shape)
                self.count(self.stored, s.ptr, shape, s.ptr.dtype.elem, mask, weight)
            elif isinstance(s, For):
                self.loop(s, weight)

    def loop(self, s: For, weight) -> None:
        for e in (s.start, s.stop, s.step):
            self.effects(e, weight)
        start, stop, step = (self.value(x, self.env) for x in (s.start, s.stop, s.step))
        if isinstance(stop, Bound):
            self.notes.add("a loop's end depends on values read from memory (its upper bound taken)")
            stop = stop.value
        if any(v is UNKNOWN or isinstance(v, Bound) for v in (start, stop, step)):
            raise NotCountable(f"{self.k.name}: the loop over {s.var.name} has bounds read from memory")
        start, stop, step = (_scalar(v) for v in (start, stop, step))
        trips = np.maximum(0, -(-(stop - start) // step))
        n = int(trips.max()) if trips.size else 0
        for t in range(n):
            self.env[s.var.name] = start + t * step
            active = weight * (t < trips)
            if not active.any():
                break
            self.block(s.body, active)

    def effects(self, e: TExpr, weight) -> None:
        """Count the loads ``e`` performs (not those of the variables it reads: their ``Let``
        counted them)."""
        for ld in self.loads_in(e):
            ptr, mask, _ = ld.args
            m = self.value(mask, self.env) if mask is not None else None
            self.count(self.loaded, ptr, ld.shape, ld.dtype, m, weight)

    def loads_in(self, e: TExpr) -> list:
        key = id(e)
        if key not in self._loads:
            out, stack = [], [e]
            while stack:
                x = stack.pop()
                if x.op == "load":
                    out.append(x)
                stack.extend(y for y in x.args if isinstance(y, TExpr))
            self._loads[key] = out
        return self._loads[key]

    def vars_in(self, e: TExpr) -> tuple:
        key = id(e)
        if key not in self._vars:
            names, stack = set(), [e]
            while stack:
                x = stack.pop()
                if x.op == "var":
                    names.add(x.args[0])
                stack.extend(y for y in x.args if isinstance(y, TExpr))
            self._vars[key] = tuple(names)
        return self._vars[key]

    def lazy(self, e: TExpr):
        if not isinstance(e.dtype, DType) or e.dtype.is_float or e.op == "load":
            return UNKNOWN
        env = self.env
        return _Thunk(e, {n: env[n] for n in self.vars_in(e) if n in env})

    # -- values --------------------------------------------------------------------------------------
    def value(self, e: TExpr, scope: dict):
        op, a = e.op, e.args
        if op == "var":
            v = scope[a[0]]
            if isinstance(v, _Thunk):
                if v.val is None:
                    v.val = self.value(v.expr, v.scope)
                    v.scope = None
                return v.val
            return v
        if not isinstance(e.dtype, DType) or e.dtype.is_float or op in ("load", "dot", "argreduce"):
            return UNKNOWN       # addresses, floats, data
        if op == "arg":
            return self.values[a[0]]
        if op == "const":
            return np.array([a[0]])
        if op == "program_id":
            return self.pids[a[0]]
        if op == "arange":
            n = self.blocks[a[0]] if isinstance(a[0], str) else int(a[0])
            return np.arange(n, dtype=np.int64)[None, :]
        if op == "full":
            shape, v = a
            return np.full((1,) + self.concrete(shape), v)
        if op in ("expand_dims", "broadcast_to", "reshape", "trans", "cumsum", "reduce"):
            return self.tile_op(e, scope)
        rank = len(e.shape)
        vals = [self.value(x, scope) if isinstance(x, TExpr) else x for x in a]
        lift = [(lambda v, x=x: self.lift(_inner(v), len(x.shape), rank)) if isinstance(x, TExpr) else None for x in a]
        kinds = [_kind(v) for v, x in zip(vals, a) if isinstance(x, TExpr)]
        if op == "and" and e.dtype.is_bool:
            factors = []
            for v, x in zip(vals, a):
                if v is not UNKNOWN:
                    v = v.value if isinstance(v, Bound) else v
                    factors += [self.lift(f, len(x.shape), rank) for f in (v.factors if isinstance(v, Conj) else [v])]
            out = Conj(factors) if factors else np.ones((1,) + (1,) * rank, dtype=bool)
            return out if all(k == "exact" for k in kinds) else Bound(out)
        if all(k == "exact" for k in kinds):
            args = [lift[i](v) if lift[i] else v for i, v in enumerate(vals)]
            return _NUMPY[op](*args) if op != "cast" else _cast(args[0], a[1])
        return self.bounded(e, vals, lift, kinds, rank)

    def bounded(self, e: TExpr, vals, lift, kinds, rank):
        """An operation with an operand read from memory (UNKNOWN) or only bounded above (a
        Bound): an upper bound where the operation is monotone in that operand the right way
        (an unknown test in a conjunction passes; a choice takes the larger; a minimum takes the
        known side; x < bound), else UNKNOWN."""
        op, a = e.op, e.args
        known = [k != "unknown" for k in kinds]
        if op == "or" and e.dtype.is_bool:
            if not all(known):
                return Bound(np.ones((1,) + (1,) * rank, dtype=bool))
            return Bound(np.logical_or(lift[0](vals[0]), lift[1](vals[1])))
        if op == "where":
            c, x, y = kinds
            if x != "unknown" and y != "unknown":
                xs, ys = lift[1](vals[1]), lift[2](vals[2])
                if c == "exact":
                    return Bound(np.where(lift[0](vals[0]), xs, ys))
                return Bound(np.logical_or(xs, ys) if e.dtype.is_bool else np.maximum(xs, ys))
            return UNKNOWN
        if op == "minimum" and any(known):
            if all(known):
                return Bound(np.minimum(lift[0](vals[0]), lift[1](vals[1])))
            i = 0 if known[0] else 1
            return Bound(lift[i](vals[i]))
        if not all(known):
            return UNKNOWN
        up = [k == "bound" for k in kinds]
        monotone = (op in ("add", "maximum") or (op in ("lt", "le") and not up[0])
                    or (op in ("gt", "ge") and not up[1])
                    or (op == "cast" and a[0].dtype.is_bool and not a[1].is_float))
        if not monotone:
            return UNKNOWN
        args = [lift[i](v) if lift[i] else v for i, v in enumerate(vals)]
        return Bound(_NUMPY[op](*args) if op != "cast" else _cast(args[0], a[1]))

    def tile_op(self, e: TExpr, scope):
        op, a = e.op, e.args
        x = self.value(a[0], scope)
        if x is UNKNOWN:
            return UNKNOWN
        if isinstance(x, Bound):       # a view of an upper bound is one; a reduction is not
            return Bound(self.tile_op_exact(e, x.value)) if op in ("expand_dims", "broadcast_to", "reshape",
                                                                    "trans") else UNKNOWN
        return self.tile_op_exact(e, x)

    def tile_op_exact(self, e: TExpr, x):
        op, a = e.op, e.args
        if isinstance(x, Conj):
            x = x.materialize()
        r = len(a[0].shape)
        x = self.lift(x, r, r)
        if op == "expand_dims":
            axis = a[1] if a[1] >= 0 else r + 1 + a[1]
            return np.expand_dims(x, axis + 1)
        if op == "broadcast_to":
            x = self.lift(x, r, len(a[1]))
            return np.broadcast_to(x, (x.shape[0],) + self.concrete(a[1]))
        if op == "trans":
            return np.swapaxes(x, -1, -2)
        full = np.broadcast_to(x, (x.shape[0],) + self.concrete(a[0].shape))
        if op == "reshape":
            return np.reshape(full, (x.shape[0],) + self.concrete(a[1]))
        if op == "cumsum":
            return np.cumsum(full, axis=a[1] + 1)
        return {"sum": np.sum, "max": np.max, "min": np.min}[a[2]](full, axis=a[1] + 1, keepdims=True)

    # -- counting --------------------------------------------------------------------------------------
    def count(self, into: dict, ptr: TExpr, shape: tuple, dtype, mask, weight) -> None:
        """Add the bytes of one access for every program of the chunk: its mask's lanes (all of
        the tile without one) times the element size, times the programs' activity."""
        tile = self.concrete(shape)
        lanes = np.full(1, float(np.prod(tile)) if tile else 1.0)
        if isinstance(mask, Bound):
            self.notes.add("a mask depends on values read from memory (its tests on them taken as passing)")
            mask = mask.value
        if mask is not None and mask is not UNKNOWN:
            lanes = _count(mask.factors if isinstance(mask, Conj) else [mask], tile)
        elif mask is UNKNOWN:
            self.notes.add("a mask depends on values read from memory (taken as true)")
        name = self.buffer_of(ptr)
        into[name] = into.get(name, 0.0) + float((np.broadcast_to(lanes, weight.shape) * weight).sum()) * dtype.itemsize

    def buffer_of(self, ptr: TExpr) -> str:
        key = id(ptr)
        if key not in self._buffer_of:
            stack, found = [ptr], "?"
            while stack:
                x = stack.pop()
                if x.op == "arg" and x.args[0] in self.params and self.params[x.args[0]].kind == "ptr":
                    found = self.params[x.args[0]].buffer
                    break
                if x.op != "load":       # a gather's index is not where the gathered bytes are
                    stack.extend(y for y in x.args if isinstance(y, TExpr))
            self._buffer_of[key] = found
        return self._buffer_of[key]

    def concrete(self, shape) -> tuple[int, ...]:
        return tuple(self.blocks[d] if isinstance(d, str) else int(d) for d in shape)

    @staticmethod
    def lift(v, rank: int, to: int):
        """A value of tile rank ``rank`` as an array of [programs or 1, *tile of rank ``to``]."""
        v = np.asarray(v)
        if v.ndim == 0:
            v = v.reshape(1)
        if to > rank:
            v = v.reshape((v.shape[0],) + (1,) * (to - rank) + v.shape[1:])
        return v


def _scalar(v) -> np.ndarray:
    v = np.asarray(v).astype(np.int64)
    return v.reshape(v.shape[0]) if v.ndim > 1 else v.reshape(-1)


def _count(factors, tile: tuple) -> np.ndarray:
    """Lanes per program of a conjunction: factors grouped by the tile axes they vary along,
    each group's lanes counted, the counts multiplied (times the size of the axes no factor
    bounds)."""
    r = len(tile)
    groups: list[tuple[set, list]] = []
    for f in factors:
        f = _Evaluator.lift(f, f.ndim - 1, r)
        axes = {i for i in range(r) if f.shape[i + 1] != 1}
        merged = [g for g in groups if g[0] & axes]
        for g in merged:
            groups.remove(g)
            axes |= g[0]
        groups.append((axes, [f] + [x for g in merged for x in g[1]]))
    lanes = np.ones(1)
    covered: set = set()
    for axes, fs in groups:
        m = functools.reduce(np.logical_and, fs)
        m = np.broadcast_to(m, m.shape[:1] + tuple(tile[i] if i in axes else 1 for i in range(r)))
        lanes = lanes * m.reshape(m.shape[0], -1).sum(axis=1)
        covered |= axes
    for i in range(r):
        if i not in covered:
            lanes = lanes * tile[i]
    return lanes


def _trunc_div(a, b):
    """Triton's integer division truncates toward zero (C), as does its remainder."""
    with np.errstate(divide="ignore", invalid="ignore"):
        b = np.where(b == 0, 1, b)
        q = np.abs(a) // np.abs(b)
        return np.where((a < 0) != (b < 0), -q, q)


def _cast(x, dtype: DType):
    if dtype.is_bool:
        return x != 0
    if dtype.is_float:
        return x.astype(np.float64)
    return x.astype(np.int64)


_NUMPY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "floordiv": _trunc_div,
    "mod": lambda a, b: a - b * _trunc_div(a, b), "neg": np.negative, "and": np.bitwise_and,
    "or": np.bitwise_or, "not": np.invert, "shr": np.right_shift, "shl": np.left_shift,
    "lt": np.less, "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal, "eq": np.equal,
    "ne": np.not_equal, "maximum": np.maximum, "minimum": np.minimum, "where": np.where,
    "cdiv": lambda a, b: -(-a // b), "abs": np.abs,
}


# -- one op ------------------------------------------------------------------------------------------
def weight_params(g) -> set[str]:
    """Parameters that are weights by their use: the B operand (and further operands) of a
    contraction, the weight of an expert GEMM, traced back through views and casts."""
    from ..ir import registry
    from ..ir.registry import Kind
    params = {p.value: p.name for p in g.params}
    producer = {v: n for n in g.nodes for v in n.outputs}
    out = set()

    def source(v):
        while v not in params and v in producer:
            n = producer[v]
            kind = registry.get(n.op).kind
            if not (kind is Kind.SHAPE or n.op == "cast") or len(n.inputs) != 1:
                return None
            v = n.inputs[0]
        return params.get(v)
    for n in g.nodes:
        kind = registry.get(n.op).kind
        if kind is Kind.CONTRACTION or n.op in ("expert_matmul", "expert_gemm", "flash_attention"):
            for v in n.inputs[1:]:
                name = source(v)
                if name is not None:
                    out.add(name)
    return out


def op_traffic(op, bindings: Mapping[str, int], weights=None, scalars: Mapping[str, Any] | None = None,
               config_of=None) -> OpTraffic:
    """Every chosen kernel of ``op`` (a CompiledOp) at ``bindings``: the first alternative whose
    guard holds, with its heuristic configuration (or ``config_of(kernel, bindings)``).
    ``weights``: the weight buffers (default: ``weight_params`` of the op's graph and the bound
    parameters of a packed op); ``scalars``: scalar arguments (default: their defaults)."""
    from .executor import choose
    from .scan import ScanOp
    if isinstance(op, ScanOp):
        return _scan_traffic(op, bindings, weights, scalars, config_of)
    plan = op.plan
    shapes = {name: tuple(evaluate(d, bindings) for d in b.shape) for name, b in plan.buffers.items()}
    nbytes = {name: int(np.prod(shapes[name])) * b.dtype.itemsize for name, b in plan.buffers.items()}
    host = _host_scalars(op, bindings, scalars)
    kernels = []
    for step in plan.steps:
        launch = choose(step, bindings)
        for k in launch.kernels:
            try:
                kernels.append(kernel_traffic(k, bindings, shapes, host, config_of(k, bindings) if config_of else None))
            except NotCountable as e:
                kt = KernelTraffic(k.name, heuristic_config(k, bindings), 0)
                kt.notes = [f"not counted: {e}"]
                kernels.append(kt)
    tensors = [name for name in plan.inputs if name in plan.buffers]
    compulsory = sum(nbytes[n] for n in tensors) + sum(nbytes[n] for n in dict.fromkeys(plan.outputs))
    names = weight_params(op.graph) | set(getattr(op, "bound_weights", ())) if weights is None else set(weights)
    return OpTraffic(op.name, dict(bindings), kernels, compulsory,
                     {n: nbytes[n] for n in tensors if n in names}, nbytes)


def _scan_traffic(op, bindings, weights, scalars, config_of) -> OpTraffic:
    """An op with scans, called without gradients (runtime/scan.py): its segments' kernels and
    each scan's one kernel, or, where the call runs the steps, the body's kernels once per step
    (each listed once, its bytes and programs times the number of steps)."""
    from .scan import ScanPiece
    kernels: list = []
    body_weights: set = set()
    for p in op.pieces:
        if not isinstance(p, ScanPiece):
            kernels += op_traffic(p.op, bindings, (), scalars, config_of).kernels
            continue
        body_weights |= weight_params(p.op.graph)
        if p.fused is not None and p.fused_fits(bindings):
            kernels += op_traffic(p.fused, bindings, (), scalars, config_of).kernels
            continue
        n = evaluate(p.node.attrs["length"], bindings)
        for k in op_traffic(p.op, bindings, (), scalars, config_of).kernels:
            kernels.append(KernelTraffic(f"{k.kernel} (x{n} steps)", k.config, k.programs * n,
                                         {b: v * n for b, v in k.loaded.items()},
                                         {b: v * n for b, v in k.stored.items()}, list(k.notes)))
    g = op.graph

    def nbytes_of(t) -> int:
        return int(np.prod([evaluate(d, bindings) for d in t.shape])) * t.dtype.itemsize
    nbytes = {p.name: nbytes_of(p.value.type) for p in g.tensor_params}
    names = (weight_params(g) | (body_weights & set(nbytes))) if weights is None else set(weights)
    return OpTraffic(op.name, dict(bindings), kernels, sum(nbytes.values()) + sum(map(nbytes_of, g.result_types)),
                     {n: b for n, b in nbytes.items() if n in names}, nbytes)


def _host_scalars(op, bindings, scalars) -> dict:
    """The host scalars the kernels take, where every scalar argument is known (given, or a
    default); otherwise those of the parameters themselves that are known."""
    g = op.graph
    given = dict(scalars or {})
    for p in g.scalar_params:
        if p.name not in given and p.has_default:
            given[p.name] = p.default
    if all(p.name in given for p in g.scalar_params):
        return op.runner.host_scalars(given, bindings)
    return {k: v for k, v in given.items()}


def format_traffic(t: OpTraffic) -> str:
    """The figures as explain() prints them."""
    def mb(n: float) -> str:
        return f"{n / 1e6:,.3f} MB"
    sizes = ", ".join(f"{k}={v}" for k, v in t.bindings.items())
    lines = [f"bytes requested from global memory at {sizes} (every program's loads and stores; the heuristic "
             f"configuration, runtime/config.py heuristic_config; each step's first applicable alternative):"]
    for k in t.kernels:
        mark = "" if k.exact else "  (upper bound: " + "; ".join(k.notes) + ")"
        lines.append(f"  {k.kernel}: {mb(k.requested)} (loads {mb(sum(k.loaded.values()))}, stores "
                     f"{mb(sum(k.stored.values()))}) over {k.programs} programs; {k.config}{mark}")
    ratio = t.requested / t.compulsory if t.compulsory else float("nan")
    lines.append(f"  all kernels: {mb(t.requested)} against {mb(t.compulsory)} compulsory (inputs and outputs "
                 f"once): {ratio:.2f}x")
    if t.weights:
        w = t.weight_requested / t.weight_bytes if t.weight_bytes else float("nan")
        lines.append(f"  weights ({', '.join(sorted(t.weights))}): {mb(t.weight_requested)} requested against "
                     f"{mb(t.weight_bytes)} of weights: {w:.2f}x")
    return "\n".join(lines)
