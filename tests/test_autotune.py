"""The autotuner (issue 4), on the CPU with an injected timer: the configuration space (presets
for matmuls, the product of candidates otherwise), pruning by shared-memory and register
estimates and by blocks far larger than the problem, configurations that raise skipped and
reported while the best of the rest wins, the winner persisted in the kernel's cache entry
(tuned.json) per shape bucket and reused by a new Autotuner without timing, buckets tuned
separately, and OPFORGE_AUTOTUNE=0.

The end-to-end tests drive a PlanRunner down its GPU path (the executor told it is not on the
interpreter) with a fake timer that really launches each candidate through Triton's interpreter:
every candidate configuration of the example kernels runs, the tuned winners (big GPU tiles or
small ones) are the ones launched, and the results still match the float64 reference.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from opforge.ir.tile import TIMED_GUARDS
import torch

import opforge
from opforge.ir.tile import Launch
from opforge.passes.lower_matmul import GEMM_PRESETS
from opforge.runtime import autotune, executor, module
from opforge.runtime.autotune import (TUNED, Autotuner, Limits, autotune_enabled, bucket, dot_count, fits,
                                      space, useful)
from opforge.runtime.autotune import REGISTER_SHARE
from opforge.runtime.cache import KernelCache
from opforge.runtime.estimate import registers, shared_memory
from opforge.runtime.config import Config, heuristic_config
from opforge.runtime.device import interpreting
from opforge.runtime.executor import PlanRunner
from opforge.runtime.inputs import random_inputs
from opforge.runtime.reference import run_graph

from .kernel_helpers import check_outputs, compiled

EXAMPLES = Path(opforge.__file__).resolve().parent / "examples"

LINEAR = """
op lin(x: f16[M, K], w: f16[N, K], b: f16[N]) -> f16[M, N] {
    return silu(x @ w.T + b)
}"""
GATED = """
op gated(x: f16[M, K], wg: f16[N, K], wu: f16[N, K]) -> f16[M, N] {
    return silu(x @ wg.T) * (x @ wu.T)
}"""
ROWS = """
op rows(x: f32[M, D]) -> f32[M, D] {
    return softmax(x, axis=-1)
}"""

BIG = dict(M=4096, N=4096, K=4096)
# at BIG (M >= autotune.PREFILL_ROWS) the decode presets (16 and 32 rows) are not timed
PREFILL_PRESETS = [p for p in GEMM_PRESETS if p[0] >= 64]


def op_of(src, tag, name=None):
    mod = compiled(str(src), tag, **({"ops": [name]} if name else {}))
    return getattr(mod, name or list(mod.ops)[0])


def full_kernel(op):
    """The one-kernel alternative of the op's first step."""
    return op.plan.steps[0][-1].kernel


def smem_of(cfg: Config, dots: int) -> int:
    """The operand tiles in flight: one A tile and a B tile per matmul sharing it, per stage."""
    v = cfg.as_dict()
    return (v["BLOCK_M"] * v["BLOCK_K"] + dots * v["BLOCK_K"] * v["BLOCK_N"]) * 2 * cfg.num_stages


class FakeKernel:
    """Stands in for a jitted kernel: ``fn[grid](*args, **config)`` records the call, and raises
    for the configurations ``bad`` picks."""

    def __init__(self, bad=lambda cfg: False):
        self.bad = bad
        self.calls = []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.calls.append((grid, kw))
            if self.bad(kw):
                raise RuntimeError(f"out of resources: BLOCK_M={kw.get('BLOCK_M')}")
        return launch


class Timer:
    """A fake do_bench: runs the launcher once (so failures surface as they would), then
    returns a time from the configuration the kernel was launched with."""

    def __init__(self, fake: FakeKernel, cost):
        self.fake, self.cost, self.count = fake, cost, 0

    def __call__(self, run):
        self.count += 1
        run()
        _, kw = self.fake.calls[-1]
        return float(self.cost(kw))


def never(run):
    raise AssertionError("the autotuner timed a kernel whose choice was persisted")


def grid_of(launch, bindings, cfg):
    return PlanRunner.grid(launch, bindings, cfg)


def entry_of(op, cache: KernelCache):
    """The kernel's own cache entry in ``cache`` (where tuned.json goes)."""
    from opforge.runtime.loader import load_kernel
    return load_kernel(full_kernel(op), cache)[1]


# -- switches ------------------------------------------------------------------------------------
def test_autotune_enabled_by_environment(monkeypatch):
    monkeypatch.delenv("OPFORGE_AUTOTUNE", raising=False)
    assert autotune_enabled()
    monkeypatch.setenv("OPFORGE_AUTOTUNE", "1")
    assert autotune_enabled()
    monkeypatch.setenv("OPFORGE_AUTOTUNE", "0")
    assert not autotune_enabled()


def test_no_tuner_on_the_interpreter_and_none_when_disabled(monkeypatch, tmp_path):
    cache = KernelCache(tmp_path)
    monkeypatch.setattr(module, "interpreting", lambda: True)
    assert module._tuner(cache) is None                      # the interpreter cannot time anything
    monkeypatch.setattr(module, "interpreting", lambda: False)
    monkeypatch.delenv("OPFORGE_AUTOTUNE", raising=False)
    assert isinstance(module._tuner(cache), Autotuner)
    monkeypatch.setenv("OPFORGE_AUTOTUNE", "0")
    assert module._tuner(cache) is None


def test_executor_uses_the_heuristic_without_a_tuner_and_the_tuner_when_given(monkeypatch, tmp_path):
    op = op_of(LINEAR, "at_lin")
    launch = op.plan.steps[0][-1]
    sizes = dict(M=64, N=64, K=64)
    monkeypatch.setattr(executor, "interpreting", lambda: False)
    runner = PlanRunner(op.plan, op.fused, KernelCache(tmp_path))
    monkeypatch.setenv("OPFORGE_NATIVE_PRUNE", "0")
    assert runner.config(launch, sizes, []) == heuristic_config(launch.kernel, sizes)
    # with the compiler's say, the heuristic choice takes the register budget it needs
    # (runtime/register_budget.py; tests/test_native.py compiles a real case)
    monkeypatch.delenv("OPFORGE_NATIVE_PRUNE")
    from opforge.runtime import register_budget
    asked = []
    monkeypatch.setattr(register_budget, "budgeted",
                        lambda k, cfg, buffers, bindings, cache: (asked.append(k.name), cfg.with_maxnreg(128))[1])
    assert runner.config(launch, sizes, []) == heuristic_config(launch.kernel, sizes).with_maxnreg(128)
    assert asked == [launch.kernel.name]

    class Tuner:
        def choose(self, launch, fn, entry, bindings, args, grid, reset=None):
            return Config((("BLOCK_M", 16),), 2, 2)

    runner.tuner = Tuner()
    assert runner.config(launch, sizes, []) == Config((("BLOCK_M", 16),), 2, 2)


# -- the space -------------------------------------------------------------------------------------
def test_matmul_space_is_the_presets():
    k = full_kernel(op_of(LINEAR, "at_lin"))
    cfgs = space(k, BIG)
    assert len(cfgs) == len(GEMM_PRESETS) == len(k.presets)
    got = {(c.as_dict()["BLOCK_M"], c.as_dict()["BLOCK_N"], c.as_dict()["BLOCK_K"], c.as_dict()["GROUP_M"],
            c.num_warps, c.num_stages) for c in cfgs}
    assert got == set(GEMM_PRESETS)
    # far fewer than the product of the free candidates
    product = 1
    for t in k.tunables:
        product *= len(t.candidates) or 1
    assert product * len(k.warps) * len(k.stages) > 10 * len(cfgs)


def test_row_space_is_the_product_of_candidates_with_fixed_covers():
    k = full_kernel(op_of(ROWS, "at_rows"))
    assert not k.presets
    sizes = dict(M=100, D=300)
    cfgs = space(k, sizes)
    free = [t for t in k.tunables if t.covers is None and t.rule is None]
    n = 1
    for t in free:
        n *= len(t.candidates)
    assert len(cfgs) == n * len(k.warps) * len(k.stages)
    assert len(set(cfgs)) == len(cfgs)
    for t in k.tunables:
        if t.covers is not None:          # a whole-row tile: the next power of two of the row
            assert {c.as_dict()[t.name] for c in cfgs} == {max(t.lo, min(t.hi, 512))}


# -- pruning ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("smem_kib", [48, 96])
def test_shared_memory_estimate_prunes(smem_kib):
    k = full_kernel(op_of(LINEAR, "at_lin"))
    limits = Limits(shared_memory=smem_kib * 1024)
    cfgs = space(k, BIG)
    timed = []
    tuner = Autotuner(None, timer=lambda run: (timed.append(1), 1.0)[1], limits=limits, progress=False)
    best, report = tuner.tune(k, BIG, lambda c: (lambda: None))
    fitting = [c for c in cfgs if shared_memory(k, c) <= limits.shared_memory]
    assert 0 < len(fitting) < len(cfgs)
    for c in cfgs:
        # a plain f16 GEMM: the pipelined A and B tiles, or the f32 accumulator if larger
        v = c.as_dict()
        assert shared_memory(k, c) == max(smem_of(c, 1), v["BLOCK_M"] * v["BLOCK_N"] * 4)
        ok, why = fits(k, c, BIG, limits)
        if shared_memory(k, c) > limits.shared_memory:
            assert not ok and "shared memory" in why
    assert report.tried == len(timed) == len([c for c in fitting if fits(k, c, BIG, limits)[0] and useful(k, c, BIG)])
    assert report.pruned == len(cfgs) - report.tried
    assert shared_memory(k, best) <= limits.shared_memory
    # with the default (H100) limit, the big tiles that were pruned here are kept
    assert fits(k, Config((("BLOCK_M", 128), ("BLOCK_N", 256), ("BLOCK_K", 64), ("GROUP_M", 8)), 8, 3), BIG,
                Limits())[0]


def test_shared_a_matmuls_count_every_b_tile():
    single = full_kernel(op_of(LINEAR, "at_lin"))
    gated = full_kernel(op_of(GATED, "at_gated"))
    assert dot_count(single) == 1 and dot_count(gated) == 2
    limits = Limits(shared_memory=64 * 1024)
    kept_single = [c for c in space(single, BIG) if fits(single, c, BIG, limits)[0]]
    kept_gated = [c for c in space(gated, BIG) if fits(gated, c, BIG, limits)[0]]
    assert len(kept_gated) < len(kept_single)
    assert all(smem_of(c, 2) <= shared_memory(gated, c) <= limits.shared_memory for c in kept_gated)


def test_register_estimate_prunes():
    k = full_kernel(op_of(GATED, "at_gated"))
    limits = Limits(registers_per_thread=96)
    cfgs = space(k, BIG)
    pruned = [c for c in cfgs if not fits(k, c, BIG, limits)[0]]
    assert pruned and len(pruned) < len(cfgs)
    for c in cfgs:
        v = c.as_dict()
        accumulators = 2 * v["BLOCK_M"] * v["BLOCK_N"] / (32 * c.num_warps)
        assert registers(k, c) > accumulators        # the K loop's tiles count too
        ok, why = fits(k, c, BIG, limits)
        if shared_memory(k, c) <= limits.shared_memory:
            assert ok == (registers(k, c) <= 96 * REGISTER_SHARE), (c, why)


def test_blocks_far_larger_than_the_problem_are_pruned():
    k = full_kernel(op_of(LINEAR, "at_lin"))
    small = dict(M=8, N=20, K=4096)
    kept = [c for c in space(k, small) if useful(k, c, small)]
    assert kept
    for c in kept:
        v = c.as_dict()
        assert v["BLOCK_M"] <= 16 and v["BLOCK_N"] <= 64      # dot blocks may stay at 16
    assert len(kept) < len(space(k, small))
    assert all(useful(k, c, BIG) == (c.as_dict()["BLOCK_M"] >= 64) for c in space(k, BIG))


# -- skipped configurations, persistence, buckets ----------------------------------------------------
def tune_once(op, cache, sizes, *, timer, tuner=None, limits=None):
    k = full_kernel(op)
    tuner = tuner or Autotuner(cache, timer=timer, limits=limits or Limits(), progress=False)
    fn = getattr(timer, "fake", None) or FakeKernel()
    cfg = tuner.choose(Launch(k), fn, entry_of(op, cache), sizes, [], grid_of)
    return tuner, cfg


def prefer_big(kw):
    return 1.0 / (kw["BLOCK_M"] * kw["BLOCK_N"] * kw["BLOCK_K"]) + 1e-9 * kw.get("GROUP_M", 1)


def test_failing_configs_are_skipped_and_reported(tmp_path, capsys):
    op = op_of(LINEAR, "at_lin")
    cache = KernelCache(tmp_path)
    fake = FakeKernel(bad=lambda kw: kw["BLOCK_M"] >= 128)      # the fastest ones "fail"
    timer = Timer(fake, prefer_big)
    k = full_kernel(op)
    tuner = Autotuner(cache, timer=timer, limits=Limits(), progress=False)
    cfg = tuner.choose(Launch(k), fake, entry_of(op, cache), BIG, ["a", "b"], grid_of)
    (report,) = tuner.reports
    n_bad = sum(1 for p in GEMM_PRESETS if p[0] >= 128)
    assert len(report.failed) == n_bad > 0
    assert all("BLOCK_M=128" in c or "BLOCK_M=256" in c for c, _ in report.failed)
    assert all(why.startswith("RuntimeError: out of resources") for _, why in report.failed)
    assert report.tried == len(PREFILL_PRESETS) and report.pruned == len(GEMM_PRESETS) - len(PREFILL_PRESETS)
    # the best of the rest: the biggest tile with BLOCK_M < 128
    rest = [p for p in PREFILL_PRESETS if p[0] < 128]
    want = min(rest, key=lambda p: 1.0 / (p[0] * p[1] * p[2]) + 1e-9 * p[3])
    v = cfg.as_dict()
    assert (v["BLOCK_M"], v["BLOCK_N"], v["BLOCK_K"], v["GROUP_M"], cfg.num_warps, cfg.num_stages) == want
    assert report.best == cfg and report.best_ms == prefer_big(v)
    # launched with the call's own arguments and the grid for each configuration
    assert all(call_grid[0] >= 1 for call_grid, _ in fake.calls)
    err = capsys.readouterr().err
    assert err.count("opforge autotune:") == n_bad and "skipped" in err


def test_all_configs_failing_falls_back_to_the_heuristic_and_persists_nothing(tmp_path):
    op = op_of(LINEAR, "at_lin")
    cache = KernelCache(tmp_path)
    fake = FakeKernel(bad=lambda kw: True)
    tuner, cfg = tune_once(op, cache, BIG, timer=Timer(fake, prefer_big))
    assert cfg == heuristic_config(full_kernel(op), BIG, tuner.limits)
    assert len(tuner.reports[0].failed) == len(PREFILL_PRESETS)
    assert not (entry_of(op, cache) / TUNED).exists()


def test_everything_pruned_falls_back_to_the_heuristic(tmp_path):
    op = op_of(LINEAR, "at_lin")
    cache = KernelCache(tmp_path)
    tuner, cfg = tune_once(op, cache, BIG, timer=never, limits=Limits(shared_memory=1024))
    assert cfg == heuristic_config(full_kernel(op), BIG, tuner.limits)
    assert tuner.reports[0].pruned == len(GEMM_PRESETS) and tuner.reports[0].tried == 0
    assert not (entry_of(op, cache) / TUNED).exists()


def test_winner_is_persisted_per_bucket_and_reused(tmp_path):
    op = op_of(LINEAR, "at_lin")
    cache = KernelCache(tmp_path)
    fake = FakeKernel()
    timer = Timer(fake, prefer_big)
    sizes = dict(M=700, N=3000, K=1000)
    tuner, cfg = tune_once(op, cache, sizes, timer=timer, limits=Limits())
    assert timer.count == len(GEMM_PRESETS)
    path = entry_of(op, cache) / TUNED
    data = json.loads(path.read_text())
    key = bucket(sizes)
    assert key == "K=1024,M=1024,N=4096"
    assert list(data) == [key]
    stored = data[key]
    assert [tuple(x) for x in stored["values"]] == list(cfg.values)
    assert (stored["num_warps"], stored["num_stages"]) == (cfg.num_warps, cfg.num_stages)
    assert stored["ms"] == prefer_big(cfg.as_dict())
    # the same instance remembers it; a new one reads it back, timing nothing
    assert tune_once(op, cache, sizes, timer=never, tuner=tuner)[1] == cfg
    assert tune_once(op, cache, sizes, timer=never)[1] == cfg
    # other sizes of the same bucket reuse it too
    assert tune_once(op, cache, dict(M=513, N=2049, K=1024), timer=never)[1] == cfg
    # a new process (a new cache object on the same directory) as well
    assert tune_once(op, KernelCache(tmp_path), sizes, timer=never)[1] == cfg


def test_different_buckets_tune_separately(tmp_path):
    op = op_of(LINEAR, "at_lin")
    cache = KernelCache(tmp_path)
    big_timer = Timer(FakeKernel(), prefer_big)
    _, big = tune_once(op, cache, BIG, timer=big_timer)
    small_sizes = dict(M=16, N=64, K=4096)
    small_timer = Timer(FakeKernel(), prefer_big)
    _, small = tune_once(op, cache, small_sizes, timer=small_timer)
    assert big_timer.count > 0 and small_timer.count > 0
    assert small_timer.count < big_timer.count               # useless big blocks pruned for M=16
    assert small.as_dict()["BLOCK_M"] <= 32 < big.as_dict()["BLOCK_M"]
    data = json.loads((entry_of(op, cache) / TUNED).read_text())
    assert set(data) == {bucket(BIG), bucket(small_sizes)}
    assert tune_once(op, cache, BIG, timer=never)[1] == big
    assert tune_once(op, cache, small_sizes, timer=never)[1] == small


def test_fake_tensors_are_never_timed(tmp_path):
    from torch._subclasses.fake_tensor import FakeTensorMode
    op = op_of(LINEAR, "at_lin")
    cache = KernelCache(tmp_path)
    with FakeTensorMode():
        args = [torch.empty(4, 4)]
    tuner = Autotuner(cache, timer=never, limits=Limits(), progress=False)
    cfg = tuner.choose(Launch(full_kernel(op)), None, entry_of(op, cache), BIG, args, grid_of)
    assert cfg == heuristic_config(full_kernel(op), BIG)
    assert not (entry_of(op, cache) / TUNED).exists()


# -- end to end: tuned configurations are launched, and right ---------------------------------------
class RunTimer:
    """Launches the real (interpreted) kernel for each candidate and returns a fake time that
    prefers big or small blocks; counts the timed configurations."""

    def __init__(self, prefer: str, runs: int = 1):
        self.prefer, self.runs, self.count = prefer, runs, 0
        self.current = None

    def __call__(self, run):
        self.count += 1
        for _ in range(self.runs):
            run()
        blocks = 1
        for name, value in self.current.values:
            if name.startswith("BLOCK"):
                blocks *= value
        return float(blocks) if self.prefer == "small" else 1.0 / blocks


class SpyTuner(Autotuner):
    """An Autotuner whose timer learns which configuration it is timing."""

    def tune(self, k, bindings, make_run, **kw):
        def make(cfg):
            run = make_run(cfg)

            def wrapped():
                self.timer.current = cfg
                run()
            return wrapped
        self.timer.current = None
        return super().tune(k, bindings, make, **kw)


def tuned_call(op, sizes, tmp_path, prefer, *, runs=1, seed=0, tuner=None):
    timer = RunTimer(prefer, runs)
    tuner = tuner or SpyTuner(KernelCache(tmp_path), timer=timer, limits=Limits(), progress=False)
    runner = PlanRunner(op.plan, op.fused, tuner.cache, tuner=tuner)
    g = op.graph
    ins = random_inputs(g, sizes, seed=seed)
    outs = runner(ins, sizes, torch.device("cpu"))
    check_outputs(g, outs, run_graph(g, ins, sizes, check=True), f" (tuned, {prefer} blocks)")
    return tuner


E2E = [
    pytest.param(LINEAR, None, dict(M=33, N=40, K=70), id="linear"),
    pytest.param(LINEAR, None, dict(M=3, N=40, K=1030), id="linear_split_k"),
    pytest.param(GATED, None, dict(M=7, N=33, K=20), id="gated"),
    pytest.param(EXAMPLES / "llama.opf", "rms_norm", dict(B=1, S=7, D=40), id="rms_norm"),
    pytest.param(EXAMPLES / "llama.opf", "attention", dict(B=1, H=2, S=33, E=16), id="attention"),
    pytest.param(EXAMPLES / "moe.opf", "moe_ffn", dict(T=9, D=16, F=20, E=4), id="moe_ffn"),
]


ON_INTERPRETER = pytest.mark.skipif(not interpreting(), reason="drives the GPU code path through the interpreter")


@ON_INTERPRETER
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("prefer", ["big", "small"])
@pytest.mark.parametrize("src, name, sizes", E2E)
def test_tuned_configurations_run_and_are_right(monkeypatch, tmp_path, src, name, sizes, prefer, capsys):
    monkeypatch.setattr(executor, "interpreting", lambda: False)
    op = op_of(src, "at_e2e", name)
    tuner = tuned_call(op, sizes, tmp_path, prefer)
    kernels = set()
    for step in op.plan.steps:
        viable = [lnch for lnch in step if lnch.guard is None or lnch.guard.holds(sizes)]
        timed = len(viable) > 1 and viable[0].guard.rule in TIMED_GUARDS   # alternatives timed whole
        kernels |= {k.name for lnch in (viable if timed else [executor.choose(step, sizes)]) for k in lnch.kernels}
    assert {r.kernel for r in tuner.reports} == kernels
    for r in tuner.reports:
        assert not r.failed, (r.kernel, r.failed)        # every candidate launches
        # tuned, unless every candidate was pruned (then the heuristic runs)
        assert (r.tried >= 1 and r.best is not None) or (r.tried == 0 and r.pruned > 0), r
    assert sum(r.tried for r in tuner.reports) >= len(tuner.reports)
    assert "opforge autotune" not in capsys.readouterr().err
    # a second call reuses every choice
    before = tuner.timer.count
    tuned_call(op, sizes, tmp_path, prefer, tuner=tuner, seed=1)
    assert tuner.timer.count == before


@ON_INTERPRETER
def test_atomic_outputs_are_rezeroed_around_timing_runs(monkeypatch, tmp_path):
    """Timing launches the gated-combine kernel (atomic adds into a zeroed output) many
    times on the call's own buffers; the result must still be one combine's worth."""
    monkeypatch.setattr(executor, "interpreting", lambda: False)
    op = op_of(EXAMPLES / "moe.opf", "at_moe", "moe_ffn")
    tuned_call(op, dict(T=5, D=16, F=16, E=4), tmp_path, "big", runs=3)


@ON_INTERPRETER
def test_bucket_reuse_across_sizes_with_different_rule_values(monkeypatch, tmp_path):
    """T=17, E=4 and T=32, E=3 share a bucket but not the MoE row block (16 and 32): the
    persisted choice, made at the first, must still give right answers at the second."""
    from opforge.ir.prims_fused import moe_block
    assert moe_block(34, 4) == 16 and moe_block(64, 3) == 32
    a, b = dict(T=17, D=16, F=16, E=4), dict(T=32, D=16, F=16, E=3)
    assert bucket(a) == bucket(b)
    monkeypatch.setattr(executor, "interpreting", lambda: False)
    op = op_of(EXAMPLES / "moe.opf", "at_moe", "moe_ffn")
    tuner = tuned_call(op, a, tmp_path, "small")
    before = tuner.timer.count
    tuned_call(op, b, tmp_path, "small", tuner=tuner, seed=2)
    assert tuner.timer.count == before
    # and from a fresh tuner reading tuned.json
    tuned_call(op, b, tmp_path, "big", seed=3)


def test_decode_attention_has_candidates_to_tune():
    src = """
op dec(q: f16[B, H, S, E], k: f16[B, H, T, E], v: f16[B, H, T, E]) -> f16[B, H, S, E] {
    return softmax((q @ k.T) * rsqrt(cast(E, f32)), axis=-1) @ v
}"""
    op = op_of(src, "at_dec")
    sizes = dict(B=1, H=8, S=1, T=4096, E=128)
    launch = executor.choose(op.plan.steps[0], sizes)
    assert launch.guard is not None
    for k in launch.kernels:
        kept = [c for c in space(k, sizes) if fits(k, c, sizes, Limits())[0] and useful(k, c, sizes)]
        assert kept, k.name


def test_progress_bar_is_quiet_when_asked(tmp_path, capsys):
    op = op_of(LINEAR, "at_lin")
    tune_once(op, KernelCache(tmp_path), BIG, timer=Timer(FakeKernel(), prefer_big))
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert autotune._progress(False, "x", 3).__enter__()() is None


def test_alternatives_are_timed_whole_and_the_choice_persists(tmp_path):
    """A step whose split-K and plain alternatives both apply: the faster one is chosen, the
    choice is kept per bucket in the cache entry, and a new tuner reuses it without timing."""
    from opforge.runtime.autotune import Autotuner, TUNED
    from opforge.runtime.cache import KernelCache
    src = "op mm(x: f16[M, K], w: f16[N, K]) -> f16[M, N] { return x @ w.T }"
    op = opforge.compile(src, namespace="alt_tune").mm
    step = op.plan.steps[0]
    assert len(step) == 2 and step[0].guard is not None and step[1].guard is None
    cache = KernelCache(tmp_path)
    entry = tmp_path / "entry"
    entry.mkdir()
    runs = []

    def make_run(lnch):
        return lambda: runs.append(lnch)

    def timer(run):
        run()
        return 2.0 if runs[-1] is step[0] else 1.0      # the plain GEMM is faster here
    bindings = {"M": 1, "N": 64, "K": 4096}
    t = Autotuner(cache, timer=timer, progress=False)
    assert t.choose_alternative(list(step), entry, bindings, make_run) == 1
    assert len(runs) == 2
    data = cache.read_json(entry, TUNED)
    key = "alternative K=4096,M=1,N=64"
    assert data[key]["index"] == 1 and data[key]["ms"] == [2.0, 1.0]
    fresh = Autotuner(cache, timer=lambda run: pytest.fail("timed again"), progress=False)
    assert fresh.choose_alternative(list(step), entry, bindings, make_run) == 1


def test_a_failing_alternative_is_skipped(tmp_path, capsys):
    from opforge.runtime.autotune import Autotuner
    from opforge.runtime.cache import KernelCache
    src = "op mm2(x: f16[M, K], w: f16[N, K]) -> f16[M, N] { return x @ w.T }"
    op = opforge.compile(src, namespace="alt_tune2").mm2
    step = list(op.plan.steps[0])
    entry = tmp_path / "e"
    entry.mkdir()

    def make_run(lnch):
        def run():
            if lnch is step[1]:
                raise RuntimeError("out of resources")
        return run
    t = Autotuner(KernelCache(tmp_path), timer=lambda run: (run(), 1.0)[1], progress=False)
    assert t.choose_alternative(step, entry, {"M": 1, "N": 64, "K": 4096}, make_run) == 0
    assert "skipped" in capsys.readouterr().err


# -- a tuned.json that is garbage (issue 9): tuned again, never trusted, never fatal --------------
GARBAGE_TUNED = [
    b"\x00 not json",
    b"[1, 2]",
    b'"a string"',
    b'{"K=1024,M=1024,N=4096": [1, 2]}',
    b'{"K=1024,M=1024,N=4096": {"values": "BLOCK_M"}}',
    b'{"K=1024,M=1024,N=4096": {"values": [["BLOCK_M", 64]], "num_warps": 4, "num_stages": 3}}',
    b'{"K=1024,M=1024,N=4096": {"values": [["BLOCK_M", 1e9], ["BLOCK_N", 64], ["BLOCK_K", 32], '
    b'["GROUP_M", 8]], "num_warps": 4, "num_stages": 3}}',
    b'{"K=1024,M=1024,N=4096": {"values": [["BLOCK_M", 64], ["BLOCK_N", 64], ["BLOCK_K", 32], '
    b'["GROUP_M", 8]], "num_warps": 3, "num_stages": 3}}',
    b'{"K=1024,M=1024,N=4096": {"values": [["NOPE", 64]], "num_warps": 4, "num_stages": true}}',
]


@pytest.mark.parametrize("garbage", GARBAGE_TUNED, ids=range(len(GARBAGE_TUNED)))
def test_a_garbage_tuned_json_is_tuned_again_and_rewritten(tmp_path, garbage):
    op = op_of(LINEAR, "at_lin")
    sizes = dict(M=700, N=3000, K=1000)
    _, want = tune_once(op, KernelCache(tmp_path / "clean"), sizes, timer=Timer(FakeKernel(), prefer_big))
    cache = KernelCache(tmp_path / "c")
    path = entry_of(op, cache) / TUNED
    path.write_bytes(garbage)
    timer = Timer(FakeKernel(), prefer_big)
    _, cfg = tune_once(op, cache, sizes, timer=timer)
    assert timer.count == len(GEMM_PRESETS)          # tuned again, not read back
    assert cfg == want
    assert tune_once(op, KernelCache(tmp_path / "c"), sizes, timer=never)[1] == cfg   # rewritten


@pytest.mark.parametrize("stored", ['[0]', '{"alternative K=4096,M=1,N=64": {"index": "1"}}',
                                    '{"alternative K=4096,M=1,N=64": {"index": 7}}',
                                    '{"alternative K=4096,M=1,N=64": [1]}'])
def test_a_garbage_alternative_choice_is_timed_again(tmp_path, stored):
    src = "op mm3(x: f16[M, K], w: f16[N, K]) -> f16[M, N] { return x @ w.T }"
    op = compiled(src, "alt_garbage").mm3
    step = list(op.plan.steps[0])
    cache = KernelCache(tmp_path)
    entry = tmp_path / "entry"
    entry.mkdir()
    (entry / TUNED).write_text(stored)
    times = []

    def timer(run):
        times.append(1)
        return float(len(times))          # the first alternative is the faster
    t = Autotuner(cache, timer=timer, progress=False)
    assert t.choose_alternative(step, entry, {"M": 1, "N": 64, "K": 4096}, lambda lnch: lambda: None) == 0
    assert len(times) == 2
    assert cache.read_json(entry, TUNED)["alternative K=4096,M=1,N=64"]["index"] == 0
