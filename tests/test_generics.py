"""Dtype-generic ops (issue 13, item 2): ``op rms_norm<T: f16 | bf16 | f32>(...)``: the front
end builds and checks one graph per binding; a call picks the binding from the arguments'
dtypes, compiles it once and runs it; ``torch.ops.<ns>.<op>`` is one op (torch.compile,
autograd); calls between ops pick bindings too."""
from __future__ import annotations

import pytest
import torch

import opforge
from opforge.frontend import load_program
from opforge.frontend.diagnostics import SpecError
from opforge.ir.types import DType
from opforge.runtime.binding import CallError

from .kernel_helpers import run_case, unique_namespace

SPEC = """
op rms_norm<T: f16 | bf16 | f32>(x: T[B, S, D], w: T[D], eps: f32 = 1e-5) -> T[B, S, D] {
    xf = cast(x, f32)
    ms = mean(xf * xf, axis=-1, keepdim=true)
    return cast(xf * rsqrt(ms + eps), T) * w
}

# a generic op calling a generic op: each binding calls the matching one
op scaled<U: f16 | f32>(x: U[B, S, D], w: U[D]) -> U[B, S, D] {
    return rms_norm(x, w) * cast(2.0, U)
}

# a concrete op calling a generic one
op block(x: f16[B, S, D], w: f16[D]) -> f16[B, S, D] { return rms_norm(x, w) + x }

# two variables, the default set (every float dtype) for the second
op mixed<A: f16 | f32, C>(x: A[M, K], y: C[M, K]) -> C[M, K] { return cast(x, C) + y }
"""


@pytest.fixture(scope="module")
def mod():
    return opforge.compile(SPEC, namespace=unique_namespace("generic"))


def test_one_graph_per_binding():
    p = load_program(SPEC)
    assert [n for n in p.graphs if n.startswith("rms_norm")] == ["rms_norm__f16", "rms_norm__bf16", "rms_norm__f32"]
    info = p.generics["mixed"]
    assert info.variables == ("A", "C") and info.sources == ("x", "y")
    assert info.dtypes[1] == (DType.f16, DType.bf16, DType.f32)
    assert len(info.instances) == 6
    g = p.graphs["rms_norm__bf16"]
    assert [str(t) for t in g.result_types] == ["bf16[B, S, D]"]
    # the call inside each binding names the matching binding of the callee
    calls = [n.attrs["callee"] for n in p.graphs["scaled__f32"].nodes if n.op == "call"]
    assert calls == ["rms_norm__f32"]
    assert [n.attrs["callee"] for n in p.graphs["block"].nodes if n.op == "call"] == ["rms_norm__f16"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_each_binding_matches_the_reference(mod, dtype):
    op = mod.rms_norm.instance(dtype)
    assert op.graph.params[0].value.type.dtype.name == {torch.float16: "f16", torch.bfloat16: "bf16",
                                                        torch.float32: "f32"}[dtype]
    run_case(op, {"B": 2, "S": 5, "D": 37}, seed=4)
    x, w = torch.randn(2, 5, 37).to(dtype), torch.randn(37).to(dtype)
    y = mod.rms_norm(x, w)
    assert y.dtype == dtype
    assert torch.equal(y, op(x, w))
    assert torch.equal(torch.ops.__getattr__(mod.rms_norm.namespace).rms_norm(x, w), y)


def test_calls_between_generic_ops(mod):
    for dtype in (torch.float16, torch.float32):
        run_case(mod.scaled.instance(dtype), {"B": 1, "S": 3, "D": 19}, seed=5)
    run_case(mod.block, {"B": 2, "S": 3, "D": 19}, seed=6)
    run_case(mod.mixed.instance(torch.float16, torch.bfloat16), {"M": 3, "K": 7}, seed=7)
    y = mod.mixed(torch.randn(3, 7, dtype=torch.float16), torch.randn(3, 7, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_bindings_compile_once_at_first_use(mod):
    op = mod.scaled
    x, w = torch.randn(1, 2, 8, dtype=torch.float16), torch.randn(8, dtype=torch.float16)
    op(x, w)
    first = op.instance(torch.float16)
    op(x, w)
    assert op.instance(torch.float16) is first
    assert "f16" in repr(op)


def test_call_errors(mod):
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    with pytest.raises(CallError, match=r"rms_norm\(\): 'x' is torch.float64, and T admits f16 \| bf16 \| f32"):
        mod.rms_norm(x, x[0, 0])
    with pytest.raises(CallError, match="rms_norm"):      # w must be T too: the binding's own check
        mod.rms_norm(x.half(), x[0, 0].float())
    with pytest.raises(CallError, match="no binding f64"):
        mod.rms_norm.instance(torch.float64)
    # once a binding exists (the fast path), its argument errors still name the op called
    h = x.half()
    mod.rms_norm(h, h[0, 0])
    for call in (lambda: mod.rms_norm(h), lambda: mod.rms_norm(h, h[0, 0], 1e-5, 3), lambda: mod.rms_norm(h, h[0, 0], "a")):
        with pytest.raises(CallError) as e:
            call()
        assert "rms_norm()" in str(e.value) and "rms_norm__" not in str(e.value), str(e.value)


def test_gradients_and_torch_compile(mod):
    x = torch.randn(2, 3, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    mod.rms_norm(x, w).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ((x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5)) * w).sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, w.grad, rtol=1e-4, atol=1e-5)
    f = torch.compile(lambda a, b: mod.rms_norm(a, b) * 2, fullgraph=True, backend="aot_eager")
    xh, wh = torch.randn(2, 3, 16, dtype=torch.bfloat16), torch.randn(16, dtype=torch.bfloat16)
    torch.testing.assert_close(f(xh, wh), mod.rms_norm(xh, wh) * 2)


def test_tools_see_the_default_binding(mod):
    assert "rms_norm__f16" in mod.rms_norm.explain()
    m = opforge.compile(SPEC, namespace=unique_namespace("generic_bf16"), dtype="bf16")
    assert m.rms_norm.graph.params[0].value.type.dtype is DType.bf16    # the signature, typed as the default
    assert "rms_norm__bf16" in m.rms_norm.explain()                     # tools: the compile's dtype


def test_a_generic_layer_binds_in_its_weights_dtype():
    m = opforge.compile("op lin<T: f16 | f32>(x: T[M, K], w: T[N, K] @quant(int8)) -> T[M, N] { return x @ w.T }",
                        namespace=unique_namespace("generic_bound"))
    w = torch.randn(12, 32)
    for dtype in (torch.float16, torch.float32):
        layer = m.lin.bind(w=w.to(dtype))       # T from the weight: x is not bound
        assert layer.op_name == {torch.float16: "lin__f16", torch.float32: "lin__f32"}[dtype]
        assert layer(torch.randn(3, 32, dtype=dtype)).dtype == dtype


LAYER = """
op lin<T: f16 | bf16 | f32>(x: T[M, K], w: T[N, K] @quant(int4, group=32), w8: T[N, K] @quant(int8), b: T[N]) -> T[M, N] {
    return x @ w.T + x @ w8.T + b
}"""


def test_a_bound_generic_layer_follows_to_dtype():
    """``.to(dtype)`` of a generic op's bound layer rebinds it: the tensors typed T (the bias, the
    int4 scales) are converted, the fixed-dtype ones (int8's f32 scales, the packed bytes) stay
    exactly as they were, the Parameter objects stay, and calls run the new binding's op,
    matching the reference of the same packed weights. A dtype T does not admit (f64), or a
    non-generic op, leaves every dtype as it is."""
    m = opforge.compile(LAYER, namespace=unique_namespace("generic_to"))
    torch.manual_seed(0)
    w, w8, b = torch.randn(20, 64), torch.randn(20, 64), torch.randn(20)
    layer = m.lin.bind(w=w.half(), w8=w8.half(), b=b.half())
    bias, scale8 = layer.b, layer.w8_scale.clone()
    assert layer.w_scale.dtype == torch.float16 and scale8.dtype == torch.float32
    before = layer.unpacked()
    out = layer.to(torch.float32)
    assert out is layer and layer.op_name == "lin__f16" and layer._packed.graph.name.startswith("lin__f32")
    assert layer.b is bias and bias.dtype == torch.float32 and layer.w_scale.dtype == torch.float32
    assert torch.equal(layer.w8_scale, scale8) and layer.w_packed.dtype == torch.uint8
    dense = layer.unpacked()
    # the same codes and scales, dequantised in f32 now instead of rounded to f16
    assert dense["w"].dtype == torch.float32 and not torch.equal(dense["w"], before["w"].float())
    torch.testing.assert_close(dense["w"].half(), before["w"], rtol=0, atol=0)
    x = torch.randn(3, 64)
    ref = x @ dense["w"].T + x @ dense["w8"].T + layer.b.detach()
    got = layer(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(CallError, match="expects dtype f32"):
        layer(x.half())
    layer.double()                                       # T admits no f64: nothing changes
    assert layer.b.dtype == torch.float32 and layer(x).dtype == torch.float32
    layer.bfloat16()
    assert layer.b.dtype == torch.bfloat16 and layer(x.bfloat16()).dtype == torch.bfloat16
    plain = opforge.compile(LAYER.replace("<T: f16 | bf16 | f32>", "").replace("T[", "f16["),
                            namespace=unique_namespace("plain_to"))
    fixed = plain.lin.bind(w=w.half(), w8=w8.half(), b=b.half()).to(torch.float32)
    assert fixed.b.dtype == torch.float16 and fixed(x.half()).dtype == torch.float16


@pytest.mark.parametrize("src,message", [
    ("op f<T: f16>(x: f32[M]) -> f32[M] { return x }", "dtype variable 'T' is not the dtype of any tensor parameter"),
    ("op f<T, T>(x: T[M]) -> T[M] { return x }", "dtype variable 'T' is declared twice"),
    ("op f<f16>(x: f16[M]) -> f16[M] { return x }", "'f16' is a dtype; a dtype variable needs another name"),
    ("op f<T: f16 | f17>(x: T[M]) -> T[M] { return x }", "unknown dtype 'f17'"),
    ("op f<T: f16 | f16>(x: T[M]) -> T[M] { return x }", "'T' lists a dtype twice"),
    ("op f<T>(x: T[M]) -> T[M] { return x * T }", "'T' is a dtype variable, not a value"),
    ("op f<T>(x: T[T]) -> T[T] { return x }", "'T' is a dtype variable, not a size"),
    # a body that type-checks for some bindings only: the error says which
    ("op f<T: f32 | i32>(x: T[M]) -> T[M] { return exp(x) }", "with T = i32:"),
    ("op g<T: f16 | f32>(x: T[M]) -> T[M] { return x }\nop f(x: bf16[M]) -> bf16[M] { return g(x) }",
     r"'g' takes T = f16 \| f32; 'x' is bf16\[M\]"),
])
def test_spec_errors(src, message):
    with pytest.raises(SpecError, match=message):
        load_program(src)


def test_stored_plans_keep_generic_ops(monkeypatch, tmp_path):
    monkeypatch.setenv("OPFORGE_PLAN_CACHE", "1")
    ns = unique_namespace("generic_warm")
    opforge.compile(SPEC, namespace=ns, cache_dir=tmp_path)
    warm = opforge.compile(SPEC, namespace=ns, cache_dir=tmp_path)
    run_case(warm.rms_norm.instance(torch.bfloat16), {"B": 1, "S": 2, "D": 9}, seed=8)
    run_case(warm.block, {"B": 1, "S": 2, "D": 9}, seed=9)


def test_the_command_line_takes_a_generic_op_by_its_name(tmp_path):
    """``opforge show`` and ``run`` take the op's own name (its first binding, or the binding of
    ``--dtype``); an unknown name's hint names the ops, not their bindings' graphs."""
    from click.testing import CliRunner
    from opforge.cli import main
    spec = tmp_path / "norm.opf"
    spec.write_text(SPEC)
    shown = CliRunner().invoke(main, ["show", str(spec), "--op", "rms_norm"])
    assert shown.exit_code == 0, shown.output
    assert "rms_norm__f16" in shown.output and "cast(%3) {dtype=f16}" in shown.output
    ran = CliRunner().invoke(main, ["run", str(spec), "--op", "rms_norm", "--shape", "B=1,S=3,D=7", "--dtype", "f32"])
    assert ran.exit_code == 0, ran.output
    assert "float32" in ran.output and "ok" in ran.output
    wrong = CliRunner().invoke(main, ["show", str(spec), "--op", "rms_nrm"])
    assert wrong.exit_code != 0 and "did you mean 'rms_norm'?" in wrong.output
    # a dtype the op has no binding of is an error, never another binding in its place
    refused = CliRunner().invoke(main, ["run", str(spec), "--op", "scaled", "--shape", "B=1,S=3,D=7", "--dtype", "bf16"])
    assert refused.exit_code != 0
    assert "scaled is dtype-generic and has no binding with every variable bf16" in refused.output
    assert "it admits U = f16 | f32" in refused.output


def test_a_binding_is_never_retyped():
    """``compile(dtype=...)`` retypes concrete ops; a binding's dtypes are the binding."""
    from opforge.passes.pipeline import prepared_graph
    p = load_program(SPEC)
    g = prepared_graph(p, "rms_norm__f32", "f16")
    assert str(g.params[0].value.type) == "f32[B, S, D]"
    assert str(prepared_graph(p, "block", "bf16").params[0].value.type) == "bf16[B, S, D]"


def test_the_native_sweep_takes_the_binding_of_each_dtype():
    """``opforge check --dtype f16,bf16`` compiles each generic op's binding of that dtype
    (not every binding retyped: an f32 binding retyped to f16 would drop its f32 arithmetic)."""
    from opforge.runtime.sweep import swept_graphs
    p = load_program(SPEC)
    assert [n for n in swept_graphs(p, "f16") if p.op_of(n) in ("rms_norm", "scaled", "mixed")] == \
        ["rms_norm__f16", "scaled__f16", "mixed__f16_f16"]
    assert [n for n in swept_graphs(p, "bf16") if p.op_of(n) in ("rms_norm", "scaled")] == ["rms_norm__bf16"]
    assert "block" in swept_graphs(p, "bf16")
    assert p.op_of("rms_norm__bf16") == "rms_norm" and p.op_of("block") == "block"
