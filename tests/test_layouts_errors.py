"""Impossible layout requests are clear errors (issue 5).

- At spec time, when the sizes that decide it are literal: a SpecError at the annotation (or its
  argument), FILE:LINE:COL with a caret, from frontend/layouts.py.
- At bind time, when they are symbolic: a CallError naming the weight, its shape and the layout.
- A weight whose layout changes the contraction (block-sparse, low rank, W8A8) used other than
  as ``x @ w.T``: a SpecError at the offending use.
- Binding a weight of the wrong dtype, rank or shape, or a name the op does not have: CallError.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import opforge
from opforge.frontend.diagnostics import SpecError
from opforge.runtime.binding import CallError

from .kernel_helpers import compiled, unique_namespace

F16 = torch.float16


def compile_fresh(src: str):
    return opforge.compile(src, namespace=unique_namespace("layout_err"))


# -- spec time -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpecCase:
    id: str
    k: str
    n: str
    annotation: str
    message: str          # a substring of err.message
    under: str            # the text the caret starts at (the annotation or its argument)
    hint: str | None = None


SPEC_CASES = [
    SpecCase("group-does-not-divide-k", "96", "N", "@quant(int4, group=64)",
             "@quant(int4, group=64) needs K = 96 to be a multiple of the group", "@quant", "choose a group that divides 96"),
    SpecCase("default-group-does-not-divide-k", "64", "N", "@quant(int4)",
             "needs K = 64 to be a multiple of the group", "@quant"),
    SpecCase("int4-odd-k", "63", "N", "@quant(int4, group=1)",
             "@quant(int4) packs two values per byte along K, but K = 63 is odd", "@quant", "pad the weight to an even K"),
    SpecCase("24-k-not-multiple-of-4", "30", "N", "@sparse(2:4)",
             "@sparse(2:4) needs K to be a multiple of 4, but K = 30", "@sparse"),
    SpecCase("lowrank-rank-above-k", "16", "N", "@lowrank(rank=20)",
             "@lowrank(rank=20) is above min(N, K) = 16", "rank=20"),
    SpecCase("lowrank-rank-above-n", "K", "12", "@lowrank(rank=13)",
             "@lowrank(rank=13) is above min(N, K) = 12", "rank=13"),
    SpecCase("lowrank-rank-above-both", "10", "12", "@lowrank(rank=11)",
             "@lowrank(rank=11) is above min(N, K) = 10", "rank=11"),
    SpecCase("act-of-another-type", "K", "N", "@quant(fp8, act=int8)",
             "@quant(fp8, act=int8) is not supported", "act=int8", "@quant(fp8, act=fp8)"),
    SpecCase("act-on-int4", "K", "N", "@quant(int4, group=32, act=int8)",
             "@quant(int4, act=int8) is not supported", "act=int8", "@quant(int8, act=int8)"),
]


def spec_source(case: SpecCase) -> str:
    return (f"# a layout that cannot be\n"
            f"op f(x: f16[M, {case.k}],\n"
            f"     w: f16[{case.n}, {case.k}] {case.annotation}) -> f16[M, {case.n}] {{\n"
            f"    return x @ w.T\n}}\n")


@pytest.mark.parametrize("case", SPEC_CASES, ids=[c.id for c in SPEC_CASES])
def test_impossible_layouts_with_literal_sizes_are_spec_errors(case):
    src = spec_source(case)
    with pytest.raises(SpecError) as info:
        compile_fresh(src)
    err = info.value
    assert case.message in err.message, err.message
    line = src.split("\n")[2]
    assert err.line == 3
    assert err.col == line.index(case.under) + 1, (err.col, line)
    if case.hint:
        assert case.hint in (err.hint or ""), err.hint
    report = str(err).split("\n")
    assert report[0].startswith(f"{err.file}:3:{err.col}: error: ")
    assert report[1] == line
    assert report[2].startswith(" " * (err.col - 1) + "^")


def test_the_same_layouts_with_fitting_literal_sizes_compile():
    for k, n, annotation in [("96", "N", "@quant(int4, group=32)"), ("128", "N", "@quant(int4)"), ("32", "N", "@sparse(2:4)"),
                             ("16", "N", "@lowrank(rank=16)"), ("K", "12", "@lowrank(rank=12)"),
                             ("63", "N", "@quant(int8)"), ("63", "N", "@sparse(block=16)")]:
        compile_fresh(spec_source(SpecCase("ok", k, n, annotation, "", "")))


def check_file(tmp_path, text):
    from click.testing import CliRunner

    from opforge.cli import main
    path = tmp_path / "layout.opf"
    path.write_text(text)
    return path, CliRunner().invoke(main, ["check", str(path)])


def test_spec_errors_of_layouts_reach_the_command_line(tmp_path):
    path, result = check_file(tmp_path, spec_source(SPEC_CASES[0]))
    assert result.exit_code == 1, result.output
    assert f"{path}:3:" in result.output and "needs K = 96 to be a multiple of the group" in result.output
    assert "Traceback" not in result.output


# -- bind time -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BindCase:
    id: str
    annotation: str
    shape: tuple
    message: str


BIND_CASES = [
    BindCase("group-does-not-divide-k", "@quant(int4, group=64)", (8, 96),
             "the group 64 does not divide K = 96"),
    BindCase("default-group-does-not-divide-k", "@quant(int4)", (8, 64),
             "the group 128 does not divide K = 64"),
    BindCase("int4-odd-k", "@quant(int4, group=1)", (8, 63),
             "int4 packs two values per byte along K, but K = 63 is odd"),
    BindCase("24-k-not-multiple-of-4", "@sparse(2:4)", (8, 30),
             "2:4 sparsity groups K by 4, but K = 30 is not a multiple of 4"),
    BindCase("lowrank-rank-above-n", "@lowrank(rank=9)", (8, 40), "rank 9 is above min(N, K) = 8"),
    BindCase("lowrank-rank-above-k", "@lowrank(rank=9)", (40, 8), "rank 9 is above min(N, K) = 8"),
]


@pytest.mark.parametrize("case", BIND_CASES, ids=[c.id for c in BIND_CASES])
def test_impossible_layouts_with_symbolic_sizes_are_call_errors_at_bind(case):
    mod = compiled(f"op f(x: f16[M, K], w: f16[N, K] {case.annotation}) -> f16[M, N] {{ return x @ w.T }}",
                   "layout_bind_err")
    with pytest.raises(CallError) as info:
        mod.f.bind(w=torch.randn(*case.shape, dtype=F16))
    msg = str(info.value)
    assert case.message in msg, msg
    canonical = str(mod.f.graph.params[1].layout)
    assert f"'w' [{case.shape[0]}, {case.shape[1]}] with {canonical}" in msg, msg


def test_bind_errors_name_the_weight_among_several():
    mod = compiled("op f(x: f16[M, K], up: f16[N, K] @quant(int8), down: f16[N, J] @quant(int4, group=32))"
                   " -> f16[M, N] { return x @ up.T }", "layout_bind_two")
    with pytest.raises(CallError, match=r"'down' \[8, 48\] with @quant\(int4, group=32\): the group 32 does not divide K = 48"):
        mod.f.bind(up=torch.randn(8, 64, dtype=F16), down=torch.randn(8, 48, dtype=F16))


def test_rank_above_the_kernels_limit_is_a_bind_error():
    mod = compiled("op f(x: f16[M, K], w: f16[N, K] @lowrank(rank=300)) -> f16[M, N] { return x @ w.T }",
                   "layout_rank_limit")
    with pytest.raises(CallError, match=r"'w' \[320, 320\] with @lowrank\(rank=300\): rank 300 is above 256"):
        mod.f.bind(w=torch.randn(320, 320, dtype=F16))


# -- weights whose layout changes the contraction ----------------------------------------------
CONTRACTION_LAYOUTS = ["@sparse(block=16)", "@lowrank(rank=4)", "@quant(int8, act=int8)", "@quant(fp8, act=fp8)"]
MISUSES = [
    ("elementwise", "f16[N, K]", "    return w * 2.0", "w * 2.0"),
    ("not-transposed", "f16[N, M]", "    return w @ x.T", "w @ x.T"),
    ("reduced", "f16[M, N]", "    y = x @ w.T\n    return y + sum(w, axis=1)", "sum(w, axis=1)"),
]


@pytest.mark.parametrize("annotation", CONTRACTION_LAYOUTS)
@pytest.mark.parametrize("use,result,body,under", MISUSES, ids=[m[0] for m in MISUSES])
def test_contraction_layouts_need_x_at_w_T(annotation, use, result, body, under):
    src = f"op f(x: f16[M, K], w: f16[N, K] {annotation}) -> {result} {{\n{body}\n}}\n"
    with pytest.raises(SpecError) as info:
        mod = compile_fresh(src)
        mod.f.bind(w=torch.randn(32, 32, dtype=F16))
    err = info.value
    assert f"'w' with {annotation} can only be used as x @ w.T" in err.message, err.message
    lines = src.split("\n")
    assert lines[err.line - 1].find(under) >= 0
    assert err.col == lines[err.line - 1].index(under) + 1, (err.line, err.col, under)
    assert str(err).startswith(f"{err.file}:{err.line}:{err.col}: error: ")


@pytest.mark.parametrize("annotation", CONTRACTION_LAYOUTS)
def test_a_misused_contraction_layout_is_found_without_binding(annotation, tmp_path):
    src = f"op f(x: f16[M, K], w: f16[N, K] {annotation}) -> f16[N, K] {{\n    return w * 2.0\n}}\n"
    path, result = check_file(tmp_path, src)
    assert result.exit_code == 1, result.output
    assert f"{path}:2:12: error: 'w' with {annotation} can only be used as x @ w.T" in result.output


@pytest.mark.parametrize("annotation", CONTRACTION_LAYOUTS)
def test_a_weight_in_two_matmuls_is_still_x_at_w_T(annotation):
    from opforge.runtime.reference import run_graph
    from opforge.runtime.tolerances import assert_close, tolerance_for
    src = (f"op f(x: f16[M, K], y: f16[M, K], w: f16[N, K] {annotation}) -> f16[M, N] {{\n"
           f"    return (x @ w.T) + (y @ w.T)\n}}\n")
    mod = compiled(src, "layout_two_uses")
    layer = mod.f.bind(w=torch.randn(37, 40, dtype=F16))
    x, y = torch.randn(5, 40, dtype=F16), torch.randn(5, 40, dtype=F16)
    ref = run_graph(mod.f.graph, {"x": x, "y": y, **layer.unpacked()}, {"M": 5, "K": 40, "N": 37}, check=True)[0]
    assert_close(layer(x, y), ref, tolerance_for(mod.f.graph))


# -- binding the wrong weight ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def q4():
    return compiled("op f(x: f16[M, K], w: f16[N, K] @quant(int4, group=32), b: f16[N]) -> f16[M, N] "
                    "{ return x @ w.T + b }", "layout_wrong_weight")


@pytest.mark.parametrize("w,expect", [
    (lambda: torch.randn(8, 64, dtype=torch.float32), r"'w' expects f16\[N, K\], got torch.float32 of shape \[8, 64\]"),
    (lambda: torch.randn(8, 64, dtype=torch.bfloat16), r"'w' expects f16\[N, K\], got torch.bfloat16"),
    (lambda: torch.randint(-8, 8, (8, 64), dtype=torch.int8), r"'w' expects f16\[N, K\], got torch.int8"),
    (lambda: torch.randn(8, 64, 2, dtype=F16), r"'w' expects f16\[N, K\], got torch.float16 of shape \[8, 64, 2\]"),
    (lambda: torch.randn(64, dtype=F16), r"'w' expects f16\[N, K\], got torch.float16 of shape \[64\]"),
    (lambda: [[1.0] * 64] * 8, r"'w' expects f16\[N, K\], got list"),
], ids=["f32", "bf16", "i8", "rank3", "rank1", "list"])
def test_binding_a_weight_of_the_wrong_kind_is_a_call_error(q4, w, expect):
    with pytest.raises(CallError, match=expect):
        q4.f.bind(w=w())


def test_binding_mismatched_sizes_is_a_call_error(q4):
    with pytest.raises(CallError, match=r"'b' has N = 9, another bound weight has N = 8"):
        q4.f.bind(w=torch.randn(8, 64, dtype=F16), b=torch.randn(9, dtype=F16))
    with pytest.raises(CallError, match=r"it has no parameter 'v'; its parameters are x, w, b"):
        q4.f.bind(v=torch.randn(8, 64, dtype=F16))
    with pytest.raises(CallError, match=r"'b' expects f16\[N\], got torch.float32"):
        q4.f.bind(w=torch.randn(8, 64, dtype=F16), b=torch.randn(8))


def test_binding_a_weight_against_a_literal_size_is_a_call_error():
    mod = compiled("op f(x: f16[M, 64], w: f16[N, 64] @quant(int8)) -> f16[M, N] { return x @ w.T }",
                   "layout_literal")
    with pytest.raises(CallError, match=r"'w' expects f16\[N, 64\], got torch.float16 of shape \[8, 40\]"):
        mod.f.bind(w=torch.randn(8, 40, dtype=F16))


@pytest.mark.parametrize("annotation", ["@quant(int4, group=32)", "@sparse(2:4)", "@lowrank(rank=48)"])
def test_a_wrong_shape_is_reported_as_such_whatever_the_layout(annotation):
    mod = compiled(f"op f(x: f16[M, 64], w: f16[N, 64] {annotation}) -> f16[M, N] {{ return x @ w.T }}",
                   "layout_literal_packed")
    with pytest.raises(CallError, match=r"'w' expects f16\[N, 64\], got torch.float16 of shape \[50, 42\]"):
        mod.f.bind(w=torch.randn(50, 42, dtype=F16))


def test_calling_a_bound_layer_wrongly_is_a_call_error(q4):
    layer = q4.f.bind(w=torch.randn(8, 64, dtype=F16))
    assert layer.free == ["x", "b"]
    with pytest.raises(CallError, match=r"'x' expects f16\[M, 64\], got shape \[4, 65\]"):
        layer(torch.randn(4, 65, dtype=F16), torch.randn(8, dtype=F16))
    with pytest.raises(CallError, match=r"'w' is not an input of the bound op; its inputs are x, b \('w' is bound\)"):
        layer(torch.randn(4, 64, dtype=F16), w=torch.randn(8, 64, dtype=F16))
    with pytest.raises(CallError, match=r"missing the input 'b'"):
        layer(torch.randn(4, 64, dtype=F16))
