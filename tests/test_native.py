"""Native compilation without a GPU (issue 10): reading ptxas's log and the SASS, the launch's
argument specialisation, a config over shared memory failing the check with a clear message,
``opforge show --stage ptx|sass`` and ``explain(target=...)``, and the static estimates the
autotuner prunes with (dequantising kernels' tiles and temporaries counted).

The kernels compile through Triton's compiler in worker processes (this suite runs on the
interpreter); the sweep over the examples is tests/test_native_sweep.py (``make test-native``).
"""
from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from opforge import CallError
from opforge.cli import main
from opforge.runtime.config import Config, heuristic_config
from opforge.runtime.estimate import registers, shared_memory
from opforge.runtime.native import NativeCompiler, launch_args, make_job, parse_ptxas, sass_opcodes
from opforge.runtime.sweep import launched_kernels, variant
from opforge.runtime.targets import TARGETS, target

from .conftest import EXAMPLES
from .kernel_helpers import compiled

LINEAR = """
op lin(x: f16[M, K], w: f16[N, K], b: f16[N]) -> f16[M, N] {
    return x @ w.T + b
}"""
INT8 = """
op lin8(x: f16[M, K], w: f16[N, K] @quant(int8)) -> f16[M, N] {
    return x @ w.T
}"""
BIG = dict(M=2048, N=4096, K=4096)

PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'lin_k0_matmul' for 'sm_90a'
ptxas info    : Function properties for lin_k0_matmul
    24 bytes stack frame, 740 bytes spill stores, 736 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 24 bytes cumulative stack size
ptxas warning : (C7511) Potential Performance Loss: wgmma.mma_async instructions are serialized due to insufficient register resources for the wgmma pipeline in the function 'lin_k0_matmul'
"""

SASS = """\
        /*0a80*/                   LDGSTS.E.BYPASS.LTC128B.128 [R5], desc[UR4][R2.64], P0 ;
        /*0a90*/              @!P1 LDGSTS.E.BYPASS.LTC128B.128 [R5+0x800], desc[UR4][R2.64+0x80], !PT ;
        /*0b00*/                   HGMMA.64x128x16.F32 gdesc[UR8], RZ, !UPT ;
        /*0b10*/              @P0  HMMA.16816.F32 R24, R4, R8, R24 ;
        /*0b20*/                   STG.E.U16 desc[UR4][R2.64], R7 ;
"""


def op_of(src, tag):
    mod = compiled(src, tag)
    return getattr(mod, list(mod.ops)[0])


def gemm(src=LINEAR, tag="nat_lin", sizes=BIG):
    op = variant(op_of(src, tag), sizes)
    k = [k for k in launched_kernels(op.plan, sizes) if k.name.endswith("_matmul")][0]
    return op, k


# -- reading the compiler's output -------------------------------------------------------------------
def test_ptxas_log_gives_registers_spills_stack_and_warnings():
    p = parse_ptxas(PTXAS_LOG)
    assert (p["registers"], p["spill_stores"], p["spill_loads"], p["stack"]) == (255, 740, 736, 24)
    assert len(p["warnings"]) == 1 and "(C7511)" in p["warnings"][0]


def test_sass_opcodes_without_modifiers_or_predicates():
    ops = sass_opcodes(SASS)
    assert ops == {"LDGSTS": 2, "HGMMA": 1, "HMMA": 1, "STG": 1}


def test_targets_by_name():
    assert target("sm_90").name == "sm_90a" and target("SM_80").capability == 80
    assert TARGETS["sm_90a"].shared_memory == 232448 and TARGETS["sm_80"].shared_memory == 166912
    with pytest.raises(Exception, match="unknown target 'sm_70'; the targets are sm_80, sm_89, sm_90a"):
        target("sm_70")


def test_launch_args_are_what_the_executor_passes():
    op, k = gemm(sizes=dict(M=1, N=4096, K=4096))
    args = dict(zip((p.name for p in k.params), launch_args(k, op.plan.buffers, dict(M=1, N=4096, K=4096))))
    assert args["x_ptr"] == ("ptr", "float16")
    assert ("int", 1) in args.values()      # M = 1 (and unit strides): Triton makes them constexprs
    strides = {n: v for (n, (_, v)) in args.items() if n.startswith("stride")}
    assert strides == {"stride_x_0": 4096, "stride_x_1": 1, "stride_w_0": 4096, "stride_w_1": 1, "stride_b_0": 1,
                       "stride_k0_matmul_out_0": 4096, "stride_k0_matmul_out_1": 1}    # contiguous


# -- compiling (one batch through the workers) ----------------------------------------------------------
OVER = Config((("BLOCK_M", 256), ("BLOCK_N", 256), ("BLOCK_K", 128), ("GROUP_M", 8)), 8, 4)


@pytest.fixture(scope="module")
def compiled_batch():
    op, k = gemm()
    one, k1 = gemm(sizes=dict(M=1, N=4096, K=4096))
    jobs = [make_job(k, heuristic_config(k, BIG), "sm_90a", op.plan.buffers, BIG, op.cache),
            make_job(k, OVER, "sm_90a", op.plan.buffers, BIG, op.cache),
            make_job(k1, heuristic_config(k1, dict(M=1, N=4096, K=4096)), "sm_80", one.plan.buffers,
                     dict(M=1, N=4096, K=4096), one.cache)]
    return jobs, NativeCompiler(op.cache).compile(jobs), op.cache


def test_heuristic_prefill_gemm_uses_wgmma_and_cp_async_within_limits(compiled_batch):
    jobs, (heur, _, _), _ = compiled_batch
    assert heur.ok, heur.error
    r = heur.resources
    assert r.wgmma and r.tensor_cores == ("HGMMA",) and "cp.async" in r.loads
    assert r.spills == 0 and 0 < r.shared <= TARGETS["sm_90a"].shared_memory
    assert heur.problems(TARGETS["sm_90a"]) == []
    # the static estimate bounds what the compiler allocated
    assert shared_memory(jobs[0].kernel, jobs[0].config) >= r.shared


def test_a_config_over_shared_memory_fails_the_check_with_a_clear_message(compiled_batch):
    _, (_, over, _), _ = compiled_batch
    assert over.ok                  # Triton compiles it; the launch would fail
    (msg,) = [p for p in over.problems(TARGETS["sm_90a"]) if "shared memory" in p]
    assert re.fullmatch(r"needs (\d+) B of shared memory, over the 232448 B of sm_90a \(H100\)", msg), msg
    assert int(msg.split()[1]) == over.resources.shared > 232448


def test_size_one_is_specialised_as_the_launch_would(compiled_batch):
    _, (_, _, decode), _ = compiled_batch
    assert decode.ok, decode.error
    ttgir = decode.stage("ttgir")
    start = ttgir.index("tt.func")
    sig = ttgir[start:ttgir.index(") attributes", start)]
    assert "%M" not in sig and "%M:" not in sig              # M = 1 became a constexpr
    assert sig.count("tt.divisibility = 16") >= 4            # aligned pointers, sizes of 4096
    assert decode.resources.tensor_cores == ("HMMA",)        # sm_80: mma.sync
    assert ".target sm_80" in decode.stage("ptx")


def test_results_come_back_from_the_disk_cache(compiled_batch):
    jobs, first, cache = compiled_batch
    again = NativeCompiler(cache).compile(jobs)
    assert all(r.cached for r in again)
    assert [r.resources for r in again] == [r.resources for r in first]


INT4 = """
op lin4(x: f16[M, K], w: f16[N, K] @quant(int4, group=64)) -> f16[M, N] {
    return x @ w.T
}"""
DECODE = dict(M=1, N=4096, K=4096)


def test_int4_decode_reads_the_packed_bytes_once_with_vector_loads():
    """Issue 11's SASS check: at M = 1 the int4 GEMM's packed [BLOCK_K, BLOCK_N] tile is one
    16-byte copy per thread (cp.async), not a u8 load per element; the only u8 loads left are
    a group's zero-point row."""
    from opforge.runtime.sizes import size_bindings
    op = op_of(INT4, "nat_int4")
    b = size_bindings(op.graph, DECODE)
    v = variant(op, b)
    vb = size_bindings(v.graph, b)
    k = [k for k in launched_kernels(v.plan, vb) if "_matmul" in k.name][0]     # the split-K partial GEMM
    (r,) = NativeCompiler(op.cache).compile([make_job(k, heuristic_config(k, vb), "sm_90a", v.plan.buffers, vb, op.cache)])
    assert r.ok, r.error
    assert r.resources.spills == 0 and "HMMA" in r.resources.tensor_cores
    sass = r.stage("sass")
    assert re.search(r"LDGSTS\.E(?:\.BYPASS)?\.128|LDG\.E\.128", sass)
    assert len(re.findall(r"LDG\.E\.U8\b", sass)) <= 2, re.findall(r"LDG\S*", sass)


# -- the estimates ---------------------------------------------------------------------------------------
def test_dequantising_kernels_count_their_tiles_and_temporaries():
    _, plain = gemm()
    _, q8 = gemm(INT8, "nat_int8")
    cfg = Config((("BLOCK_M", 128), ("BLOCK_N", 256), ("BLOCK_K", 64), ("GROUP_M", 8)), 8, 3)
    # the f16 GEMM pipelines A and B; the int8 one B's bytes and the scale row, then stages the
    # dequantised f16 tile once more
    assert shared_memory(plain, cfg) == 3 * (128 * 64 + 64 * 256) * 2
    assert shared_memory(q8, cfg) == 3 * (128 * 64 * 2 + 64 * 256 + 256 * 4) + 64 * 256 * 2
    assert registers(q8, cfg) > registers(plain, cfg) + 32      # its f32 temporaries


# -- for users -------------------------------------------------------------------------------------------
def test_show_native_stages_and_explain_with_a_target(tmp_path):
    r = CliRunner().invoke(main, ["show", str(EXAMPLES / "llama.opf"), "--op", "rms_norm", "--stage", "ptx",
                                  "--target", "sm_80"])
    assert r.exit_code == 0, r.output
    assert re.search(r"// ---- rms_norm__f16_k0_mul for sm_80 at .* \(B=1, S=2048, D=4096\) ----", r.output)
    assert re.search(r"// \d+ registers, 0 B spill stores, 0 B spill loads", r.output)
    assert ".target sm_80" in r.output and ".entry rms_norm__f16_k0_mul" in r.output
    op = op_of(LINEAR, "nat_explain")
    text = op.explain(file=open(tmp_path / "x.txt", "w"), target="sm_90a", sizes=dict(M=64, N=128, K=256))
    assert "== resources on sm_90a (H100, 232448 B shared memory) at M=64, K=256, N=128 ==" in text
    assert re.search(r"lin_k0_matmul\s+64x128x\d+ w4 s\d\s+\d+\s+0\s+\d+K\s+HGMMA\s+cp.async", text), text
    with pytest.raises(CallError, match=r"give the sizes M, K, N"):
        op.explain(file=open(tmp_path / "y.txt", "w"), target="sm_90a")


def test_the_autotuner_drops_the_configs_the_compiler_rejects():
    """On a GPU the candidates are compiled before timing; here a target with 64 KiB of shared
    memory rejects the bigger of two presets, which is reported and never timed."""
    import dataclasses

    import torch

    from opforge.runtime.autotune import Autotuner, Limits, NativePrune
    from opforge.runtime.executor import kernel_args
    from opforge.runtime.loader import load_kernel
    from opforge.runtime.targets import Target
    op, k = gemm()
    small = (((("BLOCK_M", 64), ("BLOCK_N", 64), ("BLOCK_K", 32), ("GROUP_M", 8)), 4, 2))
    big = (((("BLOCK_M", 128), ("BLOCK_N", 256), ("BLOCK_K", 64), ("GROUP_M", 8)), 8, 3))
    k = dataclasses.replace(k, presets=(small, big))
    _, entry = load_kernel(k, op.cache)
    buffers = {n: torch.empty([1] * len(b.shape), dtype=torch.float16) for n, b in op.plan.buffers.items()}
    # the launch's arguments: tensors (only their dtype and address matter), sizes, strides
    args = [buffers[p.buffer] if p.kind == "ptr" else BIG[str(p.dim)] if p.kind == "size" else 4096 if p.axis == 0
            else 1 for p in k.params]
    timed = []
    tuner = Autotuner(op.cache, timer=lambda run: (timed.append(1), 1.0)[1], limits=Limits(), progress=False,
                      prune=NativePrune(op.cache, Target("tiny", 90, 64 * 1024, "a 64 KiB GPU", ("HGMMA",))))
    best, report = tuner.tune(k, BIG, lambda c: (lambda: None), args=args, entry=entry)
    assert len(timed) == report.tried == 1 and best.as_dict()["BLOCK_N"] == 64
    ((cfg, why),) = report.dropped
    assert "BLOCK_N=256" in cfg and re.fullmatch(r"needs \d+ B of shared memory, over the 65536 B of tiny "
                                                  r"\(a 64 KiB GPU\)", why)


# -- register budgets (runtime/register_budget.py) --------------------------------------------------------
def test_budgets_are_the_occupancy_steps_above_the_count():
    from opforge.runtime.register_budget import budgets
    assert budgets(4, 64) == [96, 128, 168]          # 4 warps: 5, 4 and 3 blocks an SM
    assert budgets(4, 128) == [168, 255]
    assert budgets(8, 128) == [255]                  # 8 warps: one block at 255
    assert budgets(4, 240) == [255] and budgets(8, 255) == []


def test_smaller_tiles_halve_block_k_then_block_n():
    from opforge.runtime.register_budget import smaller
    _, k = gemm()
    cfg = heuristic_config(k, BIG)
    v = cfg.as_dict()
    got = [c.as_dict() for c in smaller(k, cfg)]
    assert got[0]["BLOCK_K"] < v["BLOCK_K"] and got[0]["BLOCK_N"] == v["BLOCK_N"]
    assert got[1]["BLOCK_N"] < v["BLOCK_N"] and got[1]["BLOCK_K"] == v["BLOCK_K"]
    assert all(c["BLOCK_M"] == v["BLOCK_M"] for c in got)


def test_a_register_budget_mends_what_ptxas_spills_by_choice():
    """The Llama block's decode split-K GEMM (the attention output projection) at its heuristic
    tile: ptxas, left to choose, holds it at an occupancy step and spills a few bytes (sm_80 under
    Triton 3.6 and 3.9; sm_90a under 3.9). Compiled again at a budget it spills nothing, and the
    budget is what the runtime launches with (``maxnreg``) and what ``opforge check`` shows."""
    from opforge.runtime.module import compile_module
    from opforge.runtime.register_budget import budgeted, spill_free
    from opforge.runtime.sizes import size_bindings
    from opforge.runtime.sweep import op_cases
    import opforge.runtime.targets as targets
    sizes = dict(B=1, S=1, D=4096, H=32, E=128, F=11008)
    op = compile_module(EXAMPLES / "llama.opf", ops=["llama_block"]).ops["llama_block"]
    cases = [c for c in op_cases(op, sizes, [TARGETS["sm_90a"], TARGETS["sm_80"]], which="heuristic")
             if c.kernel.name.endswith("k7_matmul_splitk")]
    assert len(cases) == 2
    compiler = NativeCompiler(op.cache)
    first = compiler.compile([c.job for c in cases])
    assert all(r.ok for r in first)
    spilled = [i for i, r in enumerate(first) if r.resources.spills]
    assert spilled, [(r.target, r.resources) for r in first]     # the case this test is about
    jobs, results = spill_free(compiler.compile, [c.job for c in cases], first)
    for i in spilled:
        assert results[i].resources.spills == 0 and jobs[i].config.maxnreg > first[i].resources.registers
        assert jobs[i].config.as_dict() == cases[i].config.as_dict()        # the same tile
        assert f"maxnreg={jobs[i].config.maxnreg}" in str(jobs[i].config)
        assert jobs[i].payload()["maxnreg"] == jobs[i].config.maxnreg
    for i in set(range(2)) - set(spilled):
        assert jobs[i] is cases[i].job                                      # nothing to mend
    # the runtime's heuristic path on a GPU of that target asks the same question
    i = spilled[0]
    k, v = cases[i].kernel, variant(op, size_bindings(op.graph, sizes))
    old = targets.device_target
    targets.device_target = lambda: TARGETS[first[i].target]
    try:
        cfg = budgeted(k, cases[i].config, v.plan.buffers, dict(cases[i].bindings), op.cache)
    finally:
        targets.device_target = old
    assert cfg == jobs[i].config


def test_the_autotuner_times_a_candidate_at_the_budget_that_replaces_it():
    """A prune that answers a Config (NativePrune's answer for a candidate mended by a register
    budget) has the candidate timed, stored and read back at that budget."""
    import torch

    from opforge.runtime.autotune import Autotuner, Limits, stored_config, tuning_candidates
    op, k = gemm()
    cands = tuning_candidates(k, BIG, Limits())
    want = cands[0].with_maxnreg(168)
    timed = []
    tuner = Autotuner(op.cache, timer=lambda run: (run(), 1.0)[1], limits=Limits(), progress=False,
                      prune=lambda k, cfgs, args, entry: {cfgs[0]: want, cfgs[1]: "spills 8 B stores / 8 B loads"})
    best, report = tuner.tune(k, BIG, lambda c: (lambda: timed.append(c)), args=[], entry=op.cache.root)
    assert want in timed and cands[0] not in timed and cands[1] not in timed
    assert len(report.dropped) == 1 and report.dropped[0][0] == str(cands[1])
    stored = {"values": list(want.values), "num_warps": want.num_warps, "num_stages": want.num_stages,
              "maxnreg": want.maxnreg}
    assert stored_config(k, stored) == want
    assert stored_config(k, {**stored, "maxnreg": 7}) is None and stored_config(k, {**stored, "maxnreg": None}) == cands[0]
    assert want.launch_meta()["maxnreg"] == 168 and "maxnreg" not in cands[0].launch_meta()


def test_mma_sync_targets_keep_tiles_the_register_file_holds():
    """sm_80 (dots on mma.sync, operands in registers) drops a 128 x 256 GEMM tile at 8 warps and
    a 128 x 64 flash tile at head dim 128 by these rules; sm_90a keeps the GEMM tile."""
    from opforge.runtime.autotune import Limits, fits
    _, k = gemm()
    wide = Config((("BLOCK_M", 128), ("BLOCK_N", 256), ("BLOCK_K", 64), ("GROUP_M", 8)), 8, 3)
    ok80, why = fits(k, wide, BIG, Limits.of_target(TARGETS["sm_80"]))
    assert not ok80 and "accumulator elements per thread" in why
    assert fits(k, wide, BIG, Limits.of_target(TARGETS["sm_90a"]))[0]
    sizes = dict(B=1, H=32, G=8, R=4, S=4096, T=4096, E=128)
    from opforge.runtime.module import compile_module
    op = compile_module(EXAMPLES / "attention_variants.opf", ops=["sliding_window"]).ops["sliding_window"]
    from opforge.runtime.sizes import size_bindings
    v = variant(op, size_bindings(op.graph, sizes))
    vb = size_bindings(v.graph, sizes)
    (fk,) = [k for k in launched_kernels(v.plan, vb) if k.name.endswith("flash_attention_mod")]
    tile = Config((("BLOCK_M", 128), ("BLOCK_N", 64), ("BLOCK_E", 128), ("BLOCK_EV", 128)), 8, 3)
    ok80, why = fits(fk, tile, vb, Limits.of_target(TARGETS["sm_80"]))
    assert not ok80 and "score and accumulator elements" in why
    h80 = heuristic_config(fk, vb, Limits.of_target(TARGETS["sm_80"])).as_dict()
    assert (h80["BLOCK_M"], h80["BLOCK_N"]) == (128, 32)


def _prefill_flash(name: str, file: str = "attention_variants.opf",
                   sizes=dict(B=1, H=32, G=8, R=4, S=4096, T=4096, E=128)):
    from opforge.runtime.module import compile_module
    from opforge.runtime.sizes import size_bindings
    op = compile_module(EXAMPLES / file, ops=[name]).ops[name]
    v = variant(op, size_bindings(op.graph, sizes))
    vb = size_bindings(v.graph, sizes)
    (fk,) = [k for k in launched_kernels(v.plan, vb) if "_flash_attention" in k.name]
    return fk, vb


def test_hopper_flash_tiles_by_score_elements_per_thread():
    """On sm_90a a flash kernel is pruned by its score and accumulator elements per thread (96
    over loaded scores, 80 over computed ones), not by the register estimate, which is 1.4-1.9x
    high for computed scores: at prefill ALiBi and soft-capping keep wgmma-shaped tiles (before,
    only 16-row tiles were left to time), and 128 x 64 only where the scores are loaded."""
    from opforge.runtime.autotune import Limits, fits, tuning_candidates
    hopper = Limits.of_target(TARGETS["sm_90a"])
    wide = Config((("BLOCK_M", 128), ("BLOCK_N", 64), ("BLOCK_E", 128), ("BLOCK_EV", 128)), 8, 3)
    for name in ("alibi", "softcap_gqa"):
        fk, vb = _prefill_flash(name)
        assert fk.family == "flash_mod"
        ok, why = fits(fk, wide, vb, hopper)
        assert not ok and "96 score and accumulator elements per thread > 80" in why
        tiles = {(c.as_dict()["BLOCK_M"], c.as_dict()["BLOCK_N"], c.num_warps) for c in tuning_candidates(fk, vb, hopper)}
        assert tiles == {(128, 32, 8), (64, 32, 4)}
    plain, vb = _prefill_flash("attention", "llama.opf", dict(B=1, S=2048, D=4096, H=32, E=128, F=11008))
    assert plain.family == "flash" and fits(plain, wide, vb, hopper)[0]
