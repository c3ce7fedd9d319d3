"""Differential tests of every fused matmul pattern (issue 4), through Triton's interpreter,
against the float64 reference, at sizes that are multiples of no block (1, 7, 33, 130, ...):
epilogues (bias, activations, residual, scale, casts), operand prologues (an i8 weight's cast,
a scale by a vector), two and three matmuls sharing their A operand, batched matmuls with
broadcast batch axes, matrix-vector products, split-K (the alternative must really be the one
chosen) and integer matmuls (never split).

Each pattern is also checked to be the one kernel the fusion promises.
"""
from __future__ import annotations

from collections import Counter

import pytest

from opforge.ir.tile import GUARD_RULES, _split_k
from opforge.runtime.executor import choose

from .kernel_helpers import compiled, run_case

SIZES = [dict(M=1, K=7, N=33), dict(M=7, K=33, N=130), dict(M=130, K=1, N=7)]
SIZE_IDS = ["1x7x33", "7x33x130", "130x1x7"]


def op_of(src: str, tag: str):
    mod = compiled(src, tag)
    (name,) = list(mod.ops)
    return getattr(mod, name)


def one_matmul_kernel(op, matmuls: int = 1, has: tuple = ()):
    """The op is a single matmul kernel holding ``matmuls`` matmuls and the ops in ``has``."""
    assert op.kernel_count == 1, [g.kind for g in op.fused.groups]
    (grp,) = op.fused.groups
    assert grp.kind == "matmul"
    ops = Counter(n.op for n in grp.nodes)
    assert ops["matmul"] == matmuls, ops
    for name in has:
        assert ops[name] >= 1, (name, ops)
    return grp


def split_launch(op, sizes):
    (step,) = op.plan.steps
    return choose(step, sizes)


# -- epilogues ------------------------------------------------------------------------------------
ACTIVATIONS = {
    "relu": "relu(y)",
    "silu": "silu(y)",
    "gelu_tanh": 'gelu(y, approximate="tanh")',
    "gelu_erf": "gelu(y)",
    "sigmoid": "sigmoid(y)",
    "tanh": "tanh(y)",
    "softplus": "softplus(y)",
    "exp_neg": "exp(-abs(y))",
}


@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("sizes", SIZES[:2], ids=SIZE_IDS[:2])
def test_bias_and_activation_epilogue(act, sizes):
    src = f"""
op mm_act(x: f16[M, K], w: f16[N, K], b: f16[N]) -> f16[M, N] {{
    y = x @ w.T + b
    return {ACTIVATIONS[act]}
}}"""
    op = op_of(src, f"epi_{act}")
    one_matmul_kernel(op, has=("add",))
    run_case(op, sizes, seed=1)


@pytest.mark.parametrize("sizes", SIZES, ids=SIZE_IDS)
def test_residual_scale_and_cast_epilogue(sizes):
    src = """
op mm_res(x: f32[M, K], w: f32[N, K], r: f32[M, N], s: f32 = 0.5) -> f16[M, N] {
    return cast(relu(x @ w.T) * s + r, f16)
}"""
    op = op_of(src, "epi_res")
    one_matmul_kernel(op, has=("mul", "add", "cast", "relu"))
    run_case(op, sizes, seed=2)


@pytest.mark.parametrize("sizes", SIZES[:2], ids=SIZE_IDS[:2])
def test_vector_scale_epilogue_and_widening_cast(sizes):
    src = """
op mm_colscale(x: f16[M, K], w: f16[N, K], s: f16[N], t: f16[M, 1]) -> f32[M, N] {
    return cast((x @ w.T) * s * t, f32)
}"""
    op = op_of(src, "epi_colscale")
    one_matmul_kernel(op, has=("mul", "cast"))
    run_case(op, sizes, seed=3)


def test_epilogue_storing_the_matmul_and_the_activation():
    src = """
op mm_two_outs(x: f16[M, K], w: f16[N, K], b: f16[N]) -> (f16[M, N], f16[M, N]) {
    y = x @ w.T + b
    return y, silu(y)
}"""
    op = op_of(src, "epi_two_outs")
    grp = one_matmul_kernel(op, has=("silu", "add"))
    assert len(grp.outputs) == 2
    run_case(op, dict(M=7, K=33, N=5), seed=4)


# -- prologues ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", SIZES, ids=SIZE_IDS)
def test_int8_weight_cast_prologue_with_row_scales(sizes):
    src = """
op mm_w8(x: f16[M, K], wq: i8[N, K], scale: f16[N], bias: f16[N]) -> f16[M, N] {
    return (x @ cast(wq, f16).T) * scale + bias
}"""
    op = op_of(src, "pro_w8")
    grp = one_matmul_kernel(op, has=("cast",))
    (cast,) = [n for n in grp.nodes if n.op == "cast"]
    assert cast.inputs[0] is op.graph.params[1].value     # the i8 weight, cast per tile
    run_case(op, sizes, seed=5)


@pytest.mark.parametrize("sizes", SIZES[:2], ids=SIZE_IDS[:2])
def test_vector_scale_prologues_on_both_operands(sizes):
    src = """
op mm_smooth(x: f16[M, K], sx: f16[K], w: f16[N, K], sw: f16[K]) -> f16[M, N] {
    return (x * sx) @ (w * sw).T
}"""
    op = op_of(src, "pro_scale")
    grp = one_matmul_kernel(op)
    assert Counter(n.op for n in grp.nodes)["mul"] == 2
    assert grp.outputs == tuple(op.graph.outputs)         # the scaled operands are never stored
    run_case(op, sizes, seed=6)


def test_int8_weight_and_activation_scale_prologues_with_an_epilogue():
    src = """
op mm_both(x: f32[M, K], sx: f32[K], wq: i8[N, K], sw: f32[N]) -> f32[M, N] {
    return gelu((x * sx) @ cast(wq, f32).T * sw, approximate="tanh")
}"""
    op = op_of(src, "pro_both")
    one_matmul_kernel(op, has=("cast", "mul", "gelu"))
    run_case(op, dict(M=7, K=130, N=33), seed=7)


# -- matmuls sharing A ---------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", SIZES, ids=SIZE_IDS)
def test_two_matmuls_sharing_a(sizes):
    src = """
op gated(x: f16[M, K], wg: f16[N, K], wu: f16[N, K]) -> f16[M, N] {
    return silu(x @ wg.T) * (x @ wu.T)
}"""
    op = op_of(src, "share2")
    grp = one_matmul_kernel(op, matmuls=2, has=("silu", "mul"))
    a = {n.inputs[0] for n in grp.nodes if n.op == "matmul"}
    assert a == {op.graph.params[0].value}
    run_case(op, sizes, seed=8)


@pytest.mark.parametrize("sizes", SIZES[:2], ids=SIZE_IDS[:2])
def test_three_matmuls_sharing_a(sizes):
    src = """
op tri(x: f32[M, K], w1: f32[N, K], w2: f32[N, K], w3: f32[N, K], b: f32[N]) -> f32[M, N] {
    return (x @ w1.T) * sigmoid(x @ w2.T) + (x @ w3.T) + b
}"""
    op = op_of(src, "share3")
    one_matmul_kernel(op, matmuls=3, has=("sigmoid", "add"))
    run_case(op, sizes, seed=9)


def test_four_matmuls_sharing_a_split_but_stay_right():
    src = """
op quad(x: f16[M, K], w1: f16[N, K], w2: f16[N, K], w3: f16[N, K], w4: f16[N, K]) -> f16[M, N] {
    return (x @ w1.T) * (x @ w2.T) + (x @ w3.T) * (x @ w4.T)
}"""
    op = op_of(src, "share4")
    mms = [sum(n.op == "matmul" for n in g.nodes) for g in op.fused.groups]
    assert sum(mms) == 4 and max(mms) <= 3
    run_case(op, dict(M=7, K=33, N=5), seed=10)


def test_matmuls_with_different_a_are_not_merged():
    src = """
op two_a(x: f16[M, K], z: f16[M, K], w1: f16[N, K], w2: f16[N, K]) -> f16[M, N] {
    return (x @ w1.T) + (z @ w2.T)
}"""
    op = op_of(src, "two_a")
    assert op.kernel_count == 2
    for grp in op.fused.groups:
        assert sum(n.op == "matmul" for n in grp.nodes) == 1
    run_case(op, dict(M=7, K=33, N=5), seed=11)


# -- batched ------------------------------------------------------------------------------------
BATCHED = {
    "broadcast_both": ("""
op bmm(a: f32[B, 1, M, K], b: f32[H, K, N]) -> f32[B, H, M, N] {
    return a @ b
}""", dict(B=2, H=3, M=7, K=33, N=5)),
    "shared_weight": ("""
op bmm(x: f16[B, H, M, K], w: f16[N, K], bias: f16[N]) -> f16[B, H, M, N] {
    return relu(x @ w.T + bias)
}""", dict(B=2, H=1, M=7, K=33, N=130)),
    "matrix_times_batch": ("""
op bmm(a: f16[M, K], b: f16[B, K, N]) -> f16[B, M, N] {
    return a @ b
}""", dict(B=3, M=1, K=7, N=33)),
    "transposed_operands": ("""
op bmm(a: f32[B, K, M], b: f32[B, N, K], r: f32[1, M, N]) -> f32[B, M, N] {
    return a.T @ b.T + r
}""", dict(B=2, M=7, K=33, N=5)),
}


@pytest.mark.parametrize("case", list(BATCHED))
def test_batched_matmul_with_broadcast_batch_axes(case):
    src, sizes = BATCHED[case]
    op = op_of(src, f"bmm_{case}")
    assert op.kernel_count == 1 and op.fused.groups[0].kind == "matmul"
    run_case(op, sizes, seed=12)


# -- batch axes folded into M (issue 11, item 2) ---------------------------------------------------
FOLDED = {
    "decode_residual": ("""
op lin(x: f16[B, S, K], w: f16[N, K], r: f16[B, S, N]) -> f16[B, S, N] {
    return x @ w.T + r
}""", [dict(B=5, S=1, K=40, N=33), dict(B=3, S=7, K=33, N=130), dict(B=1, S=70, K=17, N=9)]),
    "unit_axis_between": ("""
op lin(x: f32[B, H, S, K], w: f32[1, N, K], b: f32[N]) -> f32[B, H, S, N] {
    return silu(x @ w.T + b)
}""", [dict(B=2, H=1, S=5, K=33, N=7), dict(B=3, H=2, S=1, K=9, N=40)]),
    "shared_a_split_k": ("""
op lin(x: f32[B, S, K], wg: f32[N, K], wu: f32[N, K]) -> f32[B, S, N] {
    return silu(x @ wg.T) * (x @ wu.T)
}""", [dict(B=3, S=1, K=1100, N=7), dict(B=2, S=3, K=50, N=20)]),
}


def tile_kernels(op):
    (step,) = op.plan.steps
    return [k for alt in step for k in alt.kernels]


@pytest.mark.parametrize("case", list(FOLDED))
def test_batch_axes_fold_into_m_when_the_weight_has_none(case):
    """A weight shared by the batch: one grid axis of (batch x M) row tiles, each row's batch
    indices unflattened from its row, so the weight is read once per row tile."""
    src, sizes_list = FOLDED[case]
    op = op_of(src, f"fold_{case}")
    assert op.kernel_count == 1 and op.fused.groups[0].kind == "matmul"
    for k in tile_kernels(op):
        if k.name.endswith("_splitk"):
            assert len(k.grid) == 3 and k.grid[1].parts[0][0] == 1       # no batch on axis 1
        else:
            assert len(k.grid) == 1, (k.name, k.grid)
        assert "folded into M" in (k.doc or "")
    for sizes in sizes_list:
        run_case(op, sizes, seed=16)


def test_a_batched_weight_keeps_the_batch_grid_axis():
    src, sizes = BATCHED["transposed_operands"]
    for k in tile_kernels(op_of(src, "fold_not")):
        assert len(k.grid) >= 2 and "folded" not in (k.doc or "")


VECTOR_PRODUCTS = {
    "matrix_vector": ("""
op mv(a: f32[B, M, K], v: f32[K]) -> f32[B, M] {
    return tanh(a @ v)
}""", dict(B=2, M=33, K=7)),
    "vector_matrix": ("""
op mv(v: f16[K], b: f16[B, K, N]) -> f16[B, N] {
    return v @ b
}""", dict(B=3, K=33, N=7)),
    "vector_vector": ("""
op mv(u: f32[K], v: f32[K]) -> f32[] {
    return u @ v
}""", dict(K=33)),
}


@pytest.mark.parametrize("case", list(VECTOR_PRODUCTS))
def test_matmul_with_a_vector_operand(case):
    src, sizes = VECTOR_PRODUCTS[case]
    op = op_of(src, f"vec_{case}")
    assert op.kernel_count == 1 and op.fused.groups[0].kind == "matmul"
    run_case(op, sizes, seed=12)


# -- split-K --------------------------------------------------------------------------------------
SPLIT_BIAS = """
op split_bias(x: f16[M, K], w: f16[N, K], b: f16[N]) -> f16[M, N] {
    return relu(x @ w.T + b)
}"""


@pytest.mark.parametrize("sizes", [dict(M=3, N=5, K=1030), dict(M=1, N=33, K=1024), dict(M=7, N=1, K=2049)],
                         ids=["3x1030x5", "1x1024x33", "7x2049x1"])
def test_split_k_is_chosen_for_long_k_and_matches(sizes):
    op = op_of(SPLIT_BIAS, "splitk_bias")
    one_matmul_kernel(op, has=("relu", "add"))
    m, n, k = sizes["M"], sizes["N"], sizes["K"]
    assert _split_k(m, n, k, 1) > 1
    launch = split_launch(op, sizes)
    assert launch.guard is not None and launch.guard.rule == "split_k"
    assert GUARD_RULES["split_k"][0](m, n, k, 1)
    assert len(launch.kernels) == 2 and launch.kernel.name.endswith("_splitk")
    assert launch.then[0].name.endswith("_splitk_reduce")
    # the epilogue (bias, relu) runs once, in the reduce kernel, after the partial sums
    assert "scratch" in {op.plan.buffers[b].kind for b in op.plan.buffers}
    run_case(op, sizes, seed=13)


def test_split_k_is_not_chosen_when_k_is_short_or_tiles_are_many():
    op = op_of(SPLIT_BIAS, "splitk_bias")
    (step,) = op.plan.steps
    assert len(step) == 2
    for sizes in (dict(M=3, N=5, K=1000), dict(M=700, N=900, K=4096), dict(M=1, N=1, K=511)):
        launch = choose(step, sizes)
        assert launch.guard is None and not launch.then, sizes
    run_case(op, dict(M=3, N=5, K=1000), seed=14)


def test_split_k_with_shared_a_and_batch():
    src = """
op split_gated(x: f32[B, M, K], wg: f32[N, K], wu: f32[N, K]) -> f32[B, M, N] {
    return silu(x @ wg.T) * (x @ wu.T)
}"""
    op = op_of(src, "splitk_gated")
    one_matmul_kernel(op, matmuls=2)
    sizes = dict(B=2, M=1, N=7, K=1100)
    assert _split_k(1, 7, 1100, 2) == 4
    launch = split_launch(op, sizes)
    assert launch.guard is not None and launch.guard.rule == "split_k"
    run_case(op, sizes, seed=15)


# -- integer matmuls ------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [dict(M=3, N=5, K=1030), dict(M=7, N=33, K=1)], ids=["long_k", "k1"])
def test_int8_matmul_is_exact_and_never_split(sizes):
    src = """
op imm(x: i8[M, K], w: i8[N, K]) -> i8[M, N] {
    return x @ w.T
}"""
    op = op_of(src, "int8_mm")
    one_matmul_kernel(op)
    (step,) = op.plan.steps
    assert len(step) == 1 and step[0].guard is None and not step[0].then
    assert not any(b.kind == "scratch" for b in op.plan.buffers.values())
    run_case(op, sizes, seed=16)


def test_int8_matmul_with_an_integer_epilogue():
    src = """
op imm_epi(x: i8[M, K], w: i8[N, K], b: i32[N]) -> i32[M, N] {
    return cast(x @ w.T, i32) + b
}"""
    op = op_of(src, "int8_mm_epi")
    one_matmul_kernel(op, has=("cast", "add"))
    run_case(op, dict(M=7, N=5, K=33), seed=17)


@pytest.mark.parametrize("dtype", ["i32", "i64", "u8"])
def test_wider_and_unsigned_integer_matmuls_are_exact_and_never_split(dtype):
    """tl.dot takes only int8: these must still compute exactly (wrapping as torch does)."""
    src = f"""
op imm_{dtype}(x: {dtype}[M, K], w: {dtype}[N, K], b: {dtype}[N]) -> {dtype}[M, N] {{
    return x @ w.T + b
}}"""
    op = op_of(src, f"int_mm_{dtype}")
    assert op.kernel_count == 1
    for step in op.plan.steps:
        assert len(step) == 1 and step[0].guard is None and not step[0].then
    run_case(op, dict(M=3, N=5, K=1030), seed=18)
    run_case(op, dict(M=7, N=33, K=1), seed=19)


UNIT_AXES = {
    "last": ("""
op unit(x: f32[M, 1]) -> f32[M, 1] {
    return exp(x)
}""", dict(M=5)),
    "middle_and_last": ("""
op unit(x: f16[B, 1, S, 1], y: f16[B, 1, S, 1]) -> f16[B, 1, S, 1] {
    return sigmoid(x) * y
}""", dict(B=2, S=33)),
    "keepdim_statistics": ("""
op unit(x: f32[B, S, D], eps: f32 = 1e-5) -> f32[B, S, 1] {
    return rsqrt(mean(x * x, axis=-1, keepdim=true) + eps)
}""", dict(B=2, S=7, D=33)),
}


@pytest.mark.parametrize("case", list(UNIT_AXES))
def test_row_kernels_over_static_unit_axes(case):
    """Tiles whose axes include a static 1 (stored through a narrower pointer)."""
    src, sizes = UNIT_AXES[case]
    op = op_of(src, f"unit_{case}")
    run_case(op, sizes, seed=19)
