"""Timing a callable: triton.testing.do_bench's median on a GPU (CUDA events, L2 flushed
between runs, warm-up first); on the CPU a wall-clock median, which only says how slow the
interpreter is and is never reported as a kernel figure."""
from __future__ import annotations

import statistics
import time

import torch


def bench_ms(fn, *, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    if torch.cuda.is_available():
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_op(op, args) -> float:
    return bench_ms(lambda: op(*args))
