"""opforge ops under torch.distributed on the CPU: gloo, spawned ranks, kernels through the
interpreter (issue 16). Each world runs all its cases in one spawn (tests/distributed_cases.py);
every rank's records are checked here: the value against the same computation in one process
(f32 tolerance of runtime/tolerances.py) and the placements DTensor reports, stated below.
Where a case says so, the same math in torch's own ops on the same DTensors (DTensor's own
sharding propagation) must give the same values ("torch y", "torch dx", ...); its placements
agree with ours except in the row-parallel backward, where torch's leave dx and dW
``Partial(sum)`` and opforge's rules give them ``Shard(1)``, the weight's own placement (recorded
in the records, not asserted: they are DTensor's choice and may change between torch versions).
"""
from __future__ import annotations

import json
import time

import pytest
import torch

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch built without gloo", allow_module_level=True)

from opforge.tests import distributed_cases as cases  # noqa: E402

DEADLINE_S = 300     # a world's whole spawn; a hang fails the tests instead of the CI run


def _spawn(key: int, tmp_path_factory) -> list[dict]:
    import torch.multiprocessing as mp
    workdir = tmp_path_factory.mktemp(f"dist{key}")
    ctx = mp.start_processes(cases.run, args=(key, str(workdir)), nprocs=abs(key), join=False,
                             start_method="spawn")
    end = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=max(1.0, end - time.monotonic())):
        if time.monotonic() > end:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {abs(key)}-rank run took over {DEADLINE_S} s")
    return [json.loads((workdir / f"rank{r}.json").read_text()) for r in range(abs(key))]


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return _spawn(2, tmp_path_factory)


@pytest.fixture(scope="module")
def mesh2x2(tmp_path_factory):
    return _spawn(4, tmp_path_factory)


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return _spawn(-4, tmp_path_factory)


def check(ranks: list[dict], case: str, placements: dict[str, list[str]]) -> None:
    """Every rank's record of ``case``: no error, each value within tolerance, the placements
    as stated (a check not named in ``placements`` still has to be within tolerance)."""
    for rank, records in enumerate(ranks):
        rec = records[case]
        assert "error" not in rec, f"rank {rank}: {case} raised:\n{rec['error']['message']}"
        for name, want in placements.items():
            assert name in rec, f"rank {rank}: {case} has no check {name!r}"
            assert rec[name]["placements"] == want, f"rank {rank}: {case} {name}: {rec[name]['placements']} != {want}"
        for name, r in rec.items():
            assert r["ok"], f"rank {rank}: {case} {name}: {r.get('message')}"


# -- world 2, 1-D mesh ---------------------------------------------------------------------------
def test_data_parallel(world2):
    # the batch survives; the weight gradient is a partial sum over ranks (as for torch's own ops)
    check(world2, "dp_rms_norm", {"y": ["S(0)"], "dx": ["S(0)"], "dw": ["P(sum)"]})


def test_sequence_parallel_norm(world2):
    check(world2, "sp_rms_norm", {"y": ["S(1)"], "dx": ["S(1)"], "dw": ["P(sum)"]})


def test_an_axis_the_op_needs_whole_is_gathered(world2):
    check(world2, "whole_axis_redistributes", {"y": ["R"]})


def test_column_parallel_linear(world2):
    check(world2, "tp_column_linear", {"y": ["S(1)"], "dx": ["P(sum)"], "dw": ["S(0)"]})


def test_row_parallel_linear(world2):
    check(world2, "tp_row_linear", {"y": ["P(sum)"], "dx": ["S(1)"], "dw": ["S(1)"]})


def test_tensor_parallel_mlp(world2):
    check(world2, "tp_swiglu_mlp", {"y": ["P(sum)"], "dx": ["P(sum)"], "dwg": ["S(0)"], "dwu": ["S(0)"],
                                    "dwd": ["S(1)"]})


def test_attention_split_over_heads(world2):
    check(world2, "tp_attention_heads", {"y": ["S(1)"], "dq": ["S(1)"], "dk": ["S(1)"], "dv": ["S(1)"]})


def test_sequence_parallel_block(world2):
    check(world2, "sequence_parallel_block", {"norm": ["S(1)"], "mlp": ["P(sum)"], "y": ["S(1)"]})


def test_fsdp2_training(world2):
    check(world2, "fsdp2_training", {"placements": ["S(0)"]})


def test_torch_compile_of_dtensor_calls(world2):
    check(world2, "compiled_dtensor", {"y": ["S(0)"]})


def test_autotuning_is_shared_across_ranks(world2):
    check(world2, "autotune_agreement", {})


def test_bound_layers_split_across_ranks(world2):
    check(world2, "bound_layers_sharded", {
        "int4 column": ["S(1)"], "int4 row": ["P(sum)"], "int8 column with bias": ["S(1)"], "fp8 row": ["P(sum)"],
        "2:4 row": ["P(sum)"], "block column": ["S(1)"], "low rank row": ["P(sum)"],
        "int4 row, input split along K": ["P(sum)"]})
    for rank in world2:
        rec = rank["bound_layers_sharded"]
        assert "multiple of 64 (its groups of 64 along K)" in rec["int4 misaligned"]["message"]
        assert "groups are those one process packs" in rec["int4 misaligned"]["message"]
        assert "multiple of 4 (its groups of four along K)" in rec["2:4 misaligned"]["message"]
        assert "not linear in a partial sum over K" in rec["row with a bias"]["message"]


def test_fsdp2_with_a_bound_layer(world2):
    check(world2, "fsdp2_with_bound_layer", {"norm": ["S(0)"]})


# -- world 4 ---------------------------------------------------------------------------------------
def test_2d_mesh_data_and_tensor_parallel(mesh2x2):
    check(mesh2x2, "mesh2d_dp_tp", {"y": ["S(0)", "P(sum)"], "dx": ["S(0)", "P(sum)"],
                                    "dwg": ["P(sum)", "S(0)"], "dwu": ["P(sum)", "S(0)"], "dwd": ["P(sum)", "S(1)"]})


def test_autotuning_is_shared_across_four_ranks(mesh2x2):
    check(mesh2x2, "autotune_agreement", {})


def test_world4_uneven_shards(world4):
    # 5 rows over 4 ranks is 2, 2, 1, 0 (one rank runs the op on an empty shard)
    check(world4, "dp_rms_norm", {"y": ["S(0)"], "dx": ["S(0)"], "dw": ["P(sum)"]})
    # 3 rows over 4 ranks: DTensor does not split a dimension smaller than the mesh; it replicates
    check(world4, "uneven_batch", {"y": ["R"]})


def test_world4_fsdp2_training(world4):
    check(world4, "fsdp2_training", {"placements": ["S(0)"]})


def test_rules_register_after_dtensor_is_imported(tmp_path):
    """An op compiled before torch.distributed.tensor is imported gets its rule when it is (the
    import hook), so torch.ops.<ns>.<op> works with DTensors (a fresh process: this one has
    already imported DTensor)."""
    import subprocess
    import sys
    code = f"""
import sys, torch, opforge
mod = opforge.compile("op f(x: f32[M, K]) -> f32[M, K] {{ return softmax(x, axis=-1) }}", namespace="hooked")
assert "torch.distributed.tensor" not in sys.modules
import torch.distributed as dist
dist.init_process_group("gloo", init_method="file://{tmp_path}/store", rank=0, world_size=1)
from torch.distributed.tensor import Shard, Replicate, distribute_tensor
from torch.distributed.device_mesh import init_device_mesh
mesh = init_device_mesh("cpu", (1,))
x = torch.randn(3, 5)
y = torch.ops.hooked.f(distribute_tensor(x, mesh, [Shard(0)]))
assert y.placements == (Shard(0),), y.placements
z = torch.ops.hooked.f(distribute_tensor(x, mesh, [Shard(1)]))     # softmax needs K whole
assert z.placements == (Replicate(),), z.placements
torch.testing.assert_close(y.full_tensor(), torch.softmax(x, -1))
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
