"""The kernels of packed weight layouts (issue 5), on the CPU through Triton's interpreter.

Every layout's bound op (``mod.op.bind(w=W)``, a ``BoundOp``) is run at awkward sizes (M in 1,
7, 33; K not a multiple of the kernel's blocks where the layout allows it; N odd) and compared
with the float64 reference executor run on the dense weight the kernels use
(``layer.unpacked()``), within ``tolerance_for`` of the spec (which adds ``ACTIVATION_INT8`` or
``ACTIVATION_FP8`` for W8A8 in int8 or fp8). Outputs start poisoned, so every element must be written.

Then the module behaviour: state_dict save/load, ``.to()``, ``torch.compile(fullgraph=True)``,
the unbound op run dense with one warning, and the plan: the dequantisation happens inside the
GEMM (one kernel for weight-only layouts, no buffer holding a dense copy of the weight).
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import pytest
import torch

from opforge.ir.types import DType
from opforge.runtime.reference import run_graph
from opforge.runtime.tolerances import TOLERANCES, assert_close, tolerance_for

from .kernel_helpers import compiled

F16, F32 = torch.float16, torch.float32
MS = (1, 7, 33)


@dataclass(frozen=True)
class Case:
    id: str
    annotation: str
    k: int
    n: int = 37
    bias: bool = True
    dtype: str = "f16"
    zero_blocks: int = 0       # block size whose (some) blocks are made all-zero

    def source(self) -> str:
        t = self.dtype
        b = f", b: {t}[N]" if self.bias else ""
        return (f"op f(x: {t}[M, K], w: {t}[N, K] {self.annotation}{b}) -> {t}[M, N] {{\n"
                f"    return x @ w.T{' + b' if self.bias else ''}\n}}\n")


CASES = [
    Case("int8", "@quant(int8)", k=45),
    Case("int8-nobias", "@quant(int8)", k=130, n=19, bias=False),
    Case("w8a8", "@quant(int8, act=int8)", k=45, bias=False),
    Case("w8a8-bias", "@quant(int8, act=int8)", k=70, n=21),
    Case("w8a8fp8", "@quant(fp8, act=fp8)", k=45, bias=False),
    Case("w8a8fp8-bias", "@quant(fp8, act=fp8)", k=70, n=21),
    Case("int4-g32", "@quant(int4, group=32)", k=160),
    Case("int4-g64", "@quant(int4, group=64)", k=192, bias=False),
    Case("int4-g128", "@quant(int4, group=128)", k=384),
    Case("int4-g8", "@quant(int4, group=8)", k=40, n=9),
    Case("fp8", "@quant(fp8)", k=45),
    Case("fp8-nobias", "@quant(fp8)", k=33, n=5, bias=False),
    Case("s24", "@sparse(2:4)", k=52),
    Case("s24-nobias", "@sparse(2:4)", k=100, n=3, bias=False),
    Case("bsr16", "@sparse(block=16)", k=40, zero_blocks=16),
    Case("bsr32", "@sparse(block=32)", k=70, n=45, bias=False, zero_blocks=32),
    Case("bsr16-dense", "@sparse(block=16)", k=33, n=17, bias=False),
    Case("lowrank1", "@lowrank(rank=1)", k=45, bias=False),
    Case("lowrank5", "@lowrank(rank=5)", k=45),
    Case("lowrank-full", "@lowrank(rank=37)", k=45),
    Case("lowrank-tol", "@lowrank(tol=0.3)", k=45),
    Case("lowrank-tol-nobias", "@lowrank(tol=0.05)", k=40, n=21, bias=False),
    # bf16 activations and weights (the interpreter with opforge's bf16 corrections)
    Case("int8-bf16", "@quant(int8)", k=45, dtype="bf16"),
    Case("int4-g32-bf16", "@quant(int4, group=32)", k=160, dtype="bf16"),
    Case("int4-g64-bf16", "@quant(int4, group=64)", k=192, bias=False, dtype="bf16"),
    Case("fp8-bf16", "@quant(fp8)", k=45, dtype="bf16"),
    Case("w8a8-bf16", "@quant(int8, act=int8)", k=70, n=21, dtype="bf16"),
    Case("w8a8fp8-bf16", "@quant(fp8, act=fp8)", k=45, bias=False, dtype="bf16"),
    Case("s24-bf16", "@sparse(2:4)", k=52, dtype="bf16"),
    Case("bsr16-bf16", "@sparse(block=16)", k=40, dtype="bf16", zero_blocks=16),
    Case("lowrank5-bf16", "@lowrank(rank=5)", k=45, dtype="bf16"),
    # f32 specs
    Case("int4-g32-f32", "@quant(int4, group=32)", k=96, dtype="f32"),
    Case("w8a8-f32", "@quant(int8, act=int8)", k=45, dtype="f32", bias=False),
    Case("w8a8fp8-f32", "@quant(fp8, act=fp8)", k=45, dtype="f32"),
    Case("s24-f32", "@sparse(2:4)", k=52, dtype="f32"),
    Case("bsr16-f32", "@sparse(block=16)", k=40, dtype="f32", zero_blocks=16),
    Case("lowrank-f32", "@lowrank(rank=6)", k=45, dtype="f32"),
]

TORCH = {"f16": F16, "f32": F32, "bf16": torch.bfloat16}


def make_weight(case: Case, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(case.n, case.k, generator=g).to(TORCH[case.dtype])
    if case.zero_blocks:
        b = case.zero_blocks
        w[:b, :b] = 0                         # a zero block
        w[b:2 * b] = 0                        # a whole block row of zeros (its outputs are the epilogue's)
        w[2 * b:, b:2 * b] = 0                # a zero block in the last, partial block row
    return w


def module(case: Case):
    return compiled(case.source(), f"layout_{case.id}")


def bind(case: Case, seed: int = 0):
    mod = module(case)
    w = make_weight(case, seed)
    weights = {"w": w}
    if case.bias:
        weights["b"] = torch.randn(case.n, generator=torch.Generator().manual_seed(seed + 1)).to(TORCH[case.dtype])
    return mod, mod.f.bind(**weights), weights


def reference(mod, layer, x, weights):
    values = {"x": x, **layer.unpacked()}
    if "b" in weights:
        values["b"] = weights["b"]
    n, k = weights["w"].shape
    return run_graph(mod.f.graph, values, {"M": x.shape[0], "K": k, "N": n}, check=True)[0]


def activations(m, k, dtype, seed):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bound_layout_against_the_reference(case):
    mod, layer, weights = bind(case)
    dtype = TORCH[case.dtype]
    assert layer.free == ["x"] and str(layer.layouts["w"]) == case.annotation
    tol = tolerance_for(mod.f.graph)
    for m in MS:
        x = activations(m, case.k, dtype, seed=m)
        y = layer(x)
        assert y.dtype == dtype and y.shape == (m, case.n)
        assert_close(y, reference(mod, layer, x, weights), tol, f"{case.id} M={m}")
        if not case.zero_blocks:
            continue
        # the zero block row's outputs are the bias alone (or zero)
        b = case.zero_blocks
        width = min(2 * b, case.n) - b
        want = weights["b"][b:2 * b].expand(m, -1) if case.bias else torch.zeros(m, width, dtype=dtype)
        assert torch.equal(y[:, b:2 * b], want), f"{case.id} M={m}: the all-zero block row"


INT4_STEP = r"""
CHECK: {{^    }}for k0 in range({{[^)]*}}, BLOCK_K * 2):
CHECK-NEXT: ks_even = k0 + rk * 2
CHECK-NEXT: ks_odd = ks_even + 1
CHECK-COUNT-1: w_packed_ptr + cols
CHECK: lo = w_packed_tile & 15
CHECK-NEXT: hi = w_packed_tile >> 4
CHECK-COUNT-1: w_zero_row = tl.load(
CHECK-COUNT-1: w_scale_row = tl.load(
CHECK-COUNT-2: tl.dot(
"""


@pytest.mark.parametrize("group, k, sizes", [(32, 2080, [(1, 1), (2, 1)]), (64, 192, [(3, 5), (1, 70)]),
                                             (128, 384, [(4, 1)])],
                         ids=["g32-split-k", "g64-folded", "g128-decode"])
def test_int4_reads_each_packed_byte_once_per_step(group, k, sizes):
    """int4 (issue 11, item 3): a K step of 2 * BLOCK_K loads the packed bytes once as a
    [BLOCK_K, BLOCK_N] tile, splits the low (even k) and high (odd k) nibbles into two dots, and
    loads each group's scale and zero as one row; K long enough for split-K (g32) and batch
    axes folded into M. Every kernel with a dot has the step, and the results match."""
    from .filecheck import filecheck, split_kernels
    src = (f"op f(x: f16[B, M, K], w: f16[N, K] @quant(int4, group={group})) -> f16[B, M, N] "
           "{ return x @ w.T }")
    mod = compiled(src, f"layout_int4_step_{group}")
    w = torch.randn(45, k, generator=torch.Generator().manual_seed(5)).to(F16)
    layer = mod.f.bind(w=w)
    kernels = split_kernels(layer._packed.stage_text("triton"))
    dots = [t for t in kernels.values() if "tl.dot(" in t]
    assert dots
    for text in dots:
        filecheck(text, INT4_STEP)
    tol = tolerance_for(mod.f.graph)
    for b, m in sizes:
        x = torch.randn(b, m, k, generator=torch.Generator().manual_seed(b * 100 + m)).to(F16)
        values = {"x": x, **layer.unpacked()}
        want = run_graph(mod.f.graph, values, {"B": b, "M": m, "K": k, "N": 45}, check=True)[0]
        assert_close(layer(x), want, tol, f"int4 g{group} B={b} M={m}")


S24_STEP = r"""
CHECK: {{^    }}for k0 in range({{[^)]*}}, BLOCK_K * 8):
CHECK-NEXT: ks_p0 = k0 + rk * 8
CHECK-COUNT-4: w_values_ptr + cols
CHECK-COUNT-1: w_meta_ptr + cols
CHECK-COUNT-8: tl.dot(
"""


@pytest.mark.parametrize("k, sizes", [(2052, [(1, 1), (2, 1)]), (100, [(3, 5), (1, 70)])],
                         ids=["split-k-half-meta-byte", "folded"])
def test_s24_reads_values_and_metadata_once_per_step(k, sizes):
    """2:4 (issue 11, item 3): a K step of 8 * BLOCK_K loads each metadata byte (two groups of
    four k) and the four kept values under it once, and runs one dot per phase k % 8, its tile
    the kept value at that position or 0. K = 2052 ends in half a metadata byte and splits K."""
    from .filecheck import filecheck, split_kernels
    src = "op f(x: f16[B, M, K], w: f16[N, K] @sparse(2:4)) -> f16[B, M, N] { return x @ w.T }"
    mod = compiled(src, "layout_s24_step")
    w = torch.randn(37, k, generator=torch.Generator().manual_seed(6)).to(F16)
    layer = mod.f.bind(w=w)
    dots = [t for t in split_kernels(layer._packed.stage_text("triton")).values() if "tl.dot(" in t]
    assert dots
    for text in dots:
        filecheck(text, S24_STEP)
    tol = tolerance_for(mod.f.graph)
    for b, m in sizes:
        x = torch.randn(b, m, k, generator=torch.Generator().manual_seed(b * 10 + m)).to(F16)
        values = {"x": x, **layer.unpacked()}
        want = run_graph(mod.f.graph, values, {"B": b, "M": m, "K": k, "N": 37}, check=True)[0]
        assert_close(layer(x), want, tol, f"2:4 B={b} M={m}")


def test_int4_with_groups_under_32_keeps_the_generic_loop():
    src = "op f(x: f16[M, K], w: f16[N, K] @quant(int4, group=16)) -> f16[M, N] { return x @ w.T }"
    layer = compiled(src, "layout_int4_g16").f.bind(w=torch.randn(9, 48).to(F16))
    text = layer._packed.stage_text("triton")
    assert "ks_even" not in text and "nibble" in text


def test_block_sparse_kernel_with_an_all_zero_weight():
    case = Case("bsr16-zero", "@sparse(block=16)", k=40)
    mod = module(case)
    b = torch.randn(case.n, dtype=F16)
    layer = mod.f.bind(w=torch.zeros(case.n, case.k, dtype=F16), b=b)
    assert layer.w_blocks.shape[0] == 0
    for m in MS:
        assert torch.equal(layer(activations(m, case.k, F16, m)), b.expand(m, -1))


def w8a8_emulation(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W8A8 as DSL.md describes it, in float64 after the quantization: activations per row to
    int8 with a step of max|x| / 127, int8 x int8 products summed exactly, then both scales."""
    xf = x.float()
    sx = (xf.abs().amax(dim=-1, keepdim=True) / 127.0).clamp_min(1e-30)
    xq = torch.round(xf / sx).to(torch.int64)
    acc = xq @ q.to(torch.int64).T
    return acc.double() * sx.double() * scale.double()


@pytest.mark.parametrize("dtype", ["f16", "f32"])
def test_w8a8_quantizes_activations_per_row(dtype):
    """Against an emulation of the int8 arithmetic, the kernel is as close as any f16/f32
    kernel to its float64 reference: the extra W8A8 tolerance is only the activation rounding."""
    case = Case(f"w8a8-emul-{dtype}", "@quant(int8, act=int8)", k=70, n=21, bias=False, dtype=dtype)
    mod, layer, weights = bind(case)
    for m in MS:
        x = activations(m, case.k, TORCH[dtype], seed=10 + m)
        if m > 1:
            x[1] = 0                                  # an all-zero row quantizes to 0, not NaN
        y = layer(x)
        want = w8a8_emulation(x, layer.w_q, layer.w_scale)
        assert_close(y, want, TOLERANCES[DType.f16 if dtype == "f16" else DType.f32], f"W8A8 M={m}")
        if m > 1:
            assert not y[1].any()
        # the activation rounding is visible: the output is not the weight-only int8 result
        ref = reference(mod, layer, x, weights)
        assert_close(y, ref, tolerance_for(mod.f.graph), f"W8A8 M={m} against the reference")


@pytest.mark.parametrize("annotation,k", [("@sparse(block=16)", 40), ("@lowrank(rank=3)", 45),
                                          ("@quant(int4, group=8)", 40), ("@quant(int8, act=int8)", 45),
                                          ("@quant(fp8, act=fp8)", 45),
                                          ("@sparse(2:4)", 44)])
def test_leading_axes_of_x_are_rows(annotation, k):
    src = f"op f(x: f16[B, M, K], w: f16[N, K] {annotation}) -> f16[B, M, N] {{ return x @ w.T }}"
    mod = compiled(src, "layout_batched")
    w = torch.randn(37, k, generator=torch.Generator().manual_seed(3)).to(F16)
    w[:16, :16] = 0
    layer = mod.f.bind(w=w)
    for b, m in [(3, 5), (2, 1)]:
        x = torch.randn(b, m, k, generator=torch.Generator().manual_seed(b)).to(F16)
        ref = run_graph(mod.f.graph, {"x": x, **layer.unpacked()}, {"B": b, "M": m, "K": k, "N": 37}, check=True)[0]
        assert_close(layer(x), ref, tolerance_for(mod.f.graph), f"{annotation} x [{b}, {m}, {k}]")


@pytest.mark.parametrize("annotation", ["@sparse(block=16)", "@lowrank(rank=4)", "@quant(int4, group=8)",
                                        "@quant(int8, act=int8)", "@quant(fp8, act=fp8)"])
def test_layouts_take_a_pointwise_epilogue(annotation):
    src = (f"op f(x: f16[M, K], w: f16[N, K] {annotation}, b: f16[N]) -> f16[M, N] {{\n"
           f"    return silu(x @ w.T + b) * 2.0\n}}")
    mod = compiled(src, "layout_epilogue")
    w = torch.randn(37, 40, generator=torch.Generator().manual_seed(4)).to(F16)
    b = torch.randn(37, generator=torch.Generator().manual_seed(5)).to(F16)
    layer = mod.f.bind(w=w, b=b)
    assert len(layer._packed.plan.steps) == (2 if "act" in annotation else 1), "the epilogue is fused"
    x = activations(33, 40, F16, 6)
    ref = run_graph(mod.f.graph, {"x": x, **layer.unpacked()}, {"M": 33, "K": 40, "N": 37}, check=True)[0]
    assert_close(layer(x), ref, tolerance_for(mod.f.graph), annotation)


def test_prologue_layouts_allow_any_use_of_the_weight():
    """Dequantising layouts rebuild the weight, so it may be used outside a matmul too."""
    src = ("op f(x: f16[M, K], w: f16[N, K] @quant(int4, group=8)) -> f16[M, N] {\n"
           "    return x @ w.T + sum(w, axis=1)\n}")
    mod = compiled(src, "layout_prologue_use")
    w = torch.randn(21, 40, generator=torch.Generator().manual_seed(8)).to(F16)
    layer = mod.f.bind(w=w)
    x = activations(7, 40, F16, 9)
    ref = run_graph(mod.f.graph, {"x": x, **layer.unpacked()}, {"M": 7, "K": 40, "N": 21}, check=True)[0]
    assert_close(layer(x), ref, tolerance_for(mod.f.graph), "x @ w.T + sum(w)")


# -- module behaviour ---------------------------------------------------------------------------
STATE_CASES = [c for c in CASES if c.id in ("int8", "w8a8", "int4-g32", "fp8", "w8a8fp8", "s24", "bsr16", "lowrank5")]


@pytest.mark.parametrize("case", STATE_CASES, ids=[c.id for c in STATE_CASES])
def test_state_dict_saves_and_loads(case):
    mod, first, weights = bind(case, seed=0)
    if case.zero_blocks:
        # another weight with as many non-zero blocks, elsewhere (so the packed shapes agree)
        other = torch.randn(case.n, case.k, generator=torch.Generator().manual_seed(1)).to(F16)
        b = case.zero_blocks
        other[b:2 * b] = 0
        other[:b, b:2 * b] = 0
        other[2 * b:, :b] = 0
        second = mod.f.bind(w=other, b=torch.randn(case.n, dtype=F16))
        assert second.w_blocks.shape == first.w_blocks.shape
        assert not torch.equal(second.w_col_idx, first.w_col_idx)
    else:
        _, second, _ = bind(case, seed=1)
    x = activations(7, case.k, F16, seed=2)
    y_first = first(x)
    assert not torch.equal(second(x), y_first)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    # the packed tensors are buffers; a dense bias is a Parameter (trainable): both are saved
    assert set(first.state_dict()) == {name for name, _ in first.named_buffers()} | \
        {name for name, _ in first.named_parameters()}
    assert {name for name, _ in first.named_parameters()} == ({"b"} if case.bias else set())
    buf.seek(0)
    result = second.load_state_dict(torch.load(buf))
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(second(x), y_first)
    for name, t in first.state_dict().items():
        assert torch.equal(second.state_dict()[name], t), name
    assert_close(second.unpacked()["w"], first.unpacked()["w"].double(), TOLERANCES[DType.f64], "unpacked after load")


def test_to_keeps_working_on_the_cpu():
    case = CASES[0]
    mod, layer, weights = bind(case)
    x = activations(7, case.k, F16, 1)
    y = layer(x)
    assert layer.to("cpu") is layer
    assert torch.equal(layer(x), y)
    assert torch.equal(layer.to(torch.device("cpu"))(x), y)
    assert torch.equal(layer.cpu()(x), y)
    assert layer.w_q.dtype == torch.int8 and layer.w_scale.dtype == F32
    assert all(t.device.type == "cpu" for t in layer.state_dict().values())


def test_to_a_dtype_keeps_the_packed_tensors_as_they_are():
    case = CASES[0]
    mod, layer, weights = bind(case)
    x = activations(7, case.k, F16, 1)
    y = layer(x)
    assert torch.equal(layer.half()(x), y)


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("int4-g32", "bsr16", "w8a8", "w8a8fp8")],
                         ids=["int4-g32", "bsr16", "w8a8", "w8a8fp8"])
def test_torch_compile_fullgraph_around_a_bound_layer(case):
    torch._dynamo.reset()
    mod, layer, weights = bind(case)
    xs = [activations(m, case.k, F16, seed=20 + m) for m in (7, 33)]
    eager = [layer(x) for x in xs]

    def f(x):
        return layer(x) * 2.0 + 1.0

    compiled_fn = torch.compile(f, fullgraph=True)
    compiled_layer = torch.compile(layer, fullgraph=True)
    for x, y in zip(xs, eager):
        assert torch.equal(compiled_layer(x), y)
        assert torch.equal(compiled_fn(x), y * 2.0 + 1.0)
    torch._dynamo.reset()


def test_the_unbound_op_runs_dense_and_warns_once():
    case = Case("unbound", "@quant(int4, group=8)", k=40)
    mod = compiled(case.source(), "layout_unbound")
    w = make_weight(case)
    b = torch.randn(case.n, dtype=F16)
    x = activations(7, case.k, F16, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1 = mod.f(x, w, b)
        y2 = mod.f(x, w, b)
    mine = [c for c in caught if "passed dense" in str(c.message)]
    assert len(mine) == 1, [str(c.message) for c in caught]
    msg = str(mine[0].message)
    assert "'w' @quant(int4, group=8)" in msg and ".bind(w=" in msg
    dense_ref = run_graph(mod.f.graph, {"x": x, "w": w, "b": b}, {"M": 7, "K": 40, "N": 37}, check=True)[0]
    tol = tolerance_for(mod.f.graph)
    assert_close(y1, dense_ref, tol, "the unbound op on the dense weight")
    assert torch.equal(y1, y2)
    # ... which the quantized layer is not: int4 with groups of 8 moves the outputs well beyond it
    layer = mod.f.bind(w=w, b=b)
    with pytest.raises(AssertionError):
        assert_close(layer(x), dense_ref, tol, "the bound layer against the dense weight")


# -- the plan: no dense copy of the weight ------------------------------------------------------
WEIGHT_ONLY = ("int8", "int4-g32", "int4-g128", "fp8", "s24", "bsr16", "lowrank5", "lowrank-tol",
               "int4-g32-f32")
PLAN_CASES = [c for c in CASES if c.id in WEIGHT_ONLY + ("w8a8-bias",)]


@pytest.mark.parametrize("case", PLAN_CASES, ids=[c.id for c in PLAN_CASES])
def test_the_kernel_reads_the_packed_weight_and_never_a_dense_copy(case):
    mod, layer, weights = bind(case)
    packed = layer._packed
    n, k = case.n, case.k
    dense_shapes = {(n, k), (k, n)}
    packed_names = {name for name, _ in layer.named_buffers() if name.startswith("w_")}
    assert packed_names, "the weight is packed"
    inputs = {name for name, buf in packed.plan.buffers.items() if buf.kind == "input"}
    assert packed_names <= inputs and "w" not in inputs
    for name, buf in packed.plan.buffers.items():
        if buf.kind == "input":
            continue
        shape = tuple(int(d) if isinstance(d, int) else None for d in buf.shape)
        assert not (shape in dense_shapes and buf.dtype.is_float), (
            f"{case.id}: buffer {name} {buf.dtype}{list(buf.shape)} ({buf.kind}) has the dense weight's shape")
        assert not (shape in dense_shapes and buf.dtype in (DType.f16, DType.f32, DType.i8, DType.u8)), name
    if case.id in WEIGHT_ONLY:
        assert len(packed.fused.groups) == 1, f"{case.id}: {[g.name for g in packed.fused.groups]}"
        assert len(packed.plan.steps) == 1
        group = packed.fused.groups[0]
        assert group.kind in ("matmul", "bsr_matmul", "lowrank_matmul") or any(
            nd.op in ("matmul", "bsr_matmul", "lowrank_matmul") for nd in group.nodes)
        # every launch alternative reads the packed tensors themselves
        for launch in packed.plan.steps[0]:
            assert packed_names <= set(launch.reads), (launch.reads, packed_names)
        if case.annotation.startswith("@quant") or case.annotation == "@sparse(2:4)":
            ops = {nd.op for nd in group.nodes}
            assert "matmul" in ops, ops       # the dequantisation is in the GEMM's group
    else:
        # W8A8: the activation quantization, then the int8 GEMM; the weight is read as int8
        assert len(packed.plan.steps) == 2
        assert any(nd.op == "matmul_i32" for g in packed.fused.groups for nd in g.nodes)
        last = packed.plan.steps[-1]
        for launch in last:
            assert {"w_q", "w_scale"} <= set(launch.reads)
