"""Flash attention (issue 4): the rewrite of softmax(mask(q @ k.T * scale)) @ v into one kernel
with an online softmax, differential against the float64 reference through Triton's
interpreter: causal and not, S != T both ways, lengths that are multiples of no block, head dims
16/40/64/128 with E != Ev, grouped-query attention by broadcasting, tensor masks, the scale on
either side of the mask, decode shapes that take the split-KV alternative, and patterns that
must not be rewritten (still computed right, by the ordinary kernels).

Rows whose keys are all masked are NaN in torch's softmax, and so in the reference; the kernels
must give NaN exactly there and the reference's values everywhere else.
"""
from __future__ import annotations

import pytest
import torch

from opforge.ir.tile import _split_kv
from opforge.ir.torch_dtypes import to_torch
from opforge.runtime.executor import choose
from opforge.runtime.inputs import random_inputs
from opforge.runtime.reference import run_graph
from opforge.runtime.tolerances import assert_close, tolerance_for

from .kernel_helpers import as_list, call_args, compiled, run_case


def op_of(src: str, tag: str):
    mod = compiled(src, tag)
    (name,) = list(mod.ops)
    return getattr(mod, name)


def flash_node(op):
    assert op.kernel_count == 1, [g.kind for g in op.fused.groups]
    (grp,) = op.fused.groups
    assert grp.kind == "flash"
    (node,) = grp.nodes
    assert node.op == "flash_attention"
    return node


def run_with_nans(op, sizes, *, seed=0, prepare=None, expect_nan_rows=None):
    """Compare with the reference where it is a number; NaN exactly where it is NaN."""
    g = op.graph
    ins = random_inputs(g, sizes, seed=seed)
    if prepare is not None:
        ins = prepare(ins)
    refs = run_graph(g, ins, sizes, check=True)
    outs = as_list(op(*call_args(g, ins)))
    tol = tolerance_for(g)
    for i, (o, r, t) in enumerate(zip(outs, refs, g.result_types)):
        assert o.dtype == to_torch(t.dtype) and tuple(o.shape) == tuple(r.shape)
        nan = torch.isnan(r)
        assert torch.equal(torch.isnan(o), nan), \
            f"output {i}: NaN at {torch.isnan(o).nonzero().tolist()[:8]}, the reference at {nan.nonzero().tolist()[:8]}"
        if expect_nan_rows is not None:
            assert int(nan.any(-1).sum()) == expect_nan_rows(sizes), int(nan.any(-1).sum())
            # a row is NaN as a whole or not at all
            assert torch.equal(nan.any(-1), nan.all(-1))
        assert_close(o[~nan], r[~nan], tol, f"{g.name} output {i} at {sizes}")
    return outs, refs


# -- causal and non-causal, S != T, head dims --------------------------------------------------
ATTN = """
op attn(q: $T[B, H, S, E], k: $T[B, H, T, E], v: $T[B, H, T, Ev]) -> $T[B, H, S, Ev] {
    s = (q @ k.T) * rsqrt(cast(E, f32))
    p = softmax($MASKED, axis=-1)
    return p @ v
}"""


def attn_src(causal: bool, dtype: str = "f16") -> str:
    masked = "where(causal(S, T), s, -inf)" if causal else "s"
    return ATTN.replace("$MASKED", masked).replace("$T", dtype)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("sizes", [
    dict(B=1, H=2, S=7, T=33, E=16, Ev=40),
    dict(B=2, H=1, S=17, T=17, E=40, Ev=16),
    dict(B=1, H=1, S=33, T=130, E=64, Ev=64),
    dict(B=1, H=1, S=5, T=19, E=128, Ev=24),
    dict(B=1, H=3, S=1, T=7, E=16, Ev=16),
], ids=["7x33_e16_ev40", "17x17_e40_ev16", "33x130_e64", "5x19_e128_ev24", "1x7"])
def test_flash_matches_reference(causal, sizes):
    op = op_of(attn_src(causal), f"flash_{'c' if causal else 'f'}")
    node = flash_node(op)
    assert node.attrs["mask"] == ("causal" if causal else "none") and node.attrs["scale"]
    # T >= S: every row keeps at least one key
    run_case(op, sizes, seed=sizes["S"] + sizes["E"])


def test_non_causal_with_fewer_keys_than_queries():
    op = op_of(attn_src(False), "flash_f")
    run_case(op, dict(B=1, H=2, S=33, T=7, E=40, Ev=16), seed=3)


def test_flash_in_f32():
    op = op_of(attn_src(True, "f32"), "flash_c32")
    flash_node(op)
    run_case(op, dict(B=1, H=2, S=19, T=40, E=24, Ev=8), seed=4)


@pytest.mark.parametrize("sizes", [dict(B=1, H=2, S=33, T=7, E=16, Ev=16), dict(B=1, H=1, S=9, T=1, E=40, Ev=8)],
                         ids=["33x7", "9x1"])
def test_causal_with_fewer_keys_than_queries_gives_nan_rows(sizes):
    op = op_of(attn_src(True), "flash_c")
    flash_node(op)
    # row i sees keys j <= i + T - S: the first S - T rows see none
    run_with_nans(op, sizes, seed=5, expect_nan_rows=lambda s: s["B"] * s["H"] * (s["S"] - s["T"]))


# -- grouped-query attention by broadcasting ------------------------------------------------------
GQA = """
op gqa(q: f16[B, G, R, S, E], k: f16[B, G, 1, T, E], v: f16[B, G, 1, T, E]) -> f16[B, G, R, S, E] {
    s = (q @ k.T) * rsqrt(cast(E, f32))
    p = softmax(where(causal(S, T), s, -inf), axis=-1)
    return p @ v
}"""


@pytest.mark.parametrize("sizes", [dict(B=2, G=2, R=3, S=5, T=9, E=16), dict(B=1, G=1, R=4, S=7, T=7, E=40)],
                         ids=["b2g2r3", "g1r4"])
def test_grouped_query_attention_by_broadcasting(sizes):
    op = op_of(GQA, "flash_gqa")
    node = flash_node(op)
    # k and v are read through their broadcast axis: no expanded copies are stored
    assert node.inputs[1] is op.graph.params[1].value and node.inputs[2] is op.graph.params[2].value
    assert set(op.plan.buffers) >= {"q", "k", "v"}
    assert not any(b.kind == "temp" for b in op.plan.buffers.values())
    run_case(op, sizes, seed=6)


# -- tensor masks, scale before or after ---------------------------------------------------------
MASKED = {
    "scale_then_mask": """
op masked(q: f16[B, S, E], k: f16[B, T, E], v: f16[B, T, Ev], m: bool[S, T], sc: f32 = 0.3) -> f16[B, S, Ev] {
    return softmax(where(m, (q @ k.T) * sc, -inf), axis=-1) @ v
}""",
    "mask_then_scale": """
op masked(q: f16[B, S, E], k: f16[B, T, E], v: f16[B, T, Ev], m: bool[S, T], sc: f32 = 0.3) -> f16[B, S, Ev] {
    return softmax(where(m, q @ k.T, -inf) * sc, axis=-1) @ v
}""",
    "batched_mask_unscaled": """
op masked(q: f16[B, S, E], k: f16[B, T, E], v: f16[B, T, Ev], m: bool[B, 1, T]) -> f16[B, S, Ev] {
    return softmax(where(m, q @ k.T, -inf), axis=-1) @ v
}""",
}


@pytest.mark.parametrize("case", list(MASKED))
def test_tensor_mask(case):
    op = op_of(MASKED[case], f"flash_{case}")
    node = flash_node(op)
    assert node.attrs["mask"] == "tensor"
    assert node.attrs["scale"] == ("scale" in case and "unscaled" not in case)
    sizes = dict(B=2, S=7, T=33, E=40, Ev=24)
    run_case(op, sizes, seed=7)


@pytest.mark.parametrize("case", ["scale_then_mask", "mask_then_scale"])
def test_tensor_mask_with_fully_masked_rows_gives_nan_there(case):
    op = op_of(MASKED[case], f"flash_{case}")
    sizes = dict(B=2, S=7, T=33, E=16, Ev=16)

    def prepare(ins):
        m = ins["m"].clone()
        m[0] = False          # no keys for query 0
        m[4] = False
        m[5] = False
        m[5, 32] = True       # query 5 keeps only the very last key (a partial block)
        m[6] = True
        return {**ins, "m": m}

    run_with_nans(op, sizes, seed=8, prepare=prepare, expect_nan_rows=lambda s: 2 * s["B"])


# -- decode: split-KV ----------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_decode_takes_the_split_kv_alternative(causal):
    op = op_of(attn_src(causal), f"flash_{'c' if causal else 'f'}")
    sizes = dict(B=1, H=2, S=1, T=600, E=16, Ev=24)
    assert _split_kv(1, 600, 2) == 4
    (step,) = op.plan.steps
    assert len(step) == 2
    launch = choose(step, sizes)
    assert launch.guard is not None and launch.guard.rule == "split_kv"
    assert launch.kernel.name.endswith("_splitkv") and launch.then[0].name.endswith("_combine")
    scratch = {b.name for b in op.plan.buffers.values() if b.kind == "scratch"}
    assert len(scratch) == 3     # each split's running max, sum and unnormalised output
    assert scratch <= {p.buffer for p in launch.kernel.params if p.kind == "ptr"}
    assert scratch <= {p.buffer for p in launch.then[0].params if p.kind == "ptr"}
    run_case(op, sizes, seed=9)
    # prefill-like sizes, and decode with short keys, take the one-kernel alternative
    for other in (dict(B=4, H=8, S=64, T=600, E=16, Ev=24), dict(B=1, H=2, S=1, T=511, E=16, Ev=24),
                  dict(B=8, H=16, S=1, T=4096, E=16, Ev=24)):
        alt = choose(step, other)
        assert alt.guard is None and not alt.then, other


def test_short_causal_prefill_over_a_long_cache_takes_split_kv():
    """A few query rows against many keys: split-KV with the causal diagonal inside the splits."""
    op = op_of(attn_src(True), "flash_c")
    sizes = dict(B=1, H=2, S=5, T=700, E=16, Ev=8)
    launch = choose(op.plan.steps[0], sizes)
    assert launch.guard is not None and launch.guard.rule == "split_kv"
    run_case(op, sizes, seed=15)


def test_decode_split_kv_with_grouped_query_attention():
    op = op_of(GQA, "flash_gqa")
    sizes = dict(B=1, G=2, R=2, S=1, T=530, E=16)
    launch = choose(op.plan.steps[0], sizes)
    assert launch.guard is not None and launch.guard.rule == "split_kv"
    run_case(op, sizes, seed=10)


def test_decode_split_kv_with_a_mask_that_empties_some_splits():
    op = op_of(MASKED["mask_then_scale"], "flash_mask_then_scale")
    sizes = dict(B=1, S=1, T=600, E=16, Ev=16)
    launch = choose(op.plan.steps[0], sizes)
    assert launch.guard is not None and launch.guard.rule == "split_kv"

    def prepare(ins):
        m = torch.zeros_like(ins["m"])
        m[0, 5] = m[0, 17] = m[0, 599] = True     # keys in the first and last splits only
        return {**ins, "m": m}

    run_case(op, sizes, seed=11, prepare=prepare)

    def prepare_none(ins):
        return {**ins, "m": torch.zeros_like(ins["m"])}

    run_with_nans(op, sizes, seed=11, prepare=prepare_none, expect_nan_rows=lambda s: 1)


# -- patterns that must not be rewritten -------------------------------------------------------------
NOT_FLASH = {
    "scores_returned": ("""
op nf(q: f16[S, E], k: f16[T, E], v: f16[T, E]) -> (f16[S, E], f16[S, T]) {
    s = (q @ k.T) * rsqrt(cast(E, f32))
    return softmax(s, axis=-1) @ v, s
}""", dict(S=7, T=9, E=16)),
    "probabilities_returned": ("""
op nf(q: f16[S, E], k: f16[T, E], v: f16[T, E]) -> (f16[S, E], f16[S, T]) {
    p = softmax(where(causal(S, T), q @ k.T, -inf), axis=-1)
    return p @ v, p
}""", dict(S=7, T=9, E=16)),
    "softmax_over_queries": ("""
op nf(q: f16[S, E], k: f16[T, E], v: f16[S, E]) -> f16[T, E] {
    p = softmax(q @ k.T, axis=0)
    return p.T @ v
}""", dict(S=7, T=9, E=16)),
    "scores_used_twice": ("""
op nf(q: f16[S, E], k: f16[T, E], v: f16[T, E]) -> f16[S, E] {
    s = q @ k.T
    return (softmax(s, axis=-1) + sigmoid(s)) @ v
}""", dict(S=7, T=9, E=16)),
    "matmul_with_b_first": ("""
op nf(q: f16[S, E], k: f16[T, E], v: f16[T, E]) -> f16[E, S] {
    p = softmax(q @ k.T, axis=-1)
    return v.T @ p.T
}""", dict(S=7, T=9, E=16)),
}


@pytest.mark.parametrize("case", list(NOT_FLASH))
def test_patterns_that_are_not_attention_stay_unrewritten_and_right(case):
    src, sizes = NOT_FLASH[case]
    op = op_of(src, f"notflash_{case}")
    assert not any(g.kind == "flash" for g in op.fused.groups)
    assert not any(n.op == "flash_attention" for n in op.fused.graph.nodes)
    assert any(n.op == "softmax" for g in op.fused.groups for n in g.nodes)
    run_case(op, sizes, seed=12)


def test_only_the_attention_part_of_a_larger_graph_is_rewritten():
    src = """
op block(x: f16[S, D], wq: f16[E, D], wk: f16[E, D], wv: f16[E, D], wo: f16[D, E]) -> f16[S, D] {
    q = x @ wq.T
    k = x @ wk.T
    v = x @ wv.T
    o = softmax(where(causal(S, S), (q @ k.T) * rsqrt(cast(E, f32)), -inf), axis=-1) @ v
    return x + o @ wo.T
}"""
    op = op_of(src, "flash_block")
    kinds = [g.kind for g in op.fused.groups]
    assert kinds.count("flash") == 1
    assert sum(n.op == "matmul" for g in op.fused.groups for n in g.nodes) == 4
    run_case(op, dict(S=9, D=33, E=16), seed=13)


def test_unrewritten_causal_mask_with_fewer_keys_than_queries():
    src = """
op cm(s: f32[S, T]) -> f32[S, T] {
    return softmax(where(causal(S, T), s, -inf), axis=-1)
}"""
    op = op_of(src, "causal_rows")
    run_with_nans(op, dict(S=5, T=3), seed=14, expect_nan_rows=lambda s: s["S"] - s["T"])
