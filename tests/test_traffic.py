"""Static figures of merit (issue 11, item 8; runtime/traffic.py): the bytes a kernel requests
from global memory, counted from its level-2 IR, grid and configuration. Held exact on kernels
counted by hand (a pointwise kernel requests its compulsory bytes; a GEMM reads A once per N
tile and B once per M tile), and against an independent count: the same kernels run through
Triton's interpreter with its load and store builders patched to add up the lanes each mask
lets through. The decode-shaped weight ratios are held at 1.1x for the layouts that read each
weight byte once (issue 11, items 2-3) and printed for the rest."""
from __future__ import annotations

import pytest
import torch

import opforge
from opforge.runtime.config import interpreter_config
from opforge.runtime.inputs import random_inputs
from opforge.runtime.traffic import kernel_traffic, op_traffic, weight_params

from .conftest import EXAMPLES
from .kernel_helpers import call_args, compiled, on_launch

POINTWISE = "op addmul(x: f32[M, N], y: f32[M, N]) -> f32[M, N] { return x * y + x }"
LINEAR = "op lin(x: f32[M, K], w: f32[N, K]) -> f32[M, N] { return x @ w.T }"


def cdiv(a, b):
    return -(-a // b)


def test_a_pointwise_kernel_requests_its_compulsory_bytes():
    op = compiled(POINTWISE, "tr_pw").addmul
    for sizes in ({"M": 37, "N": 45}, {"M": 1, "N": 5000}, {"M": 300, "N": 3}):
        t = op_traffic(op, sizes)
        assert t.exact and len(t.kernels) == 1
        assert t.requested == t.compulsory == 3 * sizes["M"] * sizes["N"] * 4, (sizes, t.requested)
        assert t.kernels[0].loaded == {"x": sizes["M"] * sizes["N"] * 4, "y": sizes["M"] * sizes["N"] * 4}


def test_a_gemm_reads_a_once_per_n_tile_and_b_once_per_m_tile():
    op = compiled(LINEAR, "tr_gemm").lin
    M, K, N = 70, 50, 90
    t = op_traffic(op, {"M": M, "K": K, "N": N})
    (k,) = t.kernels
    cfg = k.config.as_dict()
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    assert k.programs == cdiv(M, bm) * cdiv(N, bn)
    assert k.loaded == {"x": M * K * 4 * cdiv(N, bn), "w": N * K * 4 * cdiv(M, bm)}
    assert k.stored == {k.kernel.replace("lin_", "").replace("_matmul", "_matmul_out"): M * N * 4} or \
        sum(k.stored.values()) == M * N * 4
    assert t.weights == {"w": N * K * 4}                      # w is matmul's B operand
    assert t.weight_requested == N * K * 4 * cdiv(M, bm)
    assert t.compulsory == (M * K + N * K + M * N) * 4


def test_split_k_counts_each_programs_share_of_k():
    """Split-K: the third grid axis has SPLIT_K programs, each with a share of K (issue 11,
    item 5: no idle programs). The partials are written once per split and read once."""
    op = compiled(LINEAR, "tr_gemm").lin
    M, K, N = 3, 1030, 40
    t = op_traffic(op, {"M": M, "K": K, "N": N})
    partial, reduce = t.kernels
    split = partial.config.as_dict()["SPLIT_K"]
    bn = partial.config.as_dict()["BLOCK_N"]
    assert split > 1 and partial.programs == cdiv(N, bn) * split
    assert partial.loaded == {"x": M * K * 4 * cdiv(N, bn), "w": N * K * 4}
    assert sum(partial.stored.values()) == split * M * N * 4
    assert sum(reduce.loaded.values()) == split * M * N * 4 and sum(reduce.stored.values()) == M * N * 4


def test_weights_are_bound_parameters_and_b_operands():
    mod = compiled((EXAMPLES / "llama.opf").read_text(), "tr_w", ops=["swiglu_mlp", "attention", "rms_norm"])
    assert weight_params(mod.swiglu_mlp.graph) == {"wg", "wu", "wd"}
    assert weight_params(mod.attention.graph) == {"k", "v"}
    assert weight_params(mod.rms_norm.graph) == set()
    q4 = compiled((EXAMPLES / "quant_linear.opf").read_text(), "tr_q4", ops=["linear_q4"]).linear_q4
    layer = q4.bind(w=torch.randn(48, 256, dtype=torch.float16))
    t = layer._packed.traffic({"M": 5})
    assert set(t.weights) == {"w_packed", "w_scale", "w_zero"}
    assert t.weight_bytes == 48 * 128 + 48 * 4 * 2 + 48 * 4


# -- against the interpreter ---------------------------------------------------------------------------
@pytest.fixture
def counted_run(monkeypatch):
    """Run a call through Triton's interpreter, counting per kernel the bytes its masked loads
    and stores (and atomic adds) request: the lanes each mask lets through times the element
    size, as the interpreter executes them program by program."""
    from opforge.runtime.device import interpreting
    interpreting()                  # TRITON_INTERPRET before triton.language is imported (it reads it)
    from triton.runtime import interpreter as itp
    B = itp.InterpreterBuilder
    counts: dict = {}
    current = [None]

    def size_of(ptrs):
        return max(1, ptrs.get_element_ty().primitive_bitwidth // 8)

    def add(kind, ptrs, mask):
        n = int(mask.data.sum()) if mask is not None else int(ptrs.data.size)
        c = counts.setdefault(current[0], {"loaded": 0, "stored": 0})
        c[kind] += n * size_of(ptrs)
    load, store, rmw = B.create_masked_load, B.create_masked_store, B.create_atomic_rmw

    def masked_load(self, ptrs, mask, other, *a):
        add("loaded", ptrs, mask)
        return load(self, ptrs, mask, other, *a)

    def masked_store(self, ptrs, value, mask, *a):
        add("stored", ptrs, mask)
        return store(self, ptrs, value, mask, *a)

    def atomic_rmw(self, op, ptr, val, mask, *a):
        add("stored", ptr, mask)
        return rmw(self, op, ptr, val, mask, *a)
    monkeypatch.setattr(B, "create_masked_load", masked_load)
    monkeypatch.setattr(B, "create_masked_store", masked_store)
    monkeypatch.setattr(B, "create_atomic_rmw", atomic_rmw)

    def run(op, call):
        counts.clear()
        with on_launch(op, lambda kc: current.__setitem__(0, kc.name)):
            call()
        return dict(counts)
    return run


CASES = [
    pytest.param(POINTWISE, "addmul", {"M": 37, "N": 45}, id="pointwise"),
    pytest.param(LINEAR, "lin", {"M": 33, "K": 70, "N": 40}, id="gemm"),
    pytest.param(LINEAR, "lin", {"M": 3, "K": 1030, "N": 40}, id="gemm_split_k"),
    pytest.param(EXAMPLES / "llama.opf", "rms_norm", {"B": 2, "S": 5, "D": 40}, id="rms_norm"),
    pytest.param(EXAMPLES / "llama.opf", "swiglu_mlp", {"B": 2, "S": 3, "D": 40, "F": 24}, id="swiglu_mlp"),
    pytest.param(EXAMPLES / "llama.opf", "attention", {"B": 1, "H": 2, "S": 37, "E": 16}, id="causal_attention"),
    pytest.param(EXAMPLES / "llama.opf", "rotary", {"B": 1, "H": 2, "S": 9, "E": 16}, id="rotary"),
    pytest.param("op emb(tab: f32[V, D], ids: i64[T]) -> f32[T, D] { return tab[ids] * 2.0 }", "emb",
                 {"V": 50, "D": 24, "T": 13}, id="gather"),
    pytest.param("op sm(x: f32[R, C]) -> f32[R, C] { return softmax(x, axis=-1) }", "sm", {"R": 2, "C": 16390},
                 id="softmax_looped"),
    pytest.param(EXAMPLES / "moe.opf", "moe_ffn", {"T": 9, "D": 16, "F": 20, "E": 4}, id="moe_ffn"),
]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("src, name, sizes", CASES)
def test_the_static_count_agrees_with_the_interpreter(counted_run, src, name, sizes):
    """Exact kernels: the same bytes as the interpreter counts (with the interpreter's
    configuration); kernels whose masks depend on data: at least as many (an upper bound)."""
    text = src.read_text() if hasattr(src, "read_text") else src
    op = getattr(compiled(text, f"tr_{name}", ops=[name]), name)
    ins = random_inputs(op.graph, sizes, seed=0)
    if name == "emb":
        ins["ids"] = torch.randint(0, sizes["V"], (sizes["T"],))
    ran = counted_run(op, lambda: op(*call_args(op.graph, ins)))
    static = op_traffic(op, sizes, config_of=interpreter_config)
    assert [k.kernel for k in static.kernels] == list(ran), (list(ran), [k.kernel for k in static.kernels])
    for k in static.kernels:
        got = ran[k.kernel]
        if k.exact:
            assert (sum(k.loaded.values()), sum(k.stored.values())) == (got["loaded"], got["stored"]), k.kernel
        else:
            assert sum(k.loaded.values()) >= got["loaded"] and sum(k.stored.values()) >= got["stored"], k.kernel
    assert static.exact == (name != "moe_ffn")


def test_a_bound_layout_kernel_agrees_with_the_interpreter(counted_run):
    mod = compiled((EXAMPLES / "quant_linear.opf").read_text(), "tr_layouts", ops=["linear_q4", "linear_int8"])
    for name in ("linear_q4", "linear_int8"):
        layer = getattr(mod, name).bind(w=torch.randn(48, 256, dtype=torch.float16))
        x = torch.randn(5, 256, dtype=torch.float16)
        rest = [torch.randn(48, dtype=torch.float16)] if "bias" in layer.free else []
        ran = counted_run(layer._packed, lambda: layer(x, *rest))
        static = op_traffic(layer._packed, {"M": 5}, config_of=interpreter_config)
        for k in static.kernels:
            assert k.exact and (sum(k.loaded.values()), sum(k.stored.values())) == \
                (ran[k.kernel]["loaded"], ran[k.kernel]["stored"]), (name, k.kernel)


# -- the figures explain() prints, and the decode-shaped weight ratios --------------------------------
def test_explain_prints_the_bytes_requested():
    op = compiled((EXAMPLES / "llama.opf").read_text(), "tr_explain", ops=["rms_norm"]).rms_norm
    op.default_sizes = {"B": 2, "S": 33, "D": 64}
    text = op.explain()
    assert "== bytes requested ==" in text and "heuristic_config" in text
    assert "rms_norm__f16_k0_mul:" in text and "compulsory" in text      # its f16 binding's kernel
    assert "S=7" in op.explain(sizes={"B": 1, "S": 7, "D": 4096})
    op.default_sizes = {}
    assert "pass explain(sizes=" in op.explain()


# every layout's weight is read about once at decode shapes (issue 11's bound)
ONCE = ("dense", "w8a8", "fp8act", "int8", "fp8", "int4", "24")


def test_decode_weight_ratios():
    """Weight bytes requested / weight bytes at M = 1 and 16 (N = K = 4096) and for
    ``swiglu_mlp`` at B = 32, S = 1 (batch folded into M): at most 1.1x for every layout (each
    weight byte read about once), and at least 1x; printed with -s."""
    from opforge.benchmarks.static import DECODE, workload_traffic
    from opforge.benchmarks.workloads import WORKLOADS
    rows = []
    for w in WORKLOADS:
        if w.group == "layouts" and w.sizes["M"] in (1, 16) and w.sizes["N"] == 4096:
            t = workload_traffic(w.name, w.spec, w.op, w.sizes, w.weights)
            rows.append((w.name, w.name.split("_")[1], t.weight_requested / t.weight_bytes))
    for name, spec, op, sizes in DECODE:
        t = workload_traffic(name, spec, op, sizes)
        rows.append((name, "dense", t.weight_requested / t.weight_bytes))
    print("\ndecode-shaped weight bytes requested / weight bytes (heuristic config):")
    for name, kind, r in rows:
        print(f"  {name:28s} {r:6.2f}x")
    assert {kind for _, kind, _ in rows} == set(ONCE)
    assert all(r >= 1.0 for _, _, r in rows)        # every weight byte is read at least once
    over = [(name, round(r, 2)) for name, _, r in rows if r > 1.1]
    assert not over, over


@pytest.mark.parametrize("name, sizes", [("gla", {"S": 9, "H": 2, "E": 5, "F": 37}),
                                         ("gru", {"S": 6, "B": 3, "I": 4, "F": 7})])
def test_a_scans_one_kernel_agrees_with_the_interpreter(counted_run, name, sizes):    # examples/{name}.opf
    """An op with a scan, called without gradients: the static count of its segments and the
    scan's one kernel (passes/lower_recurrence.py, a loop over the steps) against the bytes
    the interpreter's loads and stores move."""
    from opforge.runtime.scan import ScanPiece
    op = getattr(compiled((EXAMPLES / f"{name}.opf").read_text(), f"tr_scan_{name}", ops=[name]), name)
    ins = random_inputs(op.graph, sizes, seed=0)
    ran = {}
    for p in op.pieces:
        part = p.fused if isinstance(p, ScanPiece) else p.op
        ran.update(counted_run(part, lambda: op(*call_args(op.graph, ins))))
    static = op_traffic(op, sizes, config_of=interpreter_config)
    assert [k.kernel for k in static.kernels] == list(ran), (list(ran), [k.kernel for k in static.kernels])
    assert any("_fused_k0_scan" in k.kernel for k in static.kernels)      # the chunked form for GLA
    for k in static.kernels:
        assert k.exact and (sum(k.loaded.values()), sum(k.stored.values())) == \
            (ran[k.kernel]["loaded"], ran[k.kernel]["stored"]), k.kernel
