"""Regression tests of the silent wrong answers and crashes an outside campaign found (issue 9,
items 1-7), each written so that it failed before its fix. The campaigns themselves run in
tests/test_campaign.py."""
from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch

from opforge.ir import fp8
from opforge.ir.tile import Let, walk
from opforge.ir.tile_builder import TileBuilder
from opforge.ir.types import DType
from opforge.runtime.reference import run_reference

from .kernel_helpers import compiled, run_case

NAN = float("nan")


# -- 1. names in generated code are unique by construction ------------------------------------------
def test_a_size_cast_and_a_tensor_cast_get_different_names():
    op = compiled("op f(x: f16[C]) -> f32[C] { return cast(x, f32) / cast(C, f32) }", "names").f
    x = torch.arange(1, 6, dtype=torch.float16)
    torch.testing.assert_close(op(x), x.float() / 5, rtol=0, atol=0)
    op2 = compiled("op g(x: f16[C]) -> f32[C] { return cast(x > 2.0, f32) + cast(C, f32) }", "names").g
    torch.testing.assert_close(op2(x), (x > 2).float() + 5, rtol=0, atol=0)


def test_builder_never_reuses_a_name():
    b = TileBuilder("k")
    v = b.let(b.add(b.program_id(0), 1), "cast")       # a variable named like a host scalar
    s = b.scalar("cast", DType.f32)
    z = b.size(__import__("opforge.ir.dims", fromlist=["sym"]).sym("cast_2"))
    names = [v.name, s.name, z.name]
    assert len(set(names)) == 3, names
    assert b.stride("x", 0).name == b.stride("x", 0).name      # one buffer's stride is one parameter
    # a user's value named like a tunable never takes a tunable's name
    t = b.let(b.add(b.program_id(0), 2), "BLOCK_M")
    assert t.name != "BLOCK_M"


def test_no_kernel_of_the_examples_defines_a_name_twice(examples_dir):
    import opforge
    for path in sorted(examples_dir.glob("*.opf")):
        mod = opforge.compile(path, namespace=f"names_{path.stem}")
        from opforge.runtime.scan import compiled_parts
        for op in (part for o in mod.ops.values() for part in compiled_parts(o)):
            for k in op.plan.kernels:
                params = {p.name for p in k.params}
                tunables = {t.name for t in k.tunables}
                lets = {s.var.name for s in walk(k.body) if isinstance(s, Let)}
                assert not params & lets, (k.name, params & lets)
                assert not tunables & (params | lets), k.name
                assert len(params) == len(k.params), k.name


# -- 2. NaN propagates as torch propagates it ------------------------------------------------------
NAN_SPECS = {
    "rmax": ("op rmax(x: f32[M, N]) -> f32[M] { return max(x, axis=-1) }", lambda x: x.amax(-1)),
    "rmin": ("op rmin(x: f32[M, N]) -> f32[M, 1] { return min(x, axis=1, keepdim=true) }",
             lambda x: x.amin(1, keepdim=True)),
    "relu": ("op relu1(x: f32[M, N]) -> f32[M, N] { return relu(x) }", torch.relu),
    "maximum": ("op mx(x: f32[M, N]) -> f32[M, N] { return maximum(x, 0.5) }", lambda x: torch.clamp_min(x, 0.5)),
    "minimum": ("op mn(x: f32[M, N], y: f32[N]) -> f32[M, N] { return minimum(x, y) }", None),
    "softmax": ("op sm(x: f32[M, N]) -> f32[M, N] { return softmax(x, axis=-1) }", lambda x: torch.softmax(x, -1)),
}


# rows of 7 take one tile per row; rows of 20,000 the looped kernel (reductions only)
@pytest.mark.parametrize("name, n", [(name, n) for name in sorted(NAN_SPECS) for n in (7, 20000)
                                     if n == 7 or name in ("rmax", "rmin")])
def test_nan_propagates(name, n):
    src, ref = NAN_SPECS[name]
    op = compiled(src, "nan")
    op = getattr(op, next(iter(op.ops)))
    x = torch.randn(3, n)
    x[0, 2] = NAN
    x[2, n - 1] = NAN
    if name == "minimum":
        y = torch.randn(n)
        y[1] = NAN
        out, want = op(x, y), torch.minimum(x, y)
    else:
        out, want = op(x), ref(x)
    assert torch.equal(torch.isnan(out), torch.isnan(want)), (name, torch.isnan(out).sum(), torch.isnan(want).sum())
    ok = ~torch.isnan(want)
    torch.testing.assert_close(out[ok], want[ok], rtol=1e-5, atol=1e-6)


def test_max_of_a_row_with_only_a_nan_beside_infinities():
    op = compiled("op rmax2(x: f32[N]) -> f32[] { return max(x, axis=0) }", "nan").rmax2
    assert math.isnan(float(op(torch.tensor([1.0, NAN, -2.0]))))
    assert float(op(torch.tensor([-math.inf, -math.inf]))) == -math.inf
    assert float(op(torch.tensor([1.0, math.inf]))) == math.inf


# -- 3. casts to e4m3 round and saturate as torch does ---------------------------------------------
def test_cast_to_e4m3_saturates_and_keeps_subnormals():
    op = compiled("op c8(x: f32[N]) -> f8e4m3[N] { return cast(x, f8e4m3) }", "fp8cast").c8
    x = torch.tensor([470.0, 480.0, 500.0, 1000.0, 0.0013, -470.0, 1e6, -math.inf, math.inf, 1.94, 0.0029,
                      2.0 ** -10, -(2.0 ** -10) * 3, 0.0, 1e-9, 447.9, 17.0, 18.0, 19.0])
    want = x.to(torch.float8_e4m3fn).view(torch.uint8)
    got = op(x).view(torch.uint8)
    assert torch.equal(got, want), [(float(a), int(g), int(w)) for a, g, w in zip(x, got, want) if g != w]


def test_cast_to_e4m3_without_the_fp8_type_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("OPFORGE_FP8", "emulate")
    fp8.native.cache_clear()
    try:
        import opforge
        with pytest.raises(fp8.FP8Unsupported, match="f8e4m3.*sm_89.*@quant\\(fp8\\)"):
            opforge.compile("op c9(x: f32[N]) -> f32[N] { return cast(cast(x, f8e4m3), f32) }", namespace="fp8emu")
    finally:
        monkeypatch.delenv("OPFORGE_FP8")
        fp8.native.cache_clear()


# -- 4. W8A8 int8 never wraps its i32 sums -----------------------------------------------------------
def test_w8a8_int8_with_a_contraction_longer_than_an_i32_sum_holds():
    op = compiled("op lin8(x: f32[M, K], w: f32[N, K] @quant(int8, act=int8)) -> f32[M, N] { return x @ w.T }",
                  "w8a8k").lin8
    K = 140_000                      # 127 * 127 * K > 2**31
    layer = op.bind(w=torch.ones(2, K))
    out = layer(torch.ones(1, K))
    assert out.tolist() == [[float(K), float(K)]]
    assert layer._packed.kernel_count == 3       # quantize x, then two K chunks (one adds the other)


@pytest.mark.parametrize("act", ["int8", "fp8"])
def test_w8a8_propagates_a_nan_of_the_activations_to_its_row(act):
    """The per-row activation scale is a max that keeps NaN, so the row is NaN, as the
    reference (and a dense matmul) gives; the other rows are untouched."""
    op = compiled(f"op lin(x: f16[M, K], w: f16[N, K] @quant({act}, act={act})) -> f16[M, N] {{ return x @ w.T }}",
                  f"w8a8nan_{act}").lin
    layer = op.bind(w=torch.randn(48, 40, dtype=torch.float16))
    x = torch.randn(3, 40, dtype=torch.float16)
    x[1, 5] = float("nan")
    y = layer(x)
    assert y[1].isnan().all() and not y[0].isnan().any() and not y[2].isnan().any()


# -- 5. offsets that reach 2**31 take int64 index arithmetic ----------------------------------------
def test_the_index_width_is_chosen_from_sizes_and_strides():
    from opforge.runtime.indexing import inputs_need_index64, sizes_need_index64, span
    op = compiled("op logits(x: f16[M, D], w: f16[V, D]) -> f16[M, V] { return x @ w.T }", "idx").logits
    ext = op.runner.extents
    assert sizes_need_index64(ext, {"M": 16384, "D": 4096, "V": 131072})        # 2**31 logits
    assert not sizes_need_index64(ext, {"M": 16, "D": 4096, "V": 131072})
    fake = torch.empty(0, device="meta").as_strided((2, 3), (2 ** 30, 1))        # strides only
    assert span(fake) == 2 ** 30 + 2 and not inputs_need_index64({"x": fake})
    fake = torch.empty(0, device="meta").as_strided((3, 3), (2 ** 30, 1))
    assert inputs_need_index64({"x": fake})


def test_wide_kernels_index_in_int64_and_agree(monkeypatch):
    from opforge.codegen.triton import render_kernel
    op = compiled("op lg(x: f32[M, D], w: f32[V, D]) -> f32[M, V] { return x @ w.T + 1.0 }", "idx").lg
    monkeypatch.setenv("OPFORGE_INDEX64", "1")
    run_case(op, {"M": 37, "D": 45, "V": 70})
    wide = [k for k in op.runner._wide.values()]
    assert wide and all(k.name.endswith("_i64") for k in wide)
    text = render_kernel(wide[-1])
    assert "tl.cast(tl.program_id(axis=0), tl.int64)" in text and "tl.arange(0, BLOCK_K).to(tl.int64)" in text
    narrow = render_kernel(op.plan.kernels[-1])
    assert "tl.int64)" not in narrow.split("# -- K loop")[1].split("# -- epilogue")[0]


def test_an_offset_past_2_31_reads_the_right_element():
    """A strided input whose third element sits 2**31 bytes in: i32 offsets wrap there (the
    process read out of bounds before). Lazily allocated, so it touches 3 pages."""
    code = textwrap.dedent("""
        import torch, opforge
        mod = opforge.compile("op bump(x: u8[N]) -> u8[N] { return x + 1 }", namespace="bigoffset")
        base = torch.zeros(2 ** 31 + 16, dtype=torch.uint8)
        base[0], base[2 ** 30], base[2 ** 31] = 5, 6, 7
        print(mod.bump(base.as_strided((3,), (2 ** 30,))).tolist())
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "[6, 7, 8]"


# -- 6. Triton's scalar promotion never decides a dtype ------------------------------------------
def test_f16_times_an_f32_scalar_then_exp():
    op = compiled("op e16(x: f16[A, B], s: f32) -> f16[A, B] { return exp(x * s) }", "promo").e16
    run_case(op, {"A": 5, "B": 33}, prepare=lambda ins: {**ins, "s": 0.75})
    op2 = compiled("op sp16(x: f16[A], s: f32) -> f16[A] { return softplus(x * s) + tanh(s * x) }", "promo").sp16
    run_case(op2, {"A": 70}, prepare=lambda ins: {**ins, "s": 1.5})


# -- 7. groups the templates cannot lower are formed again smaller -------------------------------
@pytest.mark.parametrize("src, sizes", [
    ("op ep(x: f32[M, K], w: f32[N, K]) -> f32[M, N] { y = abs(x @ w.T)\n return y[0] + y }",
     {"M": 5, "K": 7, "N": 33}),
    ("op wm(x: f32[B, K], w: f32[N, K], p: f32) -> f32[B, N] { y = x * 2.0\n t7 = where(y[0] > p, y, p)\n"
     " return t7 @ w.T }", {"B": 6, "K": 9, "N": 5}),
    ("op rs(x: f32[M, N]) -> f32[M, N] { y = abs(x)\n s = sum(y, axis=0)\n return y * s[None, :] + y[0] }",
     {"M": 7, "N": 33}),
])
def test_unlowerable_joins_fall_back(src, sizes):
    mod = compiled(src, "fallback")
    run_case(getattr(mod, next(iter(mod.ops))), sizes)


def test_fallback_splits_the_node_a_template_cannot_place(monkeypatch):
    """Force the template to refuse a group's first join: the plan comes out one kernel larger
    and still right."""
    from opforge.passes import lower_eval, plan as plan_mod
    from opforge.passes.fusion import fuse
    from opforge.passes.pipeline import kernel_graph
    op = compiled("op fb(x: f32[M, N]) -> f32[M, N] { return tanh(abs(x) * 2.0) }", "fallback").fb
    g = kernel_graph(op.graph)
    assert len(fuse(g).groups) == 1
    real = plan_mod.LOWERINGS["row"]

    def picky(fg, grp):
        absolute = [n for n in grp.nodes if n.op == "abs"]
        if absolute and len(grp.nodes) > 1:
            raise lower_eval.LoweringError("refused", absolute[0])
        return real(fg, grp)
    monkeypatch.setitem(plan_mod.LOWERINGS, "row", picky)
    fg, plan = plan_mod.fuse_and_plan(g)
    assert len(plan.steps) == 2


# -- accuracy of the functions Triton's core lacks -------------------------------------------------
def test_tanh_softplus_gelu_are_accurate_in_f32():
    mod = compiled("""
op t1(x: f32[N]) -> f32[N] { return tanh(x) }
op t2(x: f32[N]) -> f32[N] { return softplus(x) }
op t3(x: f32[N]) -> f32[N] { return gelu(x, approximate="tanh") }
""", "accuracy")
    x = torch.cat([torch.logspace(-7, 1.3, 200), -torch.logspace(-7, 1.3, 200), torch.linspace(-30.5, 30.5, 122)])
    for op, ref in ((mod.t1, torch.tanh), (mod.t2, torch.nn.functional.softplus)):
        r = ref(x.double())
        rel = ((op(x).double() - r).abs() / r.abs()).max()
        assert rel < 1e-6, (op, float(rel))
    # gelu(tanh) where it is not an underflow of torch's own formula
    xs = x[x > -5]
    r = torch.nn.functional.gelu(xs.double(), approximate="tanh")
    assert ((mod.t3(xs).double() - r).abs() / r.abs().clamp_min(1e-30)).max() < 1e-5


# -- powers: torch.pow's signs, NaNs and integer results ---------------------------------------------
POW_SPEC = """
op p9(x: f32[N]) -> f32[N] { return x ** 9 }
op pxy(x: f32[N], y: f32[N]) -> f32[N] { return x ** y }
op ph(x: f16[N], y: f16[N]) -> f16[N] { return x ** y }
op pi(x: i32[N], y: i32[N]) -> i32[N] { return x ** y }
op pi11(x: i32[N]) -> i32[N] { return x ** 11 }
"""


def test_powers_match_torch_pow():
    """exp(y * log(x)) alone gave NaN for a negative base to an integer power (x ** 9, x ** y)
    and rounded integer powers (100000 ** 1 was 99999)."""
    mod = compiled(POW_SPEC, "powers")
    x = torch.tensor([-2., 0., -0., 1., float("nan"), -1.5, 3., -3., 2., 0., -2.])
    y = torch.tensor([9., -1., -1., float("nan"), 0., 0.5, 2., 3., 1e30, 0., 1e30])
    torch.testing.assert_close(mod.pxy(x, y), torch.pow(x, y), equal_nan=True, rtol=1e-6, atol=0)
    got, want = mod.pxy(x, y), torch.pow(x, y)
    assert torch.equal(torch.signbit(got[~want.isnan()]), torch.signbit(want[~want.isnan()]))   # -inf, -512
    torch.testing.assert_close(mod.p9(x), x ** 9, equal_nan=True, rtol=1e-6, atol=0)
    xh, yh = x.half(), y.clamp(-5, 5).half()
    torch.testing.assert_close(mod.ph(xh, yh), torch.pow(xh, yh), equal_nan=True)
    a = torch.tensor([2, -3, 1, -1, 0, 5, 100000, 2, 3], dtype=torch.int32)
    b = torch.tensor([-1, -1, -2, -3, -1, 31, 1, 40, 21], dtype=torch.int32)
    assert torch.equal(mod.pi(a, b), torch.pow(a, b))          # wrapping as torch wraps
    assert torch.equal(mod.pi11(a), a ** 11)


def test_axis_none_is_every_axis():
    """``sum(x, axis=None)``, as the built-ins reference writes the default."""
    mod = compiled("op f(x: f32[M, N]) -> f32[] { return sum(x, axis=None) }\n"
                   "op g(x: f32[M, N]) -> f32[1, 1] { return max(x, axis=None, keepdim=true) }", "axisnone")
    x = torch.randn(3, 5)
    torch.testing.assert_close(mod.f(x), x.sum())
    assert torch.equal(mod.g(x), x.amax().reshape(1, 1))
