"""Choosing a launch configuration (block sizes, warps, stages) for a kernel at given sizes.

On the interpreter every free tunable takes its ``cpu`` value (it cannot time anything); a
tunable that covers an extent takes that extent's next power of two. On a GPU, without
autotuning (OPFORGE_AUTOTUNE=0) or before it has run, a heuristic picks per tunable name;
runtime/autotune.py times the space and persists the winner.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir.dims import evaluate
from ..ir.tile import TileKernel, Tunable


@dataclass(frozen=True)
class Config:
    values: tuple[tuple[str, int], ...]
    num_warps: int = 4
    num_stages: int = 1
    # registers a thread may use (PTX .maxnreg); None leaves the count to ptxas. Set only where
    # ptxas's own choice spills (runtime/register_budget.py)
    maxnreg: int | None = None

    def as_dict(self) -> dict[str, int]:
        return dict(self.values)

    def launch_meta(self) -> dict[str, int]:
        """The keyword arguments of a launch: block sizes, warps, stages, a register budget."""
        meta = {**self.as_dict(), "num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.maxnreg is not None:
            meta["maxnreg"] = self.maxnreg
        return meta

    def with_maxnreg(self, n: int | None) -> "Config":
        return Config(self.values, self.num_warps, self.num_stages, n)

    def __str__(self) -> str:
        vals = ", ".join(f"{k}={v}" for k, v in self.values)
        budget = f", maxnreg={self.maxnreg}" if self.maxnreg is not None else ""
        return f"{vals}, num_warps={self.num_warps}, num_stages={self.num_stages}{budget}"


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def covered(t: Tunable, bindings) -> int:
    if t.rule is not None:
        from ..ir.tile import TUNABLE_RULES
        name, *dims = t.rule
        return TUNABLE_RULES[name](*(evaluate(d, bindings) for d in dims))
    n = evaluate(t.covers, bindings)
    return max(t.lo, min(t.hi, next_pow2(n)))


def is_fixed(t: Tunable) -> bool:
    return t.covers is not None or t.rule is not None


def interpreter_config(k: TileKernel, bindings) -> Config:
    vals = []
    for t in k.tunables:
        vals.append((t.name, covered(t, bindings) if is_fixed(t) else t.cpu))
    return Config(tuple(vals), 4, 1)


HEURISTIC = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}

# Tiles of dot kernels by the number of rows they tile (M of a GEMM, query rows of attention):
# (largest M, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Hopper's wgmma needs
# BLOCK_M >= 64 and whole warpgroups (4 warps); below that the dot runs on mma.sync.
DOT_BUCKETS = (
    (16, 32, 64, 64, 4, 4),        # decode: a few rows (split-K fills the GPU); 16-row tiles
                                   # spill a stack slot in some GEMMs on sm_80 and sm_90a
    (64, 64, 128, 32, 4, 4),       # small batches: one warpgroup
    (None, 128, 128, 64, 8, 3),    # prefill: two warpgroups, the tutorial's Hopper tile
)
# attention keeps a [BLOCK_M, BLOCK_N] score tile and a [BLOCK_M, head dim] accumulator live
FLASH_BUCKETS = (
    (16, 16, 64, None, 4, 3),
    (64, 64, 64, None, 4, 3),
    (None, 128, 64, None, 8, 3),
)


def _bucket(table, m: int):
    for row in table:
        if row[0] is None or m <= row[0]:
            return row[1:]


def _nearest(t: Tunable, want: int) -> int:
    return min(t.candidates, key=lambda c: (abs(c - want), -c))


def dot_tile(k: TileKernel, bindings, vals: dict) -> tuple[dict, int, int] | None:
    """Block sizes, warps and stages of a dot kernel by its shape (k.extents), or None for a
    kernel without extents or dots."""
    from .autotune import dot_count
    ext = {name: evaluate(d, bindings) for name, d in k.extents}
    if not ext or not dot_count(k):
        return None
    flash = "BLOCK_K" not in {t.name for t in k.tunables}
    table = FLASH_BUCKETS if flash else DOT_BUCKETS
    m = vals.get("BLOCK_M") or ext.get("BLOCK_M", 1)
    bm, bn, bk, warps, stages = _bucket(table, m)
    # grouping rows for L2 reuse only pays with several row blocks (and a 16-row tile of two
    # accumulators spills a stack slot with GROUP_M = 8 on sm_90a)
    want = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8 if bm >= 64 else 1}
    for name in ("BLOCK_N", "BLOCK_K"):
        if name in ext and want[name]:      # a short extent: one block over it (>= 16 for tl.dot)
            want[name] = min(want[name], max(16, next_pow2(ext[name])))
    if dot_count(k) > 1 and not flash and bm >= 128:     # two accumulators: half the columns
        want["BLOCK_N"] = max(64, want["BLOCK_N"] // 2)
    if "BLOCK_M" in vals:                   # fixed by a rule (MoE): its bucket's warps
        warps = 4 if vals["BLOCK_M"] <= 64 else warps
    out = {}
    for t in k.tunables:
        if t.name in vals or is_fixed(t):
            continue
        out[t.name] = _nearest(t, want.get(t.name) or HEURISTIC.get(t.name, t.candidates[len(t.candidates) // 2]))
    warps = min(k.warps, key=lambda w: (abs(w - warps), -w))
    stages = min(k.stages, key=lambda s: (abs(s - stages), -s))
    return out, warps, stages


def heuristic_config(k: TileKernel, bindings, limits=None) -> Config:
    """A reasonable first choice without timing: dot kernels take a tile by their shape (the
    buckets above), shrunk until the static estimate fits ``limits`` (runtime/autotune.Limits,
    default H100's); memory-bound row kernels about 4K-16K elements per program."""
    vals = {}
    for t in k.tunables:
        if is_fixed(t):
            vals[t.name] = covered(t, bindings)
    if k.family == "recurrence":
        return _recurrence_config(k, vals)
    if k.family == "recurrence_chunked":        # the smallest tiles: its full [C, E] tiles are many
        vals.update({t.name: min(t.candidates) for t in k.tunables if t.name not in vals})
        return Config(tuple((t.name, vals[t.name]) for t in k.tunables), 4, k.stages[0])
    tile = dot_tile(k, bindings, vals)
    if tile is not None:
        free, warps, stages = tile
        vals.update(free)
        return fit(k, Config(tuple((t.name, vals[t.name]) for t in k.tunables), warps, stages), limits)
    for t in k.tunables:
        if t.name in vals:
            continue
        want = HEURISTIC.get(t.name, t.candidates[len(t.candidates) // 2])
        if t.name == "BLOCK_M" and "BLOCK_N" in vals:
            want = max(1, 4096 // vals["BLOCK_N"])
        vals[t.name] = min(t.candidates, key=lambda c: abs(c - want))
    elems = 1
    for name in ("BLOCK_M", "BLOCK_N"):
        elems *= vals.get(name, 1)
    if any(t.name == "BLOCK_K" for t in k.tunables):
        warps, stages = (8 if elems >= 128 * 128 else 4), max(k.stages)
    else:
        warps = 8 if elems >= 8192 else 4 if elems >= 1024 else 2
        warps = min(k.warps, key=lambda w: abs(w - warps))
        stages = k.stages[0]
    return Config(tuple(vals.items()), warps, stages)


RECURRENCE_TILE = 4096      # carry elements a scan's program keeps (passes/lower_recurrence.py)


def _recurrence_config(k: TileKernel, vals: dict) -> Config:
    """A scan's one kernel: the smallest tiles of the axes the grid tiles, widened (inner axes
    first) while a program keeps at most RECURRENCE_TILE carry elements; then the fewest warps
    that keep ROW_ELEMENTS_PER_THREAD of them per thread."""
    from .autotune import ROW_ELEMENTS_PER_THREAD, dot_count
    free = [t for t in k.tunables if t.name not in vals]
    vals.update({t.name: min(t.candidates) for t in free})

    def elems() -> int:
        n = 1
        for t in k.tunables:
            n *= vals[t.name]
        return n
    dots = dot_count(k) > 0            # a GRU's gates: several tiles each, and the dots' operands
    limit = RECURRENCE_TILE // 2 if dots else RECURRENCE_TILE
    for t in reversed(free):
        for c in sorted(t.candidates):
            if c > vals[t.name] and elems() // vals[t.name] * c <= limit:
                vals[t.name] = c
    per_thread = ROW_ELEMENTS_PER_THREAD // (4 if dots else 1)
    warps = next((w for w in sorted(k.warps) if elems() <= 32 * w * per_thread), max(k.warps))
    return Config(tuple((t.name, vals[t.name]) for t in k.tunables), warps, k.stages[0])


def fit(k: TileKernel, cfg: Config, limits=None) -> Config:
    """Fewer stages (for shared memory), then narrower tiles, until the estimates
    (runtime/estimate.py) fit."""
    from .autotune import Limits, fits
    limits = limits or Limits()
    free = {t.name: t for t in k.tunables if not is_fixed(t)}
    while not (verdict := fits(k, cfg, None, limits))[0]:
        v = cfg.as_dict()
        # fewer stages only save shared memory
        if "shared memory" in verdict[1] and cfg.num_stages > min(k.stages) and cfg.num_stages > 2:
            cfg = Config(cfg.values, cfg.num_warps, cfg.num_stages - 1)
            continue
        for name in ("BLOCK_N", "BLOCK_K", "BLOCK_M"):
            t = free.get(name)
            smaller = [c for c in t.candidates if c < v[name]] if t else []
            if smaller and v[name] > 32:
                v[name] = max(smaller)
                break
        else:
            return cfg       # nothing left to shrink: the autotuner (or the compiler) will say
        cfg = Config(tuple((n, v[n]) for n, _ in cfg.values), cfg.num_warps, cfg.num_stages)
    return cfg
