"""Every op of every example spec (examples/*.opf) through the compiled kernels, against the
float64 reference: at the file's ``# shapes:`` sizes, at an awkward set (odd sizes, derived
sizes such as D / E kept whole) and at the smallest sizes the spec allows, in the file's dtypes
and retyped to f32 and to bf16 (``--dtype bf16``: under the interpreter with opforge's bf16
corrections, runtime/interpreter_patches.py, within the bf16 tolerance); plus
``torch.library.opcheck`` of every registered op.

Ops with a layout annotation (@quant, @sparse, @lowrank, @auto) are called here with the dense
weight, which runs the dense mathematics (with a one-time warning that suggests bind()); their
packed forms are the layout tests' business.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import opforge
from opforge.frontend import load_program
from opforge.runtime.inputs import random_inputs
from opforge.runtime.sizes import file_shapes
from opforge.runtime.tolerances import graph_dtypes

from opforge.runtime.sizes import size_bindings

from .kernel_helpers import call_args, compile_spec, compiled, run_case

EXAMPLES = Path(opforge.__file__).resolve().parent / "examples"
FILES = sorted(EXAMPLES.glob("*.opf"))

# A second set of sizes per file: awkward, but valid for every op of the file.
AWKWARD = {
    # E even (x[..., :E/2]), D = H * E and a multiple of split_heads' default 4 heads, S odd, F odd
    "llama": dict(B=1, S=7, D=24, H=4, E=6, F=33),
    "lora": dict(M=7, K=33, N=5, R=3),
    "moe": dict(T=7, D=33, F=5, E=3),
    "quant_linear": dict(M=1, K=33, N=7),
    "sparse_linear": dict(M=1, K=33, N=7),
    "attention_variants": dict(B=1, H=3, G=1, R=3, S=7, T=9, E=5),
    **{stem: dict(S=13, B=1, H=3, E=5, F=7, D=3, N=5, I=9) for stem in ("gla", "mamba", "retnet", "gru")},
}
# and a third with every size as small as the spec allows (1, or 2 where it must be even)
TINY = {
    "llama": dict(B=2, S=1, D=2, H=1, E=2, F=1, heads=1),
    "lora": dict(M=1, K=1, N=1, R=1),
    "moe": dict(T=1, D=1, F=1, E=2),
    "quant_linear": dict(M=1, K=1, N=1),
    "sparse_linear": dict(M=1, K=1, N=1),
    "attention_variants": dict(B=1, H=1, G=1, R=1, S=1, T=1, E=1),
    **{stem: dict(S=1, B=1, H=1, E=1, F=1, D=1, N=1, I=1) for stem in ("gla", "mamba", "retnet", "gru")},
}


def _ops():
    every, layout = [], []
    for f in FILES:
        prog = load_program(f)
        for name in prog.op_names:        # a dtype-generic op once (its binding of the test's dtype)
            g = prog[prog.graph_of(name)]
            every.append((f.stem, name))
            if any(p.layout is not None for p in g.params):
                layout.append((f.stem, name))
    return every, layout


ALL, LAYOUT = _ops()
IDS = [pytest.param(*x, id=f"{x[0]}-{x[1]}") for x in ALL]


def _op(stem: str, name: str, dtype: str | None = None):
    options = {"ops": [name]}
    if dtype:
        options["dtype"] = dtype
    op = getattr(compiled(str(EXAMPLES / f"{stem}.opf"), f"ex_{stem}", **options), name)
    op._warned = True   # the dense-call warning of layout ops has its own test below
    return op


def _sizes(op, sizes: dict) -> dict:
    return size_bindings(op.graph, sizes)


def test_every_example_op_is_covered():
    assert len(FILES) >= 5
    assert len(ALL) >= 20 and len(LAYOUT) >= 9
    assert set(AWKWARD) == set(TINY) == {f.stem for f in FILES}


@pytest.mark.parametrize("stem, name", IDS)
def test_example_at_file_shapes(stem, name):
    op = _op(stem, name)
    run_case(op, _sizes(op, file_shapes(EXAMPLES / f"{stem}.opf")), seed=0, what=" (file shapes)")


@pytest.mark.parametrize("which", ["awkward", "tiny"])
@pytest.mark.parametrize("stem, name", IDS)
def test_example_at_awkward_shapes(stem, name, which):
    op = _op(stem, name)
    sizes = AWKWARD[stem] if which == "awkward" else TINY[stem]
    run_case(op, _sizes(op, sizes), seed=1, what=f" ({which} shapes)")


@pytest.mark.parametrize("stem, name", IDS)
def test_example_retyped_to_f32(stem, name):
    op = _op(stem, name, dtype="f32")
    assert all(not t.dtype.is_float or str(t.dtype) == "f32" for t in op.graph.result_types)
    run_case(op, _sizes(op, AWKWARD[stem]), seed=2, what=" (f32)")


@pytest.mark.parametrize("which", ["file", "awkward"])
@pytest.mark.parametrize("stem, name", IDS)
def test_example_retyped_to_bf16(stem, name, which):
    op = _op(stem, name, dtype="bf16")
    dtypes = {str(d) for d in graph_dtypes(op.graph)}
    assert "bf16" in dtypes and "f16" not in dtypes, dtypes      # the spec's f32 stays f32
    sizes = file_shapes(EXAMPLES / f"{stem}.opf") if which == "file" else AWKWARD[stem]
    run_case(op, _sizes(op, sizes), seed=4, what=f" (bf16, {which} shapes)")


@pytest.mark.parametrize("stem, name", IDS)
def test_example_opcheck(stem, name):
    op = _op(stem, name)
    b = _sizes(op, file_shapes(EXAMPLES / f"{stem}.opf"))
    args = tuple(call_args(op.graph, random_inputs(op.graph, b, seed=3)))
    result = torch.library.opcheck(op.torch_op, args)
    assert result == {"test_schema": "SUCCESS", "test_autograd_registration": "SUCCESS",
                      "test_faketensor": "SUCCESS", "test_aot_dispatch_dynamic": "SUCCESS"}, result


@pytest.mark.parametrize("stem, name", [pytest.param(*x, id=f"{x[0]}-{x[1]}") for x in LAYOUT])
def test_layout_op_called_with_a_dense_weight_runs_dense_and_warns_once(stem, name):
    path = EXAMPLES / f"{stem}.opf"
    op = getattr(compile_spec(path.read_text(), f"dense_{stem}", ops=[name]), name)
    b = _sizes(op, AWKWARD[stem])
    layout_params = [p.name for p in op.graph.params if p.layout is not None]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_case(op, b, seed=5, what=" (dense weight)")
        run_case(op, b, seed=6, what=" (dense weight, again)")
    msgs = [str(w.message) for w in caught if "runs dense" in str(w.message)]
    assert len(msgs) == 1, [str(w.message) for w in caught]
    assert msgs[0].startswith(f"{name}: ") and f".bind({layout_params[0]}=..." in msgs[0]
