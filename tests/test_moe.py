"""Mixture of experts (issue 4): the router rewrite, the align kernel (slots sorted by expert),
the grouped expert GEMMs and the gated combine, through Triton's interpreter against the
float64 reference: several (T, E, k) including experts that get no tokens and a single token;
the align kernel's outputs exactly equal to ir.prims_fused.moe_align_reference; routing ties
broken toward the lower expert index (as the reference's stable descending sort); one token's
input never changing another token's routing or output; the router rewrite firing only on its
pattern; expert_matmul with per-choice inputs x: [T, k, K].
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import opforge
from opforge.ir.dims import evaluate
from opforge.ir.prims_fused import MOE_BLOCK_MAX, moe_align_reference, moe_block
from opforge.ir.torch_dtypes import to_torch
from opforge.runtime import executor
from opforge.runtime.inputs import random_inputs
from opforge.runtime.reference import run_graph
from opforge.runtime.tolerances import assert_close, tolerance_for

from .kernel_helpers import as_list, call_args, compiled, inverted_poison, run_case

EXAMPLES = Path(opforge.__file__).resolve().parent / "examples"
MOE = EXAMPLES / "moe.opf"


def op_of(src, tag: str, name: str | None = None):
    mod = compiled(str(src), tag, **({"ops": [name]} if name else {}))
    return getattr(mod, name or list(mod.ops)[0])


def moe_ffn():
    return op_of(MOE, "moe_ex", "moe_ffn")


def router_op():
    return op_of(MOE, "moe_router_ex", "router")


MOE_K = """
op moe_k(x: $T[T, D], w_router: $T[E, D], w1: $T[E, F, D], w3: $T[E, F, D], w2: $T[E, D, F]) -> ($T[T, D], f32[T, $K], i32[T, $K]) {
    logits = cast(x @ w_router.T, f32)
    top, experts = topk(logits, k=$K)
    gates = softmax(top, axis=-1)
    h = silu(expert_matmul(x, w1, experts)) * expert_matmul(x, w3, experts)
    y = expert_matmul(h, w2, experts)
    return sum(y * cast(gates[..., None], $T), axis=1), gates, experts
}"""


def moe_k(k: int, dtype: str = "f16"):
    return op_of(MOE_K.replace("$K", str(k)).replace("$T", dtype), f"moe_k{k}_{dtype}")


def run_steps(op, values, bindings) -> dict:
    """Run the op's plan step by step as the executor does, and hand back every buffer
    (intermediates included)."""
    runner, plan = op.runner, op.plan
    buffers = {}
    for name, buf in plan.buffers.items():
        if buf.kind == "input":
            buffers[name] = values[name]
        else:
            shape = [evaluate(d, bindings) for d in buf.shape]
            dt = to_torch(buf.dtype)
            buffers[name] = torch.zeros(shape, dtype=dt) if buf.zeroed else executor.allocate(shape, dt, "cpu")
    scalars = runner.host_scalars(values, bindings)
    for step in plan.steps:
        launch = executor.choose(step, bindings)
        for kernel in launch.kernels:
            runner.launch(kernel, launch, buffers, scalars, bindings)
    return buffers


# -- the plan -------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 3, 4])
def test_moe_plan_is_router_align_and_two_grouped_gemms(k):
    op = moe_k(k)
    assert [g.kind for g in op.fused.groups] == ["router", "moe_align", "moe", "moe"]
    router = op.fused.groups[0].nodes[0]
    assert router.op == "moe_router" and router.attrs["k"] == k and router.attrs["softmax"]


# -- differential -----------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [dict(T=1, D=33, F=7, E=8), dict(T=7, D=16, F=9, E=3),
                                   dict(T=37, D=64, F=96, E=8), dict(T=3, D=5, F=130, E=2)],
                         ids=["T1_E8", "T7_E3", "file_shapes", "T3_E2_F130"])
def test_moe_ffn_matches_reference(sizes):
    op = moe_ffn()
    assert op.kernel_count <= 4
    run_case(op, sizes, seed=sizes["T"])


@pytest.mark.parametrize("k, sizes", [
    (2, dict(T=1, D=7, F=5, E=6)),
    (2, dict(T=9, D=33, F=7, E=5)),
    (3, dict(T=1, D=7, F=5, E=6)),
    (3, dict(T=7, D=33, F=17, E=4)),
    (4, dict(T=5, D=16, F=9, E=4)),
    (4, dict(T=2, D=7, F=33, E=16)),
], ids=["k2_T1", "k2_T9", "k3_T1", "k3_T7", "k4_all_experts", "k4_T2_E16"])
def test_moe_with_k_choices_matches_reference(k, sizes):
    op = moe_k(k)
    outs, refs = run_case(op, sizes, seed=10 * k + sizes["T"])
    used = set(refs[2].reshape(-1).tolist())
    if sizes["T"] * k < sizes["E"]:
        assert len(used) < sizes["E"]      # some experts receive no tokens
    # each token's k experts are distinct and its gates sum to one
    assert all(len(set(row)) == k for row in outs[2].tolist())
    assert_close(outs[1].sum(-1), torch.ones(sizes["T"], dtype=torch.float64), tolerance_for(op.graph), "gate sums")


def test_moe_in_f32():
    op = moe_k(2, "f32")
    run_case(op, dict(T=7, D=33, F=5, E=3), seed=21)


def test_moe_with_every_token_on_one_expert():
    """A skewed routing: one expert's run spans several row blocks (T*k/E > 64 -> block 64),
    the others are short or empty."""
    op = moe_k(2)
    sizes = dict(T=130, D=16, F=7, E=4)

    def prepare(ins):
        x = ins["x"].abs() + 0.25
        w = ins["w_router"].clone()
        w[2] = 1.0                     # expert 2 wins every token by far
        w[0] = -1.0                    # expert 0 never wins
        return {**ins, "x": x, "w_router": w}

    outs, refs = run_case(op, sizes, seed=22, prepare=prepare)
    experts = outs[2]
    assert bool((experts[:, 0] == 2).all()) and not bool((experts == 0).any())
    assert moe_block(sizes["T"] * 2, sizes["E"]) == 64


@pytest.mark.parametrize("sizes", [dict(T=7, D=16, F=9, E=4), dict(T=1, D=7, F=33, E=3)], ids=["T7", "T1"])
def test_top_1_routing(sizes):
    """k = 1: a static choice axis of size 1 through the expert GEMMs and their epilogues."""
    op = moe_k(1)
    assert [g.kind for g in op.fused.groups] == ["router", "moe_align", "moe", "moe"]
    outs, _ = run_case(op, sizes, seed=23)
    assert bool((outs[1] == 1.0).all())        # the softmax of one logit


# -- the align kernel -------------------------------------------------------------------------------
EXPERT = """
op expert(x: f32[T, K], w: f32[E, N, K], idx: i32[T, J]) -> f32[T, J, N] {
    return expert_matmul(x, w, idx)
}"""


def _align_cases():
    g = torch.Generator().manual_seed(0)
    cases = {
        "one_slot": torch.tensor([[0]]),
        "one_expert": torch.zeros(5, 1, dtype=torch.long),
        "T1_E8": torch.tensor([[6, 1]]),
        "random_E3": torch.randint(0, 3, (7, 2), generator=g),
        "skewed": torch.tensor([[3, 1]] * 40 + [[0, 3]] * 3),
        "repeats_in_a_token": torch.tensor([[1, 1], [0, 0], [1, 2]]),
        "long_T130_E4": torch.randint(0, 4, (130, 2), generator=g),
        "many_experts_few_used": torch.tensor([[9, 2, 30], [2, 9, 31]]),
        "k4_E5": torch.randint(0, 5, (33, 4), generator=g),
    }
    experts = {"one_slot": 1, "one_expert": 1, "T1_E8": 8, "random_E3": 3, "skewed": 4,
               "repeats_in_a_token": 3, "long_T130_E4": 4, "many_experts_few_used": 32, "k4_E5": 5}
    return [pytest.param(idx.to(torch.int32), experts[name], id=name) for name, idx in cases.items()]


@pytest.mark.parametrize("idx, experts", _align_cases())
def test_align_kernel_equals_reference_exactly(idx, experts):
    op = op_of(EXPERT, "moe_expert2")
    assert [g.kind for g in op.fused.groups] == ["moe_align", "moe"]
    t, j = idx.shape
    sizes = dict(T=t, J=j, E=experts, K=3, N=5)
    ins = random_inputs(op.graph, sizes, seed=1)
    ins["idx"] = idx
    want = moe_align_reference(idx, experts)
    names = [op.fused.names[v] for v in op.fused.groups[0].outputs]
    for poison in ("default", "inverted"):
        if poison == "default":
            bufs = run_steps(op, ins, sizes)
        else:
            with inverted_poison():
                bufs = run_steps(op, ins, sizes)
        for name, ref in zip(names, want):
            got = bufs[name]
            assert got.dtype == torch.int32 and torch.equal(got, ref), (name, poison, got.tolist(), ref.tolist())
    # what the reference promises, checked on its own: each expert's slots in order, padded
    slots, blocks, count = want
    blk = moe_block(t * j, experts)
    n = int(count) * blk
    real = slots[:n][slots[:n] < t * j]
    assert sorted(real.tolist()) == list(range(t * j))
    assert slots.shape[0] == t * j + MOE_BLOCK_MAX * experts and bool((slots[n:] == t * j).all())
    flat = idx.reshape(-1)
    for b in range(int(count)):
        rows = slots[b * blk:(b + 1) * blk]
        rows = rows[rows < t * j]
        assert bool((flat[rows.long()] == blocks[b]).all())
        assert rows.tolist() == sorted(rows.tolist())
    # and the expert GEMM built on it gives the right answer
    run_case(op, sizes, inputs=ins)


def test_align_buffers_of_the_moe_ffn_plan_equal_reference():
    op = moe_ffn()
    sizes = dict(T=9, D=16, F=7, E=8)
    ins = random_inputs(op.graph, sizes, seed=2)
    bufs = run_steps(op, ins, sizes)
    router, align = op.fused.groups[:2]
    experts = bufs[op.fused.names[router.outputs[1]]]
    ref_gates, ref_experts = run_graph(router_op().graph, {"x": ins["x"], "w_router": ins["w_router"]},
                                       dict(T=9, D=16, E=8), check=True)
    assert torch.equal(experts, ref_experts)
    for v, ref in zip(align.outputs, moe_align_reference(experts, 8)):
        assert torch.equal(bufs[op.fused.names[v]], ref), op.fused.names[v]


# -- ties and independence -------------------------------------------------------------------------
def stable_topk(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The largest k, ties to the lower index, by hand."""
    out = []
    for row in logits.tolist():
        order = sorted(range(len(row)), key=lambda e: (-row[e], e))
        out.append(order[:k])
    return torch.tensor(out, dtype=torch.int32)


def tied_inputs(t: int, d: int, e: int, seed: int):
    """Small integers: every logit is exact in f16, and duplicated router rows tie exactly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-1, 2, (t, d), generator=g).to(torch.float16)
    x[0] = 0                                   # every logit of token 0 is 0: all E tie
    base = torch.randint(-1, 2, (3, d), generator=g)
    rows = [base[i % 3] for i in range(e)]     # experts e and e+3 always tie
    w = torch.stack(rows).to(torch.float16)
    return x, w


@pytest.mark.parametrize("seed", [0, 1])
def test_router_ties_go_to_the_lower_expert(seed):
    op = router_op()
    t, d, e = 11, 16, 7
    x, w = tied_inputs(t, d, e, seed)
    logits = (x.double() @ w.double().T)
    exp = stable_topk(logits, 2)
    # the inputs really tie: token 0 everywhere, and each top pair of the others is between equals
    assert bool((logits[0] == 0).all())
    assert sum(int(logits[i, exp[i, 0]] == logits[i, exp[i, 1]]) for i in range(t)) >= 3
    gates, experts = op(x, w)
    assert experts.tolist()[0] == [0, 1]
    assert torch.equal(experts, exp)
    ref_gates, ref_experts = run_graph(op.graph, {"x": x, "w_router": w}, dict(T=t, D=d, E=e), check=True)
    assert torch.equal(experts, ref_experts)
    assert_close(gates, ref_gates, tolerance_for(op.graph), "gates")


def test_moe_ffn_with_tied_router_logits_matches_reference():
    op = moe_ffn()
    t, d, f, e = 9, 16, 7, 6
    x, w = tied_inputs(t, d, e, 3)
    sizes = dict(T=t, D=d, F=f, E=e)
    ins = random_inputs(op.graph, sizes, seed=3)
    ins["x"], ins["w_router"] = x, w
    run_case(op, sizes, inputs=ins)


@pytest.mark.parametrize("k", [2, 3])
def test_one_token_never_changes_another_tokens_routing_or_output(k):
    op = moe_k(k)
    sizes = dict(T=9, D=16, F=7, E=5)
    ins = random_inputs(op.graph, sizes, seed=30 + k)
    base = as_list(op(*call_args(op.graph, ins)))
    changed = None
    for trial in range(20):
        x = ins["x"].clone()
        g = torch.Generator().manual_seed(trial)
        x[4] = torch.randn(16, generator=g).to(x.dtype) * 3
        new = as_list(op(*call_args(op.graph, {**ins, "x": x})))
        if not torch.equal(new[2][4], base[2][4]):
            changed = new
            break
    assert changed is not None, "no perturbation changed token 4's experts"
    others = [i for i in range(sizes["T"]) if i != 4]
    out_a, *route_a = base
    out_b, *route_b = changed
    for a, b in zip(route_a, route_b):          # gates and experts: bit for bit
        assert torch.equal(a[others], b[others])
    if k == 2:
        # two choices add exactly in any order, so the other rows are bit for bit the same
        assert torch.equal(out_a[others], out_b[others])
    else:
        # more choices may add in another order on a GPU (atomics): equal within rounding
        assert_close(out_b[others], out_a[others], tolerance_for(op.graph), "other tokens' outputs")
    assert not torch.equal(base[0][4], changed[0][4])
    refs = run_graph(op.graph, {**ins, "x": x}, sizes, check=True)
    assert torch.equal(changed[2], refs[2])


# -- the router rewrite fires only on its pattern -------------------------------------------------------
ROUTERS = {
    "example_with_softmax": ("""
op r(x: f16[T, D], w: f16[E, D]) -> (f32[T, 2], i32[T, 2]) {
    top, experts = topk(cast(x @ w.T, f32), k=2)
    return softmax(top, axis=-1), experts
}""", True),
    "raw_values": ("""
op r(x: f32[T, D], w: f32[E, D]) -> (f32[T, 3], i32[T, 3]) {
    top, experts = topk(x @ w.T, k=3)
    return top, experts
}""", True),
    "topk_of_a_parameter": ("""
op r(s: f32[T, E]) -> (f32[T, 2], i32[T, 2]) {
    top, experts = topk(s, k=2)
    return softmax(top, axis=-1), experts
}""", False),
    "topk_after_a_nonlinearity": ("""
op r(x: f32[T, D], w: f32[E, D]) -> (f32[T, 2], i32[T, 2]) {
    top, experts = topk(sigmoid(x @ w.T), k=2)
    return top, experts
}""", False),
    "topk_over_tokens": ("""
op r(x: f32[T, D], w: f32[E, D]) -> (f32[2, E], i32[2, E]) {
    top, experts = topk(x @ w.T, k=2, axis=0)
    return top, experts
}""", False),
    "logits_also_returned": ("""
op r(x: f32[T, D], w: f32[E, D]) -> (f32[T, E], f32[T, 2], i32[T, 2]) {
    logits = x @ w.T
    top, experts = topk(logits, k=2)
    return logits, top, experts
}""", False),
    "batched_logits": ("""
op r(x: f32[B, T, D], w: f32[E, D]) -> (f32[B, T, 2], i32[B, T, 2]) {
    top, experts = topk(x @ w.T, k=2)
    return top, experts
}""", False),
}


@pytest.mark.parametrize("case", list(ROUTERS))
def test_router_rewrite_only_on_its_pattern(case):
    src, rewritten = ROUTERS[case]
    op = op_of(src, f"router_{case}")
    kinds = [g.kind for g in op.fused.groups]
    ops = {n.op for n in op.fused.graph.nodes}
    if rewritten:
        assert kinds == ["router"] and "topk" not in ops and "matmul" not in ops
    else:
        assert "router" not in kinds and "moe_router" not in ops and "topk" in kinds
    sizes = dict(B=2, T=7, D=33, E=5)
    run_case(op, {s: sizes[s] for s in op.graph.symbols}, seed=40)


TOPK_ONE_OUTPUT = {
    "indices": ("""
op r(s: f32[T, E]) -> i32[T, 2] {
    top, experts = topk(s, k=2)
    return experts
}""", dict(T=5, E=7)),
    "values": ("""
op r(s: f32[T, E]) -> f32[T, 2] {
    top, experts = topk(s, k=2)
    return top
}""", dict(T=5, E=7)),
    "router_indices": ("""
op r(x: f32[T, D], w: f32[E, D]) -> i32[T, 2] {
    top, experts = topk(x @ w.T, k=2)
    return experts
}""", dict(T=5, E=7, D=3)),
}


@pytest.mark.parametrize("case", list(TOPK_ONE_OUTPUT))
def test_topk_with_one_output_unused(case):
    src, sizes = TOPK_ONE_OUTPUT[case]
    op = op_of(src, f"topk_unused_{case}")
    assert [g.kind for g in op.fused.groups] == (["router"] if case.startswith("router") else ["topk"])
    run_case(op, sizes, seed=41)


# -- expert_matmul with per-choice inputs ----------------------------------------------------------------
EXPERT3 = """
op expert3(x: f16[T, J, K], w: f16[E, N, K], idx: i32[T, J]) -> f16[T, J, N] {
    return expert_matmul(x, w, idx)
}"""


@pytest.mark.parametrize("sizes", [dict(T=7, J=2, K=33, E=3, N=5), dict(T=1, J=3, K=7, E=8, N=130),
                                   dict(T=33, J=1, K=16, E=2, N=7)], ids=["T7_J2", "T1_J3_E8", "T33_J1"])
def test_expert_matmul_with_rank_3_x(sizes):
    op = op_of(EXPERT3, "moe_expert3")
    gemms = [n for g in op.fused.groups for n in g.nodes if n.op == "expert_gemm"]
    assert len(gemms) == 1 and gemms[0].inputs[0].type.rank == 3
    run_case(op, sizes, seed=50)


def test_expert_matmul_with_rank_3_x_and_repeated_experts():
    op = op_of(EXPERT3, "moe_expert3")
    sizes = dict(T=5, J=2, K=33, E=3, N=7)

    def prepare(ins):
        idx = ins["idx"].clone()
        idx[:, 1] = idx[:, 0]          # both choices of every token on one expert
        return {**ins, "idx": idx}

    run_case(op, sizes, seed=51, prepare=prepare)


def test_expert_matmul_rank_3_with_a_gated_combine():
    src = """
op combine3(x: f32[T, J, K], w: f32[E, N, K], idx: i32[T, J], g: f32[T, J]) -> f32[T, N] {
    return sum(relu(expert_matmul(x, w, idx)) * g[..., None], axis=1)
}"""
    op = op_of(src, "moe_combine3")
    assert [g.kind for g in op.fused.groups] == ["moe_align", "moe"]
    assert op.fused.groups[1].extra.get("zeroed") == tuple(op.graph.outputs)
    run_case(op, dict(T=7, J=2, K=33, E=3, N=5), seed=52)
