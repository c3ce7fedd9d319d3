"""Training (issue 12): a small Llama-style model built from examples/llama.opf's ops
(examples/train_llama.py: an embedding, one bound ``llama_block``, the bound final ``rms_norm``,
a linear head) trains with AdamW on synthetic next-token data, through the CPU interpreter, and
its loss curve matches the same model in plain PyTorch step by step, as do its parameters after
training, within ``gradient_tolerance_for`` the block (runtime/tolerances.py, f32).
"""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from .conftest import EXAMPLES
from .kernel_helpers import unique_namespace

STEPS = 15


def example():
    name = "opforge_example_train_llama"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / "train_llama.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module      # the dataclasses of the module look themselves up here
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def run():
    T = example()
    cfg = T.Config(layers=1)
    return T.run(cfg, STEPS, seed=0, mod=T.compile_ops(unique_namespace("train_llama")))


def test_the_model_is_built_from_bound_opforge_ops(run):
    from opforge.runtime.bound import BoundOp
    blocks = list(run.ours.blocks)
    assert len(blocks) == 1 and all(isinstance(b, BoundOp) for b in blocks + [run.ours.norm])
    names = {n for n, _ in run.ours.named_parameters()}
    T = example()
    assert {f"blocks.0.{w}" for w in T.BLOCK_WEIGHTS} | {"norm.w", "emb", "head"} == names
    assert all(p.grad is not None for p in run.ours.parameters()), "every parameter got a gradient"


def test_the_loss_decreases(run):
    assert len(run.losses_ours) == STEPS
    before, after = run.eval_before[0], run.eval_after[0]
    assert after < before - 0.3, (before, after)
    first, last = run.losses_ours[:3], run.losses_ours[-3:]
    assert sum(last) < sum(first), run.losses_ours


def test_the_loss_curve_matches_plain_pytorch_step_by_step(run):
    c = run.comparison()
    assert c.ok, f"loss curves: {c.message}\nopforge {run.losses_ours}\npytorch {run.losses_plain}"
    tol = run.tolerance
    for step, (a, b) in enumerate(zip(run.losses_ours, run.losses_plain)):
        assert abs(a - b) <= tol.rtol * abs(b) + tol.atol, (step, a, b)
    for ours, plain in (run.eval_before, run.eval_after):
        assert abs(ours - plain) <= tol.rtol * abs(plain) + tol.atol, (ours, plain)


def test_the_parameters_after_training_match_plain_pytorch(run):
    bad = {name: c.message for name, c in run.parameter_comparisons().items() if not c.ok}
    assert not bad, bad
    # and training moved them (the comparison is of trained weights, not the initial ones)
    start = example().initial_weights(run.cfg, 0)
    assert not torch.allclose(run.ours.blocks[0].wo.detach(), start["0.wo"])
    assert not torch.allclose(run.ours.norm.w.detach(), start["norm"])
