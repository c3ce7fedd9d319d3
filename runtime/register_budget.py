"""Register budgets from the compiler's own report (issue 10): where ptxas spills by choice.

Given no register limit, ptxas sometimes holds a kernel at an occupancy step (64 or 128
registers a thread with 4 warps) by spilling a few values to the stack: the native check found
4-48 B of spills at 64-168 registers in decode GEMMs, the MoE align kernel and the int4 prefill
tile, far below the 255 a thread may have. Given an explicit limit (Triton's ``maxnreg``, PTX
``.maxnreg``) it allocates up to that limit instead. So a configuration that spills at ptxas's
own choice is compiled again at the next occupancy steps above what it used, and the lowest
budget that compiles without spills is kept with the configuration (``Config.maxnreg``). A
heuristic choice that spills at every budget (a tile too big for the register file) takes the
next smaller tile that does not (BLOCK_K, then BLOCK_N halved); an autotuner candidate that does
is dropped (its smaller tiles are candidates of their own):

- the autotuner times the configuration with it (runtime/autotune.NativePrune) and persists it;
- a heuristic choice on a GPU launches with it (runtime/executor.PlanRunner.config);
- the native check (runtime/native_check.py, ``opforge check --target``) reports the result at
  it, so the check holds what the runtime launches.

OPFORGE_NATIVE_PRUNE=0 turns this off with the rest of the compiler's say.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Callable, Sequence

from .config import Config

REGISTER_FILE = 64 * 1024      # 32-bit registers of one SM, sm_80 to sm_90
GRANULE = 8                    # registers per thread are allocated in steps of 8
MAX_PER_THREAD = 255
# a budget just above ptxas's own count spills as well (the Llama decode GEMM: 64 registers and
# 16 B spilled by choice, 24 B at a budget of 96, none at 128), so the first budget tried is at
# least this many registers higher
MARGIN = 32
TRIES = 3
SHRINKS = 2


def budgets(num_warps: int, used: int) -> list[int]:
    """The budgets to try for a kernel of ``num_warps`` warps that spilled at ``used`` registers:
    the register counts at which one fewer block fits an SM (occupancy steps), from ``used +
    MARGIN`` up, at most TRIES of them, 255 the last."""
    threads = 32 * num_warps
    steps = sorted({min(MAX_PER_THREAD, REGISTER_FILE // (threads * blocks) // GRANULE * GRANULE)
                    for blocks in range(1, 33)})
    floor = min(used + MARGIN, MAX_PER_THREAD)
    return [b for b in steps if b >= floor and b > used][:TRIES]


def _spills(r) -> bool:
    return r.ok and bool(r.resources.spills)


def smaller(k, cfg):
    """The next tiles to try for a heuristic choice that spills at every budget: BLOCK_K, then
    BLOCK_N halved (the next smaller candidate, not below 16), at most SHRINKS of them."""
    free = {t.name: t for t in k.tunables if t.candidates and t.covers is None and t.rule is None}
    v = cfg.as_dict()
    out = []
    for name in ("BLOCK_K", "BLOCK_N"):
        t = free.get(name)
        below = [c for c in t.candidates if 16 <= c < v[name]] if t else []
        if below:
            out.append(Config(tuple((n, max(below) if n == name else x) for n, x in cfg.values),
                              cfg.num_warps, cfg.num_stages))
    return out[:SHRINKS]


def spill_free(compile: Callable[[list], list], jobs: Sequence, results: Sequence,
               shrink: Sequence[bool] = ()) -> tuple[list, list]:
    """``jobs`` and their native ``results`` (runtime/native.py), each that spilled at ptxas's own
    choice replaced by the job at the lowest budget that compiles without spills, and its
    result. Where ``shrink[i]`` (a heuristic choice, which nothing else would replace) and no
    budget mends it, a smaller tile (``smaller``) that compiles without spills is taken.
    ``compile(jobs) -> results`` compiles the retries in batches."""
    jobs, results = list(jobs), list(results)
    shrink = list(shrink) + [False] * (len(jobs) - len(shrink))

    def retry(tries_of):
        batch = {i: tries for i, tries in tries_of.items() if tries}
        if not batch:
            return
        done = iter(compile([j for tries in batch.values() for j in tries]))
        for i, tries in batch.items():
            got = [(j, next(done)) for j in tries]
            for j, r in got:
                if r.ok and not r.resources.spills:
                    jobs[i], results[i] = j, r
                    break

    retry({i: [dataclasses.replace(job, config=job.config.with_maxnreg(b))
               for b in budgets(job.config.num_warps, r.resources.registers)]
           for i, (job, r) in enumerate(zip(jobs, results)) if _spills(r) and job.config.maxnreg is None})
    retry({i: [dataclasses.replace(job, config=c) for c in smaller(job.kernel, job.config)]
           for i, (job, r) in enumerate(zip(jobs, results)) if _spills(r) and shrink[i]})
    # a smaller tile may itself want a budget
    retry({i: [dataclasses.replace(job, config=job.config.with_maxnreg(b))
               for b in budgets(job.config.num_warps, r.resources.registers)]
           for i, (job, r) in enumerate(zip(jobs, results)) if _spills(r) and shrink[i] and job.config.maxnreg is None})
    return jobs, results


def budgeted(kernel, cfg, buffers, bindings, cache):
    """``cfg`` with the register budget a GPU launch of ``kernel`` needs to run without spills,
    or a smaller tile where no budget mends it (unchanged where ptxas spills nothing). Compiled for this
    process's GPU, the arguments specialised as the native check does (contiguous, aligned);
    results are cached on disk. Never fatal: a failure leaves ``cfg`` as it is."""
    from .native import NativeCompiler, make_job
    from .targets import device_target
    try:
        compiler = NativeCompiler(cache)
        job = make_job(kernel, cfg, device_target(), buffers, bindings, cache)
        (job,), _ = spill_free(compiler.compile, [job], compiler.compile([job]), shrink=[True])
        return job.config
    except Exception as e:     # a budget is an optimisation
        print(f"opforge: {kernel.name}: no register budget ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})",
              file=sys.stderr)
        return cfg
