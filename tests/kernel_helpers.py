"""Shared machinery of the kernel tests (issue 3): compiling specs in unique namespaces,
differential runs of compiled ops against the float64 reference executor, and the test
environment (poisoned outputs, a per-session kernel cache).

Importing this module sets the environment, so a test file that imports it (and conftest.py,
which does so first) gets:
- ``OPFORGE_POISON=1``: outputs and intermediates start as NaN (or sentinels for integers and
  bools), so an element that no kernel writes fails the comparison;
- ``OPFORGE_CACHE_DIR``: a fresh temporary directory for this test session, shared by the
  xdist workers (they inherit the controller's environment) and removed at exit;
- ``OPFORGE_PLAN_CACHE=0``: every compile runs the whole pipeline (stored plans would bypass
  the passes tests patch); tests/test_plan_cache.py turns them on.

Every comparison goes through ``runtime/tolerances.py`` (``tolerance_for`` of the op's graph):
no tolerance is chosen here.
"""
from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import re
import shutil
import tempfile

_OWNER = "OPFORGE_TEST_CACHE_OWNER"


def setup_test_environment() -> None:
    """Idempotent; must run before opforge compiles anything (the cache directory is read when
    a KernelCache is made, the poison flag at every allocation)."""
    os.environ["OPFORGE_POISON"] = "1"
    # stored plans would bypass the passes that tests patch; tests/test_plan_cache.py turns them on
    os.environ.setdefault("OPFORGE_PLAN_CACHE", "0")
    if not os.environ.get(_OWNER) or not os.environ.get("OPFORGE_CACHE_DIR"):
        d = tempfile.mkdtemp(prefix="opforge-test-cache-")
        os.environ["OPFORGE_CACHE_DIR"] = d
        os.environ[_OWNER] = str(os.getpid())
        atexit.register(shutil.rmtree, d, True)


setup_test_environment()

import torch  # noqa: E402

import opforge  # noqa: E402
from opforge.ir.torch_dtypes import to_torch  # noqa: E402
from opforge.runtime import executor  # noqa: E402
from opforge.runtime.inputs import random_inputs  # noqa: E402
from opforge.runtime.reference import run_graph  # noqa: E402
from opforge.runtime.tolerances import assert_close, tolerance_for  # noqa: E402

_counter = itertools.count()


def unique_namespace(tag: str = "t") -> str:
    """A torch.library namespace no other compile in this process uses."""
    clean = re.sub(r"\W", "_", tag).strip("_")[:40] or "t"
    return f"t_{clean}_{os.getpid()}_{next(_counter)}"


def typed(template: str, dtype: str) -> str:
    """Spec templates write the working float dtype as ``$T``."""
    return template.replace("$T", dtype)


def compile_spec(src: str, tag: str = "t", **options):
    return opforge.compile(src, namespace=unique_namespace(tag), **options)


_MODULES: dict = {}


def compiled(src: str, tag: str = "t", **options):
    """compile_spec, memoised per (source, options) for this process: tests that run one spec
    at several sizes share its compiled module."""
    key = (src, repr(sorted(options.items())))
    if key not in _MODULES:
        _MODULES[key] = compile_spec(src, tag, **options)
    return _MODULES[key]


def as_list(res) -> list:
    return list(res) if isinstance(res, (tuple, list)) else [res]


def call_args(g, ins) -> list:
    return [ins[p.name] for p in g.params]


@contextlib.contextmanager
def inverted_poison():
    """Poison with the other sentinels: bools start False, integers 0, floats +inf. Together
    with the default poison (True, -1234567, NaN), a bool output element no kernel writes fails
    one of the two runs whatever its reference value is."""
    orig = executor.allocate

    def allocate(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        if dtype.is_floating_point:
            t.fill_(float("inf"))
        elif dtype == torch.bool:
            t.fill_(False)
        else:
            t.fill_(0)
        return t

    executor.allocate = allocate
    try:
        yield
    finally:
        executor.allocate = orig


def check_outputs(g, outs, refs, what: str = "") -> None:
    """Every output: its dtype and shape as the spec says, every element within the op's
    tolerance of the float64 reference (integers and bools exactly)."""
    outs = as_list(outs)
    assert len(outs) == len(refs) == len(g.result_types), (len(outs), len(refs))
    tol = tolerance_for(g)
    for i, (o, r, t) in enumerate(zip(outs, refs, g.result_types)):
        assert o.dtype == to_torch(t.dtype), f"{what} output {i}: dtype {o.dtype}, the spec says {t.dtype}"
        assert tuple(o.shape) == tuple(r.shape), f"{what} output {i}: shape {tuple(o.shape)} vs {tuple(r.shape)}"
        assert_close(o, r, tol, f"{g.name}{what} output {i}")


def run_case(op, bindings: dict, *, seed: int = 0, inputs: dict | None = None, prepare=None,
             what: str = "") -> tuple[list, list]:
    """Run a compiled op on seeded random inputs (optionally transformed by ``prepare(ins)``)
    and compare every output with the float64 reference. Bool outputs are checked under both
    poisons. Returns (outputs, references)."""
    g = op.graph
    ins = dict(inputs) if inputs is not None else random_inputs(g, bindings, seed=seed)
    if prepare is not None:
        ins = prepare(ins)
    args = call_args(g, ins)
    refs = run_graph(g, ins, bindings, check=True)
    label = f"{what} at {bindings}"
    outs = as_list(op(*args))
    check_outputs(g, outs, refs, label)
    if any(to_torch(t.dtype) == torch.bool or not to_torch(t.dtype).is_floating_point
           for t in g.result_types):
        with inverted_poison():
            check_outputs(g, as_list(op(*args)), refs, label + " (inverted poison)")
    return outs, refs


@contextlib.contextmanager
def on_launch(op, fn):
    """Within the block, ``fn(call)`` runs before each kernel launch of the CompiledOp ``op``."""
    real = op.runner.launcher

    def launcher(kc, args):
        fn(kc)
        real(kc, args)
    op.runner.launcher = launcher
    try:
        yield
    finally:
        op.runner.launcher = real
