"""Autotuning kernel configurations on the GPU, and the choice between a step's alternatives.

For a kernel at given sizes: the space is every combination of its free tunables' candidates,
warps and pipeline stages (a tunable that covers an extent is fixed by it). Configurations that
cannot fit are pruned first, by estimates of shared memory (every tile a loop keeps in flight,
in the type it is loaded as) and registers (accumulators and the K loop's live tiles, a
dequantisation's temporaries included; runtime/estimate.py), and so are blocks far larger than
the problem. Then the compiler has its say (NativePrune): the candidates are compiled for the
GPU (runtime/native.py, cached on disk); those that spill only at ptxas's own register choice
are timed at the register budget that avoids it (runtime/register_budget.py), and those that
still spill or need more shared memory than the GPU has are dropped and reported
(OPFORGE_NATIVE_PRUNE=0 skips this). The rest are timed
with triton.testing.do_bench on the call's own arguments; a configuration that fails to compile
or launch is skipped and reported, never fatal. The winner is persisted in the kernel's cache
entry (``tuned.json``) per shape bucket (each size rounded up to a power of two); the cache key already holds the device and the versions. Progress shows on
the terminal while tuning runs. Where a step has several applicable alternatives (split-K or
not, split-KV or not), each is timed whole and the fastest kept, persisted the same way.
OPFORGE_AUTOTUNE=0 uses the heuristic choice and each step's first applicable alternative.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..ir.tile import Launch, TileKernel
from .config import Config, covered, heuristic_config, is_fixed, next_pow2

TUNED = "tuned.json"


def autotune_enabled() -> bool:
    return os.environ.get("OPFORGE_AUTOTUNE", "1") != "0"


@dataclass
class Limits:
    shared_memory: int = 227 * 1024     # bytes per block (H100 opt-in maximum)
    registers_per_thread: int = 255
    # the GPU's dots take their operands from registers (mma.sync: sm_80, sm_89), not from
    # shared memory as Hopper's wgmma does
    mma_sync: bool = False

    @staticmethod
    def of_device() -> "Limits":
        import torch
        if not torch.cuda.is_available():
            return Limits()
        p = torch.cuda.get_device_properties(0)
        smem = getattr(p, "shared_memory_per_block_optin", 0) or getattr(p, "shared_memory_per_block", 0)
        return Limits(shared_memory=int(smem) or Limits.shared_memory,
                      mma_sync=torch.cuda.get_device_capability()[0] < 9)

    @staticmethod
    def of_target(tgt) -> "Limits":
        """The limits of a target of the native check (runtime/targets.py)."""
        return Limits(shared_memory=tgt.shared_memory, registers_per_thread=tgt.registers_per_thread,
                      mma_sync=tgt.capability < 90)


def space(k: TileKernel, bindings) -> list[Config]:
    fixed = [(t.name, covered(t, bindings)) for t in k.tunables if is_fixed(t)]
    if k.presets:
        return [Config(tuple(fixed) + tuple(vals), w, st) for vals, w, st in k.presets]
    free = [t for t in k.tunables if not is_fixed(t)]
    out = []
    for combo in itertools.product(*[t.candidates for t in free]):
        vals = tuple(fixed) + tuple(zip((t.name for t in free), combo))
        for w in k.warps:
            for st in k.stages:
                out.append(Config(vals, w, st))
    return out


def dot_count(k: TileKernel) -> int:
    """tl.dot calls in the kernel (a dot inside a larger expression counts: attention's scores)."""
    from .estimate import _dots
    return len(_dots(k.body))


# prune a config whose estimated registers per thread exceed this share of the hardware's 255:
# the estimate counts accumulators and the K loop's live tiles (runtime/estimate.py)
REGISTER_SHARE = 1.0
# a kernel without dots keeps this many elements of its tile per thread at most: the fused
# rotary epilogue of the Llama block spills at 128 on sm_90a and at 64 on sm_80
ROW_ELEMENTS_PER_THREAD = 32
# A flash kernel's live state is its [BLOCK_M, BLOCK_N] score tile and [BLOCK_M, head dim]
# accumulator; per thread, at most this many of their elements (fitted to the compiled figures
# of every example attention kernel, head dim 128, Triton 3.9 and 3.6):
# - on mma.sync GPUs, every flash kernel: 80. At 128 query rows x 64 keys and 8 warps (96) one
#   that computes its scores on the tile spills 16-56 B at 255 registers on sm_80 (sliding
#   window, soft-capping; ALiBi under Triton 3.6), and the plain causal one 4-12 B since its
#   unmasked and diagonal stages are two loops; at 32 keys (80) they need about 190;
# - on Hopper, a forward kernel over loaded scores: 96 (128 x 64 on 8 warps takes 190
#   registers, 128 x 128 spills), one that computes them: 80 (at 96, ALiBi spills 44 B at
#   128 x 64 and soft-capping 12 B at 64 x 64; at 80 every one takes 168-186 registers).
# For forward tiles of 64 rows or more this rule replaces the register estimate, which counts
# every stage's temporaries and is 1.4-1.9x high there for computed scores (it kept only 16-row
# tiles, on HMMA, at prefill sizes for ALiBi and soft-capping) and 0.7x low for loaded ones.
# Smaller tiles keep the estimate too: there the key and value tiles are register operands of
# mma.sync, which it counts (a 16 x 128 KV-cache tile, 32 elements, spills 24 B on sm_90a).
MMA_SYNC_FLASH_ELEMENTS = 80
FLASH_ELEMENTS = {"flash": 96, "flash_mod": 80}
# on mma.sync GPUs a dot kernel holds at most this many accumulator elements per thread: a
# 128 x 256 GEMM tile at 8 warps (128) takes all 255 registers on sm_80 and spills 16-48 B
# under Triton 3.6 (the Llama, LoRA and GRU GEMMs); 128 x 128 (64) leaves room
MMA_SYNC_ACC_ELEMENTS = 64


def fits(k: TileKernel, cfg: Config, bindings, limits: Limits, itemsize: int | None = None) -> tuple[bool, str]:
    """Whether a configuration can run well: (ok, why not), from the static estimates of shared
    memory and registers (runtime/estimate.py; ``itemsize`` is unused: the kernel's loads say
    what they read)."""
    from .estimate import accumulator_elements, registers, shared_memory
    v = cfg.as_dict()
    threads = 32 * cfg.num_warps
    smem = shared_memory(k, cfg)
    if smem > limits.shared_memory:
        return False, f"shared memory {smem} B (estimated) > {limits.shared_memory} B"
    if dot_count(k):
        if k.family.startswith("flash"):
            per_thread = v.get("BLOCK_M", 1) * (v.get("BLOCK_N", 1) + v.get("BLOCK_EV", 1)) / threads
            limit = MMA_SYNC_FLASH_ELEMENTS if limits.mma_sync else FLASH_ELEMENTS.get(k.family)
            if limit is not None and per_thread > limit:
                return False, (f"{per_thread:.0f} score and accumulator elements per thread > {limit}"
                               + (" (mma.sync)" if limits.mma_sync else ""))
        if limits.mma_sync and (acc := accumulator_elements(k, cfg)) > MMA_SYNC_ACC_ELEMENTS:
            return False, f"{acc:.0f} accumulator elements per thread > {MMA_SYNC_ACC_ELEMENTS} (mma.sync)"
        regs = registers(k, cfg)
        by_elements = k.family in FLASH_ELEMENTS and v.get("BLOCK_M", 1) >= 64
        if not by_elements and regs > limits.registers_per_thread * REGISTER_SHARE:
            budget = limits.registers_per_thread * REGISTER_SHARE
            return False, f"{regs:.0f} registers per thread (estimated) > {budget:.0f}"
    else:
        tile = v.get("BLOCK_M", 1) * v.get("BLOCK_N", 1)
        if k.family == "recurrence":            # a scan's carries: every block is an axis of the tile
            tile = 1
            for t in k.tunables:
                tile *= v.get(t.name, 1)
        if tile / threads > ROW_ELEMENTS_PER_THREAD:
            return False, f"{tile // threads} tile elements per thread"
    return True, ""


def smallest(k: TileKernel, name: str) -> int:
    """The smallest value a tunable takes in the kernel's space."""
    vals = [dict(p[0]).get(name) for p in k.presets] if k.presets else \
        [c for t in k.tunables if t.name == name for c in t.candidates]
    vals = [x for x in vals if x]
    return min(vals) if vals else 1


# a dot kernel with at least this many rows is not timed with row tiles under 64: those run on
# mma.sync instead of Hopper's wgmma, and the 16- and 32-row ones spill a stack slot on sm_90a
PREFILL_ROWS = 1024


def useful(k: TileKernel, cfg: Config, bindings) -> bool:
    """Blocks more than twice the extent they tile only add masked lanes (down to the smallest
    block the kernel offers, and to tl.dot's 16); decode-sized row tiles at prefill sizes only
    lose (PREFILL_ROWS)."""
    from ..ir.dims import evaluate
    v = cfg.as_dict()
    rows = dict(k.extents).get("BLOCK_M")
    if rows is not None and dot_count(k) and v.get("BLOCK_M", 64) < 64 and evaluate(rows, bindings) >= PREFILL_ROWS:
        return False
    for g in k.grid:
        for extent, block in g.parts:
            if block is None:
                continue
            e = evaluate(extent, bindings)
            floor = max(smallest(k, block), 16 if dot_count(k) and block in ("BLOCK_M", "BLOCK_N", "BLOCK_K") else 1)
            if v[block] > max(2 * next_pow2(e), floor):
                return False
    return True


def _block_volume(cfg: Config) -> int:
    n = 1
    for name, v in cfg.values:
        if name.startswith("BLOCK"):
            n *= v
    return n


def tuning_candidates(k: TileKernel, bindings, limits: Limits) -> list[Config]:
    """The configurations the autotuner times at these sizes: the space, less those that cannot
    fit and blocks far larger than the problem."""
    fitting = [c for c in space(k, bindings) if fits(k, c, bindings, limits)[0]]
    out = [c for c in fitting if useful(k, c, bindings)]
    if not out and fitting:
        # every block outgrows the problem (one query row, N <= 16): the smallest still run
        smallest = min(_block_volume(c) for c in fitting)
        out = [c for c in fitting if _block_volume(c) == smallest]
    return out


def bucket(bindings) -> str:
    return ",".join(f"{k}={next_pow2(int(v))}" for k, v in sorted(bindings.items()))


@dataclass
class TuneReport:
    kernel: str
    bucket: str
    tried: int = 0
    pruned: int = 0
    failed: list = field(default_factory=list)
    dropped: list = field(default_factory=list)   # (config, why): compiled, and spilled or overflowed
    best: Config | None = None
    best_ms: float | None = None


class NativePrune:
    """Compiles candidates for the GPU before they are timed (runtime/native.py, cached on disk)
    and says which to drop: those that spill or need more shared memory than the GPU has. A
    candidate that spills at ptxas's own register choice but not at a register budget
    (runtime/register_budget.py) is not dropped: it is replaced by itself at that budget."""

    def __init__(self, cache, target=None):
        from .native import NativeCompiler
        self.compiler = NativeCompiler(cache)
        self.target = target          # None: the GPU's, found on first use

    def __call__(self, k: TileKernel, cfgs: list[Config], args, entry: Path) -> dict[Config, str | Config]:
        """{config: why it is dropped, or the config at the register budget that replaces it}."""
        from .native import call_job
        from .register_budget import spill_free
        if self.target is None:
            from .targets import device_target
            self.target = device_target()
        jobs = [call_job(k, c, self.target, args, entry) for c in cfgs]
        budgeted, results = spill_free(self.compiler.compile, jobs, self.compiler.compile(jobs))
        out: dict[Config, str | Config] = {}
        for c, j, r in zip(cfgs, budgeted, results):
            # a config that does not compile is left to the timing loop, which skips and reports it
            why = [p for p in r.problems(self.target) if r.ok]
            if why:
                out[c] = "; ".join(why)
            elif j.config != c:
                out[c] = j.config
        return out


def native_prune_enabled() -> bool:
    return os.environ.get("OPFORGE_NATIVE_PRUNE", "1") != "0"


class Autotuner:
    def __init__(self, cache, *, timer: Callable | None = None, limits: Limits | None = None, progress: bool = True,
                 prune: Callable | None = None, share: Callable | None = None):
        """``prune(kernel, configs, args, entry) -> {config: why | replacement}``: configs to drop
        after compiling them, or to time at a register budget instead (NativePrune on a GPU;
        None skips the step). ``share()``: the ranks tuning
        is shared with (runtime/tune_share.py; by default the process group's, if any)."""
        from .tune_share import current
        self.share = share or current
        self.cache = cache
        self.timer = timer or _do_bench
        self.limits = limits or Limits.of_device()
        self.progress = progress
        self.prune = prune
        self.reports: list[TuneReport] = []
        self._memo: dict = {}

    def choose(self, launch: Launch, fn, entry: Path, bindings, args, grid_of, reset=None) -> Config:
        """``reset`` (optional) runs before every timed launch: kernels that add into their
        outputs with atomics must start from zeros each time."""
        k = launch.kernel
        key = bucket(bindings)
        memo_key = (str(entry), key)
        if memo_key in self._memo:
            return self._memo[memo_key]
        tracing = _tracing(args)
        share = None if tracing else self.share()      # no collectives while torch.compile traces
        cfg = stored_config(k, self._stored(entry, key, share))
        if cfg is not None:
            self._memo[memo_key] = cfg
            return cfg
        if tracing:
            return heuristic_config(k, bindings, self.limits)
        with self._tuning(entry, key, share) as stored:
            cfg = stored_config(k, stored)             # another process tuned it while we waited
            if cfg is None:
                cfg, report = self.tune(k, bindings, lambda c: _launcher(fn, grid_of(launch, bindings, c), args, c, reset),
                                        args=args, entry=entry, share=share)
                self.reports.append(report)
                if cfg is None:
                    cfg = heuristic_config(k, bindings, self.limits)
                elif share is None or share.rank == 0:
                    data = self.cache.read_json(entry, TUNED)
                    data[key] = {"values": list(cfg.values), "num_warps": cfg.num_warps,
                                 "num_stages": cfg.num_stages, "maxnreg": cfg.maxnreg, "ms": report.best_ms}
                    self.cache.write_json(entry, TUNED, data)
        self._memo[memo_key] = cfg
        return cfg

    def choose_alternative(self, launches, entry: Path, bindings, make_run) -> int:
        """Index of the fastest of a step's applicable alternatives (split-K against the plain
        GEMM, say), each timed whole; persisted per shape bucket in the first one's entry."""
        key = f"alternative {bucket(bindings)}"
        memo_key = (str(entry), key)
        if memo_key in self._memo:
            return self._memo[memo_key]
        share = self.share()
        index = stored_index(self._stored(entry, key, share), len(launches))
        if index is not None:
            self._memo[memo_key] = index
            return index
        with self._tuning(entry, key, share) as stored:
            index = stored_index(stored, len(launches))
            if index is None:
                index = self._time_alternatives(launches, entry, key, make_run, share)
        self._memo[memo_key] = index
        return index

    def _time_alternatives(self, launches, entry: Path, key: str, make_run, share) -> int:
        times = []
        for i in share.mine(len(launches)) if share else range(len(launches)):
            lnch = launches[i]
            try:
                times.append((self.timer(make_run(lnch)), i))
            except Exception as e:   # an alternative that fails is skipped and reported
                print(f"opforge autotune: skipped {' then '.join(k.name for k in lnch.kernels)}: "
                      f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
        if share is not None:
            times = [t for part in share.gather(times) for t in part]
        best = min(times)[1] if times else 0
        if share is None or share.rank == 0:
            data = self.cache.read_json(entry, TUNED)
            data[key] = {"index": best, "kernels": [" then ".join(k.name for k in launches[best].kernels)],
                         "ms": [t for t, _ in sorted(times, key=lambda x: x[1])]}
            self.cache.write_json(entry, TUNED, data)
        return best

    @contextlib.contextmanager
    def _tuning(self, entry: Path, key: str, share):
        """Held while this process tunes ``key`` of ``entry``: the cache's lock for them, so other
        processes on this cache wait and then read the winner (yielded: what is stored once the
        lock is ours). Under collective sharing the ranks agree by collectives instead."""
        if share is not None or self.cache is None or not hasattr(self.cache, "lock"):
            yield None
            return
        from filelock import Timeout
        from .tune_share import TUNE_LOCK_TIMEOUT_S
        lock = self.cache.lock(f"tune-{entry.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}")
        try:
            lock.acquire(timeout=TUNE_LOCK_TIMEOUT_S)
        except Timeout:          # a stale lock (a soft lock left by a killed process): tune anyway
            yield None
            return
        try:
            yield self.cache.read_json(entry, TUNED).get(key)
        finally:
            lock.release()

    def _stored(self, entry: Path, key: str, share):
        """The persisted choice for ``key``: this process's, or rank 0's broadcast to all."""
        if share is None:
            return self.cache.read_json(entry, TUNED).get(key)
        return share.broadcast(self.cache.read_json(entry, TUNED).get(key) if share.rank == 0 else None)

    def tune(self, k: TileKernel, bindings, make_run: Callable[[Config], Callable], args=None,
             entry: Path | None = None, share=None) -> tuple[Config | None, TuneReport]:
        """The fastest candidate; with ``share``, each rank times its share of rank 0's
        candidates and every rank gets the fastest of all."""
        report = TuneReport(k.name, bucket(bindings))
        candidates = tuning_candidates(k, bindings, self.limits)
        if self.prune is not None and entry is not None and candidates:
            try:
                dropped = self.prune(k, candidates, args, entry)
            except Exception as e:    # pruning is an optimisation: time them all (and never leave
                # the other ranks waiting in the broadcast below)
                print(f"opforge autotune: {k.name}: native pruning failed ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200] if str(e) else ''}); timing every candidate", file=sys.stderr)
                dropped = {}
            report.dropped = [(str(c), why) for c, why in dropped.items() if isinstance(why, str)]
            for c, why in report.dropped:
                print(f"opforge autotune: {k.name}: dropped {c}: {why}", file=sys.stderr)
            candidates = [dropped.get(c, c) for c in candidates if not isinstance(dropped.get(c), str)]
        report.pruned = len(space(k, bindings)) - len(candidates)
        if share is not None:
            candidates = share.broadcast(candidates)     # one list, whatever each rank pruned
        if not candidates:
            return None, report
        mine = list(share.mine(len(candidates))) if share is not None else list(range(len(candidates)))
        timings = []
        bar = _progress(self.progress and len(mine) > 1, f"tuning {k.name}", len(mine))
        with bar as advance:
            for i in mine:
                cfg = candidates[i]
                report.tried += 1
                try:
                    ms = self.timer(make_run(cfg))
                except Exception as e:  # a config that fails to compile or launch is skipped
                    report.failed.append((str(cfg), f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
                else:
                    timings.append((ms, i))
                advance()
        for cfg, why in report.failed:
            print(f"opforge autotune: {k.name}: skipped {cfg}: {why}", file=sys.stderr)
        if share is not None:
            timings = [t for part in share.gather(timings) for t in part]
        if not timings:
            return None, report
        report.best_ms, best = min(timings)
        report.best = candidates[best]
        return report.best, report


def _count(x, lo: int, hi: int) -> int | None:
    return x if type(x) is int and lo <= x <= hi else None


def stored_config(k: TileKernel, stored) -> Config | None:
    """A persisted winner, if it is one this kernel can run: every tunable named once with a
    positive integer, warps and stages in range. Anything else (a tuned.json edited or damaged
    into other valid JSON) is ignored, so the kernel is tuned again and the entry rewritten."""
    if not isinstance(stored, dict):
        return None
    try:
        values = tuple((n, _count(x, 1, 1 << 20)) for n, x in stored["values"])
        warps, stages = _count(stored["num_warps"], 1, 32), _count(stored["num_stages"], 1, 16)
        budget = stored.get("maxnreg")
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    if budget is not None and _count(budget, 16, 255) is None:
        return None
    names = [n for n, _ in values]
    if not all(isinstance(n, str) for n in names) or warps is None or stages is None or any(x is None for _, x in values) or \
            sorted(names) != sorted(t.name for t in k.tunables) or warps & (warps - 1):
        return None
    return Config(values, warps, stages, budget)


def stored_index(stored, n: int) -> int | None:
    """A persisted choice among a step's ``n`` alternatives, if it is one."""
    if not isinstance(stored, dict):
        return None
    return _count(stored.get("index"), 0, n - 1)


def _launcher(fn, grid, args, cfg: Config, reset=None):
    def run():
        if reset is not None:
            reset()
        fn[grid](*args, **cfg.launch_meta())
    return run


def _do_bench(run) -> float:
    from triton.testing import do_bench
    return float(do_bench(run, warmup=5, rep=20, return_mode="median"))


def _tracing(args) -> bool:
    """Fake tensors (torch.compile tracing) cannot be timed."""
    try:
        from torch._subclasses.fake_tensor import FakeTensor
    except ImportError:
        return False
    return any(isinstance(a, FakeTensor) for a in args)


class _progress:
    """A rich progress bar on the terminal while tuning; a no-op when quiet."""

    def __init__(self, show: bool, label: str, total: int):
        self.show, self.label, self.total = show, label, total

    def __enter__(self):
        if not self.show:
            return lambda: None
        from rich.progress import Progress
        self.p = Progress(transient=True)
        self.p.__enter__()
        task = self.p.add_task(self.label, total=self.total)
        return lambda: self.p.advance(task)

    def __exit__(self, *exc):
        if self.show:
            self.p.__exit__(*exc)
        return False
