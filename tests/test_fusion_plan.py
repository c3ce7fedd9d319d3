"""The fused plans of the example blocks (issue 4): how many kernels each op becomes and what
each kernel holds, structural properties every plan must have (no contraction computed twice,
groups in a dependency order, the attention scores never stored), and the partitioner's
switches (PassContext.fuse_contractions, max_group_nodes) changing the plan but not the results.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

import opforge
from opforge.frontend import load_program
from opforge.ir.dims import evaluate
from opforge.passes.context import PassContext
from opforge.passes.cost import base_inputs
from opforge.passes.fusion import fuse, node_class
from opforge.passes.pipeline import canonical_graph, kernel_graph
from opforge.passes.plan import build_plan
from opforge.runtime.cache import KernelCache
from opforge.runtime.executor import PlanRunner
from opforge.runtime.inputs import random_inputs
from opforge.runtime.reference import run_graph

from .kernel_helpers import as_list, call_args, check_outputs, compiled

EXAMPLES = Path(opforge.__file__).resolve().parent / "examples"
LLAMA = EXAMPLES / "llama.opf"
MOE = EXAMPLES / "moe.opf"
LORA = EXAMPLES / "lora.opf"

CONTRACTIONS = {"matmul", "expert_gemm", "expert_matmul", "flash_attention", "moe_router"}

NONCAUSAL_ATTENTION = """
op attention_full(q: f16[B, H, S, E], k: f16[B, H, T, E], v: f16[B, H, T, E]) -> f16[B, H, S, E] {
    s = (q @ k.T) * rsqrt(cast(E, f32))
    return softmax(s, axis=-1) @ v
}
"""


def example_op(path: Path, name: str):
    return getattr(compiled(str(path), f"plan_{path.stem}", ops=[name]), name)


def kernel_graph_of(path_or_src, name: str):
    g = canonical_graph(load_program(path_or_src), name)
    return g, kernel_graph(g)


def plan_ops():
    out = [pytest.param(LLAMA, n, id=f"llama-{n}") for n in
           ("rms_norm", "rotary", "attention", "swiglu_mlp", "split_heads", "llama_block")]
    out += [pytest.param(MOE, n, id=f"moe-{n}") for n in ("router", "moe_ffn")]
    out += [pytest.param(LORA, n, id=f"lora-{n}") for n in ("lora_linear", "lora_linear_gelu")]
    out += [pytest.param(EXAMPLES / "quant_linear.opf", "linear_w8_explicit", id="quant-linear_w8_explicit")]
    out += [pytest.param(NONCAUSAL_ATTENTION, "attention_full", id="attention_full")]
    return out


def group_of(fg) -> dict:
    return {n: grp for grp in fg.groups for n in grp.nodes}


# -- kernel counts and group contents ------------------------------------------------------------
def test_swiglu_mlp_is_at_most_two_kernels():
    op = example_op(LLAMA, "swiglu_mlp")
    assert op.kernel_count <= 2
    assert [g.kind for g in op.fused.groups] == ["matmul", "matmul"]
    up, down = op.fused.groups
    # the gate and up projections share one pass over x, with silu(.) * (.) as their epilogue
    assert Counter(n.op for n in up.nodes) == Counter({"matmul": 2, "silu": 1, "mul": 1})
    mm = [n for n in up.nodes if n.op == "matmul"]
    assert mm[0].inputs[0] is mm[1].inputs[0] is op.graph.params[0].value
    assert [n.op for n in down.nodes] == ["matmul"]
    assert len(up.outputs) == 1 and up.outputs[0].type.shape[-1] == op.graph.params[1].value.type.shape[0]  # h: [.., F]
    assert "fused swiglu_mlp: 2 kernel(s)" in op.stage_text("fused")


@pytest.mark.parametrize("which", ["causal", "noncausal"])
def test_attention_is_exactly_one_flash_kernel(which):
    op = example_op(LLAMA, "attention") if which == "causal" else \
        getattr(compiled(NONCAUSAL_ATTENTION, "plan_attn_full"), "attention_full")
    assert op.kernel_count == 1
    (grp,) = op.fused.groups
    assert grp.kind == "flash"
    (node,) = grp.nodes
    assert node.op == "flash_attention"
    assert node.attrs["mask"] == ("causal" if which == "causal" else "none")
    assert node.attrs["scale"] is True
    assert grp.outputs == tuple(op.graph.outputs)


def test_llama_block_rms_norms_are_one_kernel_or_a_projection_prologue():
    """Each RMSNorm is one row kernel (statistics and normalisation: x read once, the
    normalised value written once), or its statistics kernel writes only the per-row
    statistic and the normalisation is a prologue of the projection reading it."""
    op = example_op(LLAMA, "llama_block")
    fg = op.fused
    where = group_of(fg)
    producer = fg.graph.producers()
    users = fg.graph.users()
    params = {p.name: p.value for p in fg.graph.params}
    means = [n for n in fg.graph.nodes if n.op == "mean"]
    assert len(means) == 2
    for mean, norm_w in zip(means, ("attn_norm", "mlp_norm")):
        grp = where[mean]
        assert grp.kind == "row" and grp.axes == (2,)
        sq = producer[mean.inputs[0]]
        xf = producer[sq.inputs[0]]
        assert sq.op == "mul" and xf.op == "cast" and where[sq] is grp
        # the cast of the input: in the kernel, or recomputed wherever it is read (never stored)
        assert where.get(xf) is grp or xf in fg.recompute
        tail = []
        v = mean.out
        for op_name in ("add", "rsqrt", "mul", "cast", "mul"):
            (nxt,) = users[v]
            assert nxt.op == op_name, (op_name, nxt.op)
            tail.append(nxt)
            v = nxt.out
        assert params[norm_w] in tail[-1].inputs
        normed = tail[-1].out
        elsewhere = {where[n] for n in tail if where[n] is not grp}
        if not elsewhere:
            # (a) one kernel: it stores the normalised rows, never the statistics
            assert normed in grp.outputs
            assert not any(o.type.shape[-1] == 1 for o in grp.outputs), [o.type for o in grp.outputs]
            assert all(where[u].kind == "matmul" for u in users[normed])
        else:
            # (b) the statistics kernel writes the per-row statistic only; the normalisation
            # is a prologue of one projection kernel, whose matmul(s) read it as their A operand
            (proj,) = elsewhere
            assert proj.kind == "matmul"
            assert [tuple(o.type.shape) for o in grp.outputs] == [tuple(mean.out.type.shape)]
            moved = [n for n in tail if where[n] is proj]
            assert moved == tail[len(tail) - len(moved):]      # a suffix of the chain
            mms = [n for n in proj.nodes if n.op == "matmul"]
            assert mms and all(m.inputs[0] is normed for m in mms)
    # the MLP's gate and up projections share the normalised input in one kernel
    mlp = [g for g in fg.groups if sum(n.op == "matmul" for n in g.nodes) == 2]
    assert len(mlp) == 1 and {"silu", "mul"} <= {n.op for n in mlp[0].nodes}
    assert sum(g.kind == "flash" for g in fg.groups) == 1
    # the MLP's residual add rides on the down projection
    last = fg.groups[-1]
    assert last.kind == "matmul" and "add" in {n.op for n in last.nodes}
    assert last.outputs == tuple(fg.graph.outputs)


def test_moe_ffn_is_at_most_four_kernels_including_routing():
    op = example_op(MOE, "moe_ffn")
    assert op.kernel_count <= 4
    kinds = [g.kind for g in op.fused.groups]
    assert kinds == ["router", "moe_align", "moe", "moe"]
    router, align, up, down = op.fused.groups
    assert [n.op for n in router.nodes] == ["moe_router"] and router.nodes[0].attrs["softmax"] is True
    assert Counter(n.op for n in up.nodes) == Counter({"expert_gemm": 2, "silu": 1, "mul": 1})
    assert Counter(n.op for n in down.nodes)["expert_gemm"] == 1
    assert down.outputs == tuple(op.graph.outputs)       # the gated combine writes the result
    assert down.extra.get("zeroed") == tuple(op.graph.outputs)
    assert not any(n.op in ("topk", "expert_matmul") for n in op.fused.graph.nodes)


# -- properties of every plan ----------------------------------------------------------------------
@pytest.mark.parametrize("src, name", plan_ops())
@pytest.mark.parametrize("fuse_contractions", [True, False])
def test_every_compute_node_is_in_exactly_one_group(src, name, fuse_contractions):
    _, kg = kernel_graph_of(src, name)
    fg = fuse(kg, PassContext(fuse_contractions=fuse_contractions))
    seen = Counter(n for grp in fg.groups for n in grp.nodes)
    assert all(c == 1 for c in seen.values()), [n.op for n, c in seen.items() if c > 1]
    compute = [n for n in kg.nodes if node_class(n, fg.recompute) == "compute"]
    assert set(seen) == set(compute)
    # recomputed nodes are casts of parameters, redone by each kernel that reads them
    params = {p.value for p in kg.params}
    assert all(n.op == "cast" and n.inputs[0] in params for n in fg.recompute)
    # so no kernel recomputes a contraction another kernel (or itself twice) computes
    for op_name in CONTRACTIONS:
        nodes = [n for n in kg.nodes if n.op == op_name]
        assert sum(n.op == op_name for grp in fg.groups for n in grp.nodes) == len(nodes)
    # glue and host scalars are never group members
    assert not any(node_class(n, fg.recompute) != "compute" for grp in fg.groups for n in grp.nodes)


@pytest.mark.parametrize("src, name", plan_ops())
@pytest.mark.parametrize("fuse_contractions", [True, False])
def test_groups_run_in_dependency_order(src, name, fuse_contractions):
    """Every value a group reads is a parameter, a host scalar, computed inside the group, or
    stored by an earlier group; every graph result is stored by some group."""
    _, kg = kernel_graph_of(src, name)
    fg = fuse(kg, PassContext(fuse_contractions=fuse_contractions))
    producer = kg.producers()
    params = {p.value for p in kg.params}
    stored: set = set()
    for grp in fg.groups:
        inside = set(grp.nodes)
        for n in grp.nodes:
            for v in base_inputs(n, producer, set(), fg.recompute):
                if producer.get(v) in inside:
                    continue
                assert v in params or v in stored, \
                    f"{grp.name} reads {v} of {producer[v].op}, which no earlier group stores"
        for v in grp.outputs:
            assert v not in stored, f"{v} stored twice"
        stored |= set(grp.outputs)
        # and what it stores it computes (a copy group stores a view of earlier values)
        if grp.kind != "copy":
            assert all(producer[v] in inside for v in grp.outputs)
    for v in kg.outputs:
        assert v in stored or v in params
    assert len(fg.results) == len(kg.outputs)


def _has_two(shape, a, b) -> bool:
    names = [str(d) for d in shape]
    return (names.count(a) >= 2) if a == b else (a in names and b in names)


@pytest.mark.parametrize("src, name, s, t", [
    pytest.param(LLAMA, "attention", "S", "S", id="attention"),
    pytest.param(LLAMA, "llama_block", "S", "S", id="llama_block"),
    pytest.param(NONCAUSAL_ATTENTION, "attention_full", "S", "T", id="attention_full"),
])
def test_attention_scores_are_never_stored(src, name, s, t):
    g, kg = kernel_graph_of(src, name)
    # the unfused graph does have S x T scores...
    assert any(_has_two(v.type.shape, s, t) for n in g.nodes for v in n.outputs if not v.is_scalar)
    fg = fuse(kg)
    plan = build_plan(fg)
    # ...but no buffer of the plan (results, temporaries, scratch) is that big
    for buf in plan.buffers.values():
        assert not _has_two(buf.shape, s, t), (buf.name, buf.shape)
    for grp in fg.groups:
        for v in grp.outputs:
            assert not _has_two(v.type.shape, s, t)
    assert "softmax" not in {n.op for n in kg.nodes}


# -- the partitioner's switches ------------------------------------------------------------------
def run_fused(fg, ins, bindings) -> list:
    runner = PlanRunner(build_plan(fg), fg, KernelCache())
    return runner(ins, bindings, torch.device("cpu"))


UNFUSED_CASES = [
    pytest.param(LLAMA, "swiglu_mlp", dict(B=1, S=7, D=33, F=17), id="swiglu_mlp"),
    pytest.param(LLAMA, "llama_block", dict(B=1, S=7, D=18, H=3, E=6, F=33), id="llama_block"),
    pytest.param(MOE, "moe_ffn", dict(T=7, D=33, F=5, E=3), id="moe_ffn"),
    pytest.param(LORA, "lora_linear_gelu", dict(M=7, K=33, N=5, R=3), id="lora_linear_gelu"),
]


@pytest.mark.parametrize("src, name, sizes", UNFUSED_CASES)
def test_without_contraction_fusion_more_kernels_same_results(src, name, sizes):
    g, kg = kernel_graph_of(src, name)
    fused = fuse(kg)
    unfused = fuse(kg, PassContext(fuse_contractions=False))
    assert len(unfused.groups) > len(fused.groups)
    # no matmul group holds anything but its one contraction
    for grp in unfused.groups:
        if grp.kind in ("matmul", "moe"):
            assert len(grp.nodes) == 1, [n.op for n in grp.nodes]
    # the compiled op is the fused plan
    op = example_op(src, name)
    assert op.kernel_count == len(fused.groups)
    bindings = {s: sizes[s] for s in g.symbols}
    ins = random_inputs(g, bindings, seed=11)
    refs = run_graph(g, ins, bindings, check=True)
    out_fused = as_list(op(*call_args(g, ins)))
    out_unfused = run_fused(unfused, ins, bindings)
    check_outputs(g, out_fused, refs, " (fused)")
    check_outputs(g, out_unfused, refs, " (fuse_contractions=False)")


@pytest.mark.parametrize("limit", [1, 3, 6])
def test_max_group_nodes_bounds_every_group(limit):
    sizes = dict(B=1, S=5, D=18, H=3, E=6, F=7)
    g, kg = kernel_graph_of(LLAMA, "llama_block")
    fg = fuse(kg, PassContext(max_group_nodes=limit))
    assert all(len(grp.nodes) <= limit for grp in fg.groups)
    default = fuse(kg)
    assert max(len(grp.nodes) for grp in default.groups) > limit
    assert len(fg.groups) >= len(default.groups)
    assert {frozenset(grp.nodes) for grp in fg.groups} != {frozenset(grp.nodes) for grp in default.groups}
    if limit == 1:
        assert len(fg.groups) == sum(node_class(n, fg.recompute) == "compute" for n in kg.nodes)
    ins = random_inputs(g, sizes, seed=5)
    check_outputs(g, run_fused(fg, ins, sizes), run_graph(g, ins, sizes, check=True),
                  f" (max_group_nodes={limit})")


def test_fused_plan_reads_inputs_of_the_right_sizes():
    """The plan's input buffers are exactly the op's tensor parameters, at their shapes."""
    op = example_op(LLAMA, "llama_block")
    sizes = dict(B=2, S=3, D=8, H=2, E=4, F=5)
    inputs = {n: b for n, b in op.plan.buffers.items() if b.kind == "input"}
    assert set(inputs) == {p.name for p in op.graph.tensor_params}
    for p in op.graph.tensor_params:
        assert [evaluate(d, sizes) for d in inputs[p.name].shape] == [evaluate(d, sizes) for d in p.value.type.shape]
