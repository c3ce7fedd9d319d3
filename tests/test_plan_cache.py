"""Stored plans (runtime/plan_cache.py): a warm opforge.compile loads every op's graph, fusion
groups and level-2 plan instead of running the pipeline, and its ops compute what a cold
compile's do; the key changes with what the plans depend on; damaged files are compiled again.
The time of a warm compile is a benchmark figure (README), not asserted here."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import opforge
from opforge.runtime import plan_cache
from opforge.runtime.sizes import parse_shapes

from .conftest import EXAMPLE_FILES
from .kernel_helpers import run_case, unique_namespace


@pytest.fixture
def plans_on(monkeypatch, tmp_path):
    monkeypatch.setenv("OPFORGE_PLAN_CACHE", "1")
    return tmp_path


def _stored(root):
    return sorted((root / plan_cache.DIRECTORY).glob("*.pkl"))


def test_warm_compile_loads_the_plans_and_matches_the_reference(plans_on, monkeypatch):
    """Every example, compiled cold (plans stored) then warm with the pipeline made to fail: the
    warm ops run from the stored plans and match the float64 reference at the file's sizes."""
    spaces = {f: unique_namespace(f.stem) for f in EXAMPLE_FILES}
    bindings = 0
    for f, ns in spaces.items():
        mod = opforge.compile(f, namespace=ns, cache_dir=plans_on)
        for op in mod.ops.values():        # a dtype-generic op's bindings: stored at first use
            for b in getattr(op, "_compiled", None) is not None and op.bindings or ():
                op.instance(*b)
                bindings += 1
    assert bindings >= 3
    assert len(_stored(plans_on)) == len(EXAMPLE_FILES) + bindings

    import opforge.passes.plan as plan

    def no_pipeline(*a, **k):
        raise AssertionError("a warm compile ran the pipeline")
    monkeypatch.setattr(plan, "fuse_and_plan", no_pipeline)
    checked = 0
    for f, ns in spaces.items():
        mod = opforge.compile(f, namespace=ns, cache_dir=plans_on)
        sizes = parse_shapes(f.read_text().split("# shapes:")[1].splitlines()[0])
        for name, op in mod.ops.items():
            if any(p.layout is not None for p in op.graph.params):
                continue      # layout ops run dense unbound (and warn); bound ones are below
            run_case(op, {s: sizes[s] for s in op.graph.symbols}, seed=3, what=f" warm {name}")
            checked += 1
    assert checked >= 15


SPEC = "op f(x: f32[M, K]) -> f32[M, K] { return softmax(x, axis=-1) * 2.0 }"


def test_the_key_changes_with_text_dtype_ops_and_namespace(plans_on):
    base = plan_cache.key(SPEC, "<string>", "a", None, None)
    assert base == plan_cache.key(SPEC, "<string>", "a", None, None)
    others = [plan_cache.key(SPEC + " ", "<string>", "a", None, None),
              plan_cache.key(SPEC, "other.opf", "a", None, None),
              plan_cache.key(SPEC, "<string>", "b", None, None),
              plan_cache.key(SPEC, "<string>", "a", "f16", None),
              plan_cache.key(SPEC, "<string>", "a", None, ["f"])]
    assert len(set(others + [base])) == len(others) + 1


def test_opforge_code_is_part_of_the_key(tmp_path):
    """Touching one of opforge's own source files changes the key (a fresh process: the digest
    is computed once per process)."""
    code = "from opforge.runtime import plan_cache; print(plan_cache.code_digest())"
    before = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    target = plan_cache.__file__
    st = os.stat(target)
    try:
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        after = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    finally:
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert before.strip() and before != after


@pytest.mark.parametrize("damage", [b"", b"not a pickle", b"\x80\x05garbage"])
def test_a_damaged_plan_is_compiled_again_and_replaced(plans_on, damage):
    ns = unique_namespace("damaged")
    opforge.compile(SPEC, namespace=ns, cache_dir=plans_on)
    (path,) = _stored(plans_on)
    path.write_bytes(damage)
    mod = opforge.compile(SPEC, namespace=ns, cache_dir=plans_on)
    run_case(mod.f, {"M": 5, "K": 37}, seed=1)
    assert path.read_bytes() != damage
    assert plan_cache.load(plans_on, path.stem) is not None


def test_a_plan_stored_under_another_key_is_not_used(plans_on):
    ns = unique_namespace("moved")
    opforge.compile(SPEC, namespace=ns, cache_dir=plans_on)
    (path,) = _stored(plans_on)
    other = path.with_name("0" * 64 + ".pkl")
    other.write_bytes(path.read_bytes())
    assert plan_cache.load(plans_on, other.stem) is None


def test_an_unwritable_plan_directory_only_loses_the_saving(plans_on):
    (plans_on / plan_cache.DIRECTORY).write_text("a file where the directory goes")
    for _ in range(2):
        mod = opforge.compile(SPEC, namespace=unique_namespace("blocked"), cache_dir=plans_on)
        run_case(mod.f, {"M": 3, "K": 9}, seed=2)
    assert (plans_on / plan_cache.DIRECTORY).is_file()


def test_off_by_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("OPFORGE_PLAN_CACHE", "0")
    opforge.compile(SPEC, namespace=unique_namespace("off"), cache_dir=tmp_path)
    assert _stored(tmp_path) == []


def test_gradients_and_bound_layers_from_stored_plans(plans_on):
    """Derived ops (backward) and packed variants compile through the pipeline from a warm
    module as from a cold one."""
    import torch
    src = "op lin(x: f32[M, K], w: f32[N, K] @quant(int8)) -> f32[M, N] { return x @ w.T }\n" \
          "op sq(x: f32[M, K]) -> f32[M, K] { return x * x }"
    ns = unique_namespace("derived")
    opforge.compile(src, namespace=ns, cache_dir=plans_on)
    mod = opforge.compile(src, namespace=ns, cache_dir=plans_on)
    x = torch.randn(4, 6, requires_grad=True)
    mod.sq(x).sum().backward()
    torch.testing.assert_close(x.grad, 2 * x.detach())
    w = torch.randn(5, 6)
    layer = mod.lin.bind(w=w)
    torch.testing.assert_close(layer(x.detach()), x.detach() @ w.T, rtol=2e-2, atol=2e-2)


def test_a_warm_compile_unpickles_an_op_plan_at_its_first_use(tmp_path):
    """A warm compile (in a new process) registers every op from its graph alone: the tile IR
    and the runner are not imported and no plan is unpickled until an op is used; then that
    op's plan alone loads (rms_norm is dtype-generic: its f16 binding's, stored when the cold
    process first called it), and it computes what the cold compile's op did."""
    common = f"""
import sys, torch
import opforge
mod = opforge.compile("examples/llama.opf", cache_dir={str(tmp_path)!r})
torch.manual_seed(0)
x = torch.randn(2, 5, 64, dtype=torch.float16); w = torch.randn(64, dtype=torch.float16)
"""
    cold = common + f"torch.save(mod.rms_norm(x, w), {str(tmp_path / 'want.pt')!r})\n"
    warm = common + f"""
print(sorted(m for m in sys.modules if m in ("opforge.ir.tile", "opforge.runtime.executor")))
def loaded(op):         # a dtype-generic op (rms_norm): a binding made and its plan loaded
    made = getattr(op, "_compiled", None)
    return op._deferred is None if made is None else any(b._deferred is None for b in made.values())
print(sorted(n for n, op in mod.ops.items() if loaded(op)))
torch.testing.assert_close(mod.rms_norm(x, w), torch.load({str(tmp_path / 'want.pt')!r}), rtol=0, atol=0)
print(sorted(n for n, op in mod.ops.items() if loaded(op)))
"""
    env = {**os.environ, "OPFORGE_PLAN_CACHE": "1"}
    for code in (cold, warm):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                             cwd=EXAMPLE_FILES[0].parent.parent)
        assert out.returncode == 0, out.stderr[-3000:]
    imported, before, after = out.stdout.strip().splitlines()[-3:]
    assert imported == "[]"
    assert before == "[]"
    assert after == "['rms_norm']"
