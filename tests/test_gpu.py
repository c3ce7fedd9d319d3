"""The native GPU path (skipped without a CUDA GPU, so never run by CI): kernels compiled by
Triton for the device instead of interpreted, bf16 natively (the interpreter runs it only with
opforge's corrections), fp8 through
the GPU's own conversions and tensor cores, ``triton_op`` registration under torch.compile.

Inputs are made on the CPU (seeded, as everywhere else), moved to the GPU, and the outputs are
compared with the float64 reference executor on the CPU, within ``tolerance_for``: the same
rule as the interpreter tests. Run it with ``bash benchmarks/gpu_check.sh`` on a device machine.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import opforge
from opforge.frontend import load_program
from opforge.runtime.device import interpreting
from opforge.runtime.inputs import random_inputs
from opforge.runtime.reference import run_graph
from opforge.runtime.sizes import file_shapes
from opforge.runtime.tolerances import assert_close, tolerance_for

from .kernel_helpers import as_list, call_args, compile_spec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or interpreting(), reason="needs a CUDA GPU (kernels compiled natively)")]

EXAMPLES = Path(opforge.__file__).resolve().parent / "examples"
AWKWARD = {"llama": dict(B=1, S=37, D=72, H=3, E=24, F=97), "lora": dict(M=37, K=100, N=23, R=5),
           "moe": dict(T=37, D=72, F=50, E=4), "quant_linear": dict(M=37, K=256, N=23),
           "sparse_linear": dict(M=37, K=256, N=23)}


def example_ops():
    out = []
    for f in sorted(EXAMPLES.glob("*.opf")):
        for name in load_program(f).graphs:
            out.append(pytest.param(f.stem, name, id=f"{f.stem}-{name}"))
    return out


def to_gpu(values: dict) -> dict:
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in values.items()}


def run_on_gpu(op, sizes: dict, seed: int, values: dict | None = None):
    g = op.graph
    ins = values if values is not None else random_inputs(g, sizes, seed=seed)
    refs = run_graph(g, ins, sizes, check=True)
    outs = as_list(op(*call_args(g, to_gpu(ins))))
    tol = tolerance_for(g)
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert o.is_cuda
        assert_close(o.cpu(), r.cpu(), tol, f"{g.name} output {i} at {sizes}")


@pytest.mark.parametrize("dtype", [None, "bf16"])
@pytest.mark.parametrize("stem, name", example_ops())
def test_example_op_compiled_for_the_gpu(stem, name, dtype):
    path = EXAMPLES / f"{stem}.opf"
    options = {"ops": [name], **({"dtype": dtype} if dtype else {})}
    op = getattr(compile_spec(path.read_text(), f"gpu_{stem}", **options), name)
    op._warned = True           # layout ops called dense warn once; not this test's concern
    for sizes in (file_shapes(path), AWKWARD[stem]):
        run_on_gpu(op, {s: sizes[s] for s in op.graph.symbols}, seed=0)


LAYOUTS = ["@quant(int8)", "@quant(int8, act=int8)", "@quant(int4, group=64)", "@quant(fp8)",
           "@quant(fp8, act=fp8)", "@sparse(2:4)", "@sparse(block=32)", "@lowrank(rank=8)"]


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("annotation", LAYOUTS)
def test_bound_layouts_on_the_gpu(annotation, dtype):
    torch_dt = {"f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    src = (f"op f(x: {dtype}[M, K], w: {dtype}[N, K] {annotation}, b: {dtype}[N]) -> {dtype}[M, N] {{\n"
           f"    return x @ w.T + b\n}}\n")
    mod = compile_spec(src, "gpu_layout")
    gen = torch.Generator().manual_seed(0)
    n, k = 300, 448
    w = torch.randn(n, k, generator=gen).to(torch_dt)
    w[:64, :64] = 0
    b = torch.randn(n, generator=gen).to(torch_dt)
    layer = mod.f.bind(w=w.cuda(), b=b.cuda())
    for m in (1, 16, 129):
        x = torch.randn(m, k, generator=gen).to(torch_dt)
        values = {"x": x, "b": b, **{name: t.cpu() for name, t in layer.unpacked().items()}}
        ref = run_graph(mod.f.graph, values, {"M": m, "K": k, "N": n}, check=True)[0]
        assert_close(layer(x.cuda()).cpu(), ref, tolerance_for(mod.f.graph), f"{annotation} {dtype} M={m}")


def test_torch_compile_over_triton_op_registration(monkeypatch):
    monkeypatch.setenv("OPFORGE_REGISTRATION", "triton_op")
    src = ("op f(x: f16[M, D], w: f16[D]) -> f16[M, D] {\n"
           "    xf = cast(x, f32)\n"
           "    return cast(xf * rsqrt(mean(xf * xf, axis=-1, keepdim=true) + 1e-5), f16) * w\n}\n")
    mod = compile_spec(src, "gpu_triton_op")
    x, w = torch.randn(37, 4096, device="cuda", dtype=torch.float16), torch.randn(4096, device="cuda", dtype=torch.float16)
    eager = mod.f(x, w)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, w: mod.f(x, w) * 2.0, fullgraph=True)
    assert torch.equal(compiled(x, w), eager * 2.0)
    torch._dynamo.reset()
