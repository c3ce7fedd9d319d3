"""The primitive registry: DSL.md's built-ins are all there, and every primitive's reference
agrees with the direct PyTorch function and returns what its rule says (shape and dtype).

Each case runs a primitive's rule and reference directly (no front end), twice: in the spec's
dtypes (16-bit floats computed in f32 and rounded once, as PyTorch's GPU kernels do) and in the
float64 checking mode. The expected value is the plain torch function applied to the same
inputs upcast the same way, then converted to the rule's output dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from opforge.ir import registry
from opforge.ir.dims import evaluate, sym
from opforge.ir.registry import Kind, RuleError
from opforge.ir.torch_dtypes import RefCtx, to_torch
from opforge.ir.types import DType, ScalarType, TensorType

# DSL.md, "Built-ins (first version)"
DSL_BUILTINS = """abs exp log sqrt rsqrt sin cos tanh sigmoid relu silu gelu softplus maximum minimum where
cast sum mean max min softmax log_softmax cumsum reshape permute transpose concat topk causal
expert_matmul arange""".split()
# Written as operators or produced by the front end and passes; never callable by name.
INTERNAL = ("add sub mul div pow neg lt le gt ge eq ne matmul const dim slice expand gather_rows call "
            "logical_and logical_or logical_not floordiv").split()

f32, f16, bf16, f64, i32, i64, b8 = DType.f32, DType.f16, DType.bf16, DType.f64, DType.i32, DType.i64, DType.bool


def T(dtype: DType, *shape) -> TensorType:
    return TensorType(dtype, tuple(shape))


def S(dtype: DType) -> ScalarType:
    return ScalarType(dtype)


# -- registry contents ----------------------------------------------------------------------------
def test_every_dsl_builtin_is_callable_from_a_spec():
    builtins = registry.spec_builtins()
    missing = [n for n in DSL_BUILTINS if n not in builtins]
    assert not missing, f"DSL.md built-ins missing from the registry: {missing}"
    for n in DSL_BUILTINS:
        assert not builtins[n].internal and builtins[n].name == n


def test_internal_primitives_are_not_callable_by_name():
    builtins = registry.spec_builtins()
    for n in INTERNAL:
        assert n in registry.REGISTRY, n
        assert registry.REGISTRY[n].internal, n
        assert n not in builtins, n


def test_primitive_metadata():
    for name, p in registry.REGISTRY.items():
        assert p.name == name
        assert callable(p.infer) and callable(p.reference)
        # a scan has as many outputs as its body gives (n_outputs -1: any number)
        assert p.n_outputs >= 1 or p.kind is registry.Kind.RECURRENCE and p.n_outputs == -1
        names = [a.name for a in p.args]
        assert len(names) == len(set(names)), f"{name} has a duplicate argument"
        for a in p.args:
            assert a.kind in ("tensor", "tensors", "int", "axes", "ints", "bool", "float", "str", "dtype",
                              "dim", "dims"), (name, a)
            if a.choices:
                assert a.default is registry.REQUIRED or a.default in a.choices
    assert registry.get("topk").n_outputs == 2
    assert registry.get("call").kind is Kind.CALL
    with pytest.raises(RuntimeError, match="registered twice"):
        registry.primitive("abs", Kind.POINTWISE)(infer=lambda t, a: t, reference=lambda *a: None)
    with pytest.raises(RuntimeError, match="needs both"):
        registry.primitive("__no_reference__", Kind.POINTWISE)(infer=lambda t, a: t, reference=None)
    assert "__no_reference__" not in registry.REGISTRY


# -- reference == torch, rule type == reference output -------------------------------------------
@dataclass
class Case:
    prim: str
    types: list
    attrs: dict
    fn: Callable          # the torch function on the upcast inputs
    hints: list = field(default_factory=list)   # per input: None, "pos", "nonzero", ("index", n), ("value", v)
    bindings: dict = field(default_factory=dict)
    tol: dict | None = None  # None: bit-exact
    id: str = ""


def make_inputs(case: Case, gen: torch.Generator) -> list[torch.Tensor]:
    out = []
    hints = case.hints + [None] * (len(case.types) - len(case.hints))
    for t, h in zip(case.types, hints):
        shape = tuple(evaluate(d, case.bindings) for d in t.shape)
        dt = t.dtype
        if isinstance(h, tuple) and h[0] == "value":
            x = torch.tensor(h[1])
        elif isinstance(h, tuple) and h[0] == "index":
            x = torch.randint(0, h[1], shape, generator=gen)
        elif dt.is_float:
            x = torch.randn(shape, generator=gen)
            if h == "pos":
                x = x.abs() + 0.25
        elif dt.is_bool:
            x = torch.rand(shape, generator=gen) < 0.5
        else:
            x = torch.randint(-8, 8, shape, generator=gen)
            if h == "nonzero":
                x = torch.where(x == 0, torch.ones_like(x), x)
            if h == "pos":
                x = x.abs() + 1
        out.append(x.to(to_torch(dt)))
    return out


def unary(name, fn, dtypes=(f32, f16, bf16), hint=None, attrs=None, tag=""):
    return [Case(name, [T(dt, 3, 5)], dict(attrs or {}), fn, [hint], id=f"{name}{tag}-{dt}") for dt in dtypes]


CASES: list[Case] = []
# elementwise unary
CASES += unary("abs", torch.abs, (f32, f16, bf16, i32))
CASES += unary("neg", torch.neg, (f32, f16, i32))
CASES += unary("exp", torch.exp)
CASES += unary("log", torch.log, hint="pos")
CASES += unary("sqrt", torch.sqrt, hint="pos")
CASES += unary("rsqrt", torch.rsqrt, hint="pos")
CASES += unary("sin", torch.sin)
CASES += unary("cos", torch.cos)
CASES += unary("tanh", torch.tanh)
CASES += unary("sigmoid", torch.sigmoid)
CASES += unary("relu", torch.relu, (f32, f16, i32))
CASES += unary("silu", F.silu)
CASES += unary("softplus", F.softplus)
CASES += unary("gelu", lambda x: F.gelu(x), attrs={"approximate": "none"})
CASES += unary("gelu", lambda x: F.gelu(x, approximate="tanh"), attrs={"approximate": "tanh"}, tag="_tanh")

# elementwise binary: broadcasting, scalars adopting the tensor's dtype, integer true division
for _name, _fn in {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "maximum": torch.maximum,
                   "minimum": torch.minimum, "div": torch.div}.items():
    for _dt in (f32, f16):
        CASES.append(Case(_name, [T(_dt, 4, 1, 6), T(_dt, 3, 1)], {}, _fn, id=f"{_name}-bcast-{_dt}"))
    CASES.append(Case(_name, [T(f16, 2, 5), S(f32)], {}, _fn, [None, ("value", 0.3)], id=f"{_name}-f32scalar-f16"))
    CASES.append(Case(_name, [S(i64), T(f32, 2, 5)], {}, _fn, [("value", 3)], id=f"{_name}-intscalar-f32"))
CASES.append(Case("pow", [T(f32, 4, 5), T(f32, 5)], {}, torch.pow, ["pos"], id="pow-f32"))
CASES.append(Case("pow", [T(f16, 4, 5), S(i64)], {}, torch.pow, [None, ("value", 2)], id="pow-square-f16"))
CASES.append(Case("add", [T(i32, 3, 4), S(i64)], {}, torch.add, [None, ("value", 5)], id="add-int"))
CASES.append(Case("div", [T(i32, 3, 4), T(i32, 3, 4)], {}, torch.div, [None, "nonzero"],
                  tol=dict(rtol=1e-6, atol=0), id="div-int-is-true-division"))
CASES.append(Case("mul", [S(f32), S(f32)], {}, torch.mul, [("value", 1.5), ("value", -2.0)], id="mul-scalars"))
for _name, _fn in {"lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge, "eq": torch.eq,
                   "ne": torch.ne}.items():
    CASES.append(Case(_name, [T(f16, 4, 6), T(f16, 6)], {}, _fn, id=f"{_name}-f16"))
    CASES.append(Case(_name, [T(i32, 4, 6), S(i64)], {}, _fn, [None, ("value", 0)], id=f"{_name}-int-scalar"))
CASES.append(Case("eq", [T(b8, 4, 6), T(b8, 4, 6)], {}, torch.eq, id="eq-bool"))
CASES.append(Case("logical_and", [T(b8, 4, 1), T(b8, 6)], {}, torch.logical_and, id="and-bcast"))
CASES.append(Case("logical_or", [T(b8, 4, 6), T(b8, 4, 6)], {}, torch.logical_or, id="or"))
CASES.append(Case("logical_not", [T(b8, 5, 3)], {}, torch.logical_not, id="not"))
CASES.append(Case("floordiv", [T(i64, 4, 6), S(i64)], {}, lambda a, b: torch.div(a, b, rounding_mode="floor"),
                  [None, "nonzero"], id="floordiv-i64"))
CASES.append(Case("floordiv", [T(i32, 4, 6), T(i32, 6)], {}, lambda a, b: torch.div(a, b, rounding_mode="floor"),
                  [None, "nonzero"], id="floordiv-i32-neg"))
CASES.append(Case("where", [T(b8, 4, 6), T(f16, 4, 6), S(f32)], {},
                  lambda c, a, b: torch.where(c, a, b), [None, None, ("value", -math.inf)], id="where-f16-inf"))
CASES.append(Case("where", [T(b8, 4, 1), T(i32, 4, 6), T(i32, 6)], {}, torch.where, id="where-i32-bcast"))
for _src, _dst in [(f32, f16), (f16, f32), (f32, bf16), (f32, i32), (f16, i64), (i32, f16), (f32, b8),
                   (b8, f32), (f32, DType.f8e4m3), (DType.f8e4m3, f32), (i32, DType.i8)]:
    CASES.append(Case("cast", [T(_src, 3, 7)], {"dtype": _dst}, lambda x: x, id=f"cast-{_src}-{_dst}"))

# reductions and scans
for _name, _fn in {"sum": torch.sum, "mean": torch.mean, "max": torch.amax, "min": torch.amin}.items():
    CASES.append(Case(_name, [T(f16, 3, 4, 5)], {"axis": -1, "keepdim": True},
                      lambda x, _f=_fn: _f(x, dim=-1, keepdim=True), tol=dict(rtol=1e-3, atol=1e-3),
                      id=f"{_name}-last-keepdim"))
    CASES.append(Case(_name, [T(f32, 3, 4, 5)], {"axis": (0, 2), "keepdim": False},
                      lambda x, _f=_fn: _f(x, dim=(0, 2)), tol=dict(rtol=1e-6, atol=1e-6), id=f"{_name}-two-axes"))
    CASES.append(Case(_name, [T(f32, 3, 4)], {"axis": None, "keepdim": False},
                      lambda x, _f=_fn: _f(x, dim=(0, 1)), tol=dict(rtol=1e-6, atol=1e-6), id=f"{_name}-all"))
CASES.append(Case("sum", [T(i32, 3, 4)], {"axis": 1, "keepdim": False}, lambda x: torch.sum(x, dim=1), id="sum-int"))
CASES.append(Case("max", [T(i32, 3, 4)], {"axis": 0, "keepdim": False}, lambda x: torch.amax(x, dim=0), id="max-int"))
for _name, _fn in {"softmax": torch.softmax, "log_softmax": torch.log_softmax}.items():
    for _dt in (f32, f16):
        CASES.append(Case(_name, [T(_dt, 3, 4, 5)], {"axis": 1}, lambda x, _f=_fn: _f(x, dim=1), id=f"{_name}-{_dt}"))
    CASES.append(Case(_name, [T(f32, 3, 5)], {}, lambda x, _f=_fn: _f(x, dim=-1), id=f"{_name}-default-axis"))
CASES.append(Case("cumsum", [T(f16, 3, 9)], {"axis": 1}, lambda x: torch.cumsum(x, dim=1), id="cumsum-f16"))
CASES.append(Case("cumsum", [T(i32, 4, 3)], {"axis": -2}, lambda x: torch.cumsum(x, dim=0), id="cumsum-int"))

# shapes
M, N = sym("M"), sym("N")
CASES.append(Case("reshape", [T(f16, 2, 3, 4)], {"shape": (4, -1)}, lambda x: x.reshape(4, 6), id="reshape-hole"))
CASES.append(Case("reshape", [T(f32, M, N)], {"shape": (N, -1)}, lambda x: x.reshape(4, 3),
                  bindings={"M": 3, "N": 4}, id="reshape-symbolic"))
CASES.append(Case("permute", [T(f16, 2, 3, 4)], {"perm": (2, 0, 1)}, lambda x: x.permute(2, 0, 1), id="permute"))
CASES.append(Case("permute", [T(f32, 2, 3, 4)], {"perm": (-1, 0, 1)}, lambda x: x.permute(2, 0, 1), id="permute-neg"))
CASES.append(Case("transpose", [T(f32, 2, 3, 4)], {"a": 2, "b": 0}, lambda x: x.transpose(0, 2), id="transpose"))
CASES.append(Case("transpose", [T(i32, 2, 3, 4)], {"a": -1, "b": -2}, lambda x: x.transpose(-1, -2), id="transpose-T"))
CASES.append(Case("concat", [T(f16, 2, 3), T(f16, 2, 5), T(f16, 2, 1)], {"axis": -1},
                  lambda *xs: torch.cat(xs, dim=-1), id="concat"))
CASES.append(Case("concat", [T(f32, M, 3), T(f32, N, 3)], {"axis": 0}, lambda *xs: torch.cat(xs, dim=0),
                  bindings={"M": 2, "N": 5}, id="concat-symbolic"))
CASES.append(Case("expand", [T(f32, 3, 1)], {"shape": (2, 3, 4)}, lambda x: x.expand(2, 3, 4), id="expand"))
CASES.append(Case("slice", [T(f32, 6, 5)], {"starts": (1, 0), "stops": (5, 5), "steps": (2, 1)},
                  lambda x: x[1:5:2, 0:5], id="slice"))
CASES.append(Case("slice", [T(f32, M, 8)], {"starts": (0, 3), "stops": (M, 7), "steps": (1, 3)},
                  lambda x: x[:, 3:7:3], bindings={"M": 4}, id="slice-symbolic"))
CASES.append(Case("gather_rows", [T(f16, 10, 4), T(i32, 2, 3)], {}, lambda t, i: t[i.long()],
                  [None, ("index", 10)], id="gather_rows"))
CASES.append(Case("gather_rows", [T(f32, 7), T(i64, 5)], {}, lambda t, i: t[i], [None, ("index", 7)],
                  id="gather_rows-1d"))
CASES.append(Case("take", [T(f32, 4, 9), T(i64, 4, 3)], {"axis": 1},
                  lambda x, i: torch.take_along_dim(x, i, dim=1), [None, ("index", 9)], id="take"))
CASES.append(Case("take", [T(f16, 6, 2, 5), T(i32, 3, 2, 5)], {"axis": -3},
                  lambda x, i: torch.take_along_dim(x, i.long(), dim=0), [None, ("index", 6)], id="take-axis0-neg"))

# selection and sources
CASES.append(Case("topk", [T(f32, 4, 9)], {"k": 3}, lambda x: torch.topk(x, 3, dim=-1), id="topk"))
CASES.append(Case("topk", [T(f16, 6, 4)], {"k": 2, "axis": 0}, lambda x: torch.topk(x, 2, dim=0), id="topk-axis0"))
CASES.append(Case("topk", [T(i32, 5, 7)], {"k": 7}, lambda x: torch.sort(x, dim=-1, descending=True, stable=True),
                  id="topk-int-all"))
CASES.append(Case("causal", [], {"S": 3, "T": 5}, lambda: torch.ones(3, 5, dtype=torch.bool).tril(2), id="causal-static"))
CASES.append(Case("causal", [], {"S": M, "T": N}, lambda: torch.ones(6, 4, dtype=torch.bool).tril(-2),
                  bindings={"M": 6, "N": 4}, id="causal-symbolic"))
CASES.append(Case("arange", [], {"N": 5}, lambda: torch.arange(5), id="arange-static"))
CASES.append(Case("arange", [], {"N": M}, lambda: torch.arange(6), bindings={"M": 6}, id="arange-symbolic"))
CASES.append(Case("const", [], {"value": 2.5, "dtype": f16}, lambda: torch.tensor(2.5), id="const-f16"))
CASES.append(Case("const", [], {"value": 7, "dtype": i64}, lambda: torch.tensor(7), id="const-i64"))
CASES.append(Case("dim", [], {"size": M / 2}, lambda: torch.tensor(5), bindings={"M": 10}, id="dim"))

# contractions
CASES.append(Case("matmul", [T(f16, 2, 1, 3, 4), T(f16, 5, 4, 6)], {}, torch.matmul, id="matmul-batch-bcast"))
CASES.append(Case("matmul", [T(f32, 4), T(f32, 4, 6)], {}, torch.matmul, tol=dict(rtol=1e-6, atol=1e-6), id="matmul-vec-mat"))
CASES.append(Case("matmul", [T(f32, 2, 3, 4), T(f32, 4)], {}, torch.matmul, tol=dict(rtol=1e-6, atol=1e-6), id="matmul-mat-vec"))
CASES.append(Case("matmul", [T(i32, 3, 4), T(i32, 4, 2)], {}, torch.matmul, id="matmul-int"))
CASES.append(Case("expert_matmul", [T(f16, 5, 8), T(f16, 3, 6, 8), T(i32, 5, 2)], {},
                  lambda x, w, i: torch.einsum("tk,tjnk->tjn", x, w[i.long()]), [None, None, ("index", 3)],
                  tol=dict(rtol=1e-3, atol=1e-3), id="expert_matmul"))
CASES.append(Case("expert_matmul", [T(f32, 5, 2, 8), T(f32, 3, 6, 8), T(i32, 5, 2)], {},
                  lambda x, w, i: torch.einsum("tjk,tjnk->tjn", x, w[i.long()]), [None, None, ("index", 3)],
                  tol=dict(rtol=1e-6, atol=1e-6), id="expert_matmul-3d"))


def test_cases_cover_every_primitive():
    covered = {c.prim for c in CASES}
    missing = sorted(set(registry.spec_builtins()) - covered)
    assert not missing, f"spec built-ins without a registry test case: {missing}"
    assert set(INTERNAL) - {"call"} <= covered


@pytest.mark.parametrize("check", [False, True], ids=["spec-dtypes", "float64"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_reference_matches_torch(case: Case, check: bool):
    prim = registry.get(case.prim)
    out_types, attrs = prim.run_infer(case.types, dict(case.attrs))
    assert len(out_types) == prim.n_outputs
    ctx = RefCtx(check=check, bindings=dict(case.bindings))
    gen = torch.Generator().manual_seed(sum(map(ord, case.id)))
    ins = [ctx.tensor(x, t.dtype) for x, t in zip(make_inputs(case, gen), case.types)]
    outs = prim.reference(ctx, ins, dict(attrs), out_types, list(case.types))
    outs = [outs] if isinstance(outs, torch.Tensor) else list(outs)
    assert len(outs) == len(out_types)
    # the rule's output types describe what the reference returns
    for o, t in zip(outs, out_types):
        assert o.dtype == ctx.dt(t.dtype), (o.dtype, t)
        assert tuple(o.shape) == tuple(evaluate(d, case.bindings) for d in t.shape), (tuple(o.shape), t)
    # the reference computes what the torch function computes on the same (upcast) inputs
    upcast = [x.to(ctx.compute_dt(t.dtype)) for x, t in zip(ins, case.types)]
    expected = case.fn(*upcast)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    for k, (o, e, t) in enumerate(zip(outs, expected, out_types)):
        e = e.to(ctx.dt(t.dtype))
        if case.tol is None or not o.is_floating_point():
            assert o.dtype == e.dtype and tuple(o.shape) == tuple(e.shape)
            assert torch.equal(o, e) or (o.is_floating_point() and torch.equal(o.isnan(), e.isnan())
                                         and torch.equal(o.nan_to_num(), e.nan_to_num())), \
                f"{case.id} output {k}:\n{o}\nexpected\n{e}"
        else:
            torch.testing.assert_close(o, e, **case.tol)


def test_sixteen_bit_arithmetic_rounds_once():
    """f16 arithmetic happens in f32 and is rounded once: (a * b) is not computed in f16 steps,
    and a chain of two primitives rounds twice (once per primitive)."""
    prim = registry.get("mul")
    t = T(f16, 1)
    a = torch.tensor([1.0009765625], dtype=torch.float16)  # 1 + 2**-10
    b = torch.tensor([1.0009765625], dtype=torch.float16)
    out = prim.reference(RefCtx(), [a, b], {}, [t], [t, t])
    assert out.dtype == torch.float16
    assert out.item() == torch.tensor(1.0009765625 ** 2, dtype=torch.float32).half().item()
    out64 = prim.reference(RefCtx(check=True), [a.double(), b.double()], {}, [t], [t, t])
    assert out64.item() == 1.0009765625 ** 2  # exact in float64, not rounded to f16


# -- rules ----------------------------------------------------------------------------------------
def infer(name, *types, **attrs):
    return registry.get(name).run_infer(list(types), attrs)


def test_rules_broadcast_symbolically():
    D = sym("D")
    (out,), _ = infer("add", T(f16, M, 1, D), T(f16, N, 1))
    assert out == T(f16, M, N, D)
    with pytest.raises(RuleError, match="do not broadcast") as e:
        infer("add", T(f16, M, D), T(f16, N, D))
    assert "independently" in e.value.hint and e.value.arg == 1


def test_rules_dtype_mismatch_suggests_a_cast():
    with pytest.raises(RuleError) as e:
        infer("mul", T(f16, 3), T(f32, 3))
    assert "different dtypes" in e.value.message and e.value.hint == "make them equal with a cast, e.g. cast({1}, f16)"
    with pytest.raises(RuleError, match="cannot adopt"):
        infer("add", T(i32, 3), S(f32))
    (out,), _ = infer("add", T(bf16, 3), S(f32))
    assert out == T(bf16, 3)
    (out,), _ = infer("add", S(i64), S(f32))
    assert out == S(f32)
    (out,), _ = infer("lt", T(f16, 3), S(i64))
    assert out == T(b8, 3)


def test_rules_normalise_attributes():
    _, attrs = infer("sum", T(f32, 2, 3, 4), axis=(-1, 0), keepdim=False)
    assert attrs == {"axis": (0, 2), "keepdim": False}
    _, attrs = infer("mean", T(f32, 2, 3), axis=None, keepdim=True)
    assert attrs["axis"] == (0, 1)
    (out,), attrs = infer("transpose", T(f32, 2, 3, 4), a=-1, b=0)
    assert out == T(f32, 4, 3, 2) and attrs == {"a": 0, "b": 2}
    (v, i), attrs = infer("topk", T(f16, M, 8), k=2)
    assert v == T(f16, M, 2) and i == T(i32, M, 2) and attrs == {"k": 2, "axis": 1}
    (out,), attrs = infer("reshape", T(f16, M, N), shape=(N, 2, -1))
    assert out == T(f16, N, 2, M / 2)


@pytest.mark.parametrize("name,types,attrs,match", [
    ("mean", [T(i32, 3)], {}, "floating-point"),
    ("exp", [T(i32, 3)], {}, "floating-point"),
    ("sum", [T(b8, 3)], {}, "numeric"),
    ("sum", [T(f32, 3)], {"axis": 1}, "out of range"),
    ("sum", [T(f32, 3, 4)], {"axis": (1, -1)}, "twice"),
    ("softmax", [T(f32, 3)], {"axis": 2}, "out of range"),
    ("topk", [T(f32, 3, 4)], {"k": 5}, "k=5"),
    ("topk", [T(f32, 3, 4)], {"k": 0}, "k >= 1"),
    ("matmul", [T(f32, 3, 4), T(f32, 3, 4)], {}, "4 against 3 / hint: the last axis of the left must match the second-to-last of the right; did you mean .T"),
    ("matmul", [T(f32, 3, 4), T(f16, 4, 4)], {}, "different dtypes"),
    ("reshape", [T(f32, 2, 3)], {"shape": (4, 2)}, "cannot reshape"),
    ("reshape", [T(f32, 2, 3)], {"shape": (-1, -1)}, "at most one"),
    ("reshape", [T(f32, 2, 3)], {"shape": (4, -1)}, "6 elements do not split evenly"),
    ("permute", [T(f32, 2, 3)], {"perm": (0, 0)}, "not a permutation"),
    ("concat", [T(f32, 2, 3), T(f32, 3, 3)], {"axis": 1}, "differ in axis 0"),
    ("where", [T(f32, 3), T(f32, 3), T(f32, 3)], {}, "must be bool"),
    ("gather_rows", [T(f32, 3, 4), T(f32, 2)], {}, "integer"),
    ("expert_matmul", [T(f16, 5, 8), T(f16, 3, 6, 8), T(i64, 5, 2)], {}, "i32"),
    ("expert_matmul", [T(f16, 5, 8), T(f16, 3, 6, 7), T(i32, 5, 2)], {}, "contracts"),
])
def test_rule_errors(name, types, attrs, match):
    with pytest.raises(RuleError) as e:
        infer(name, *types, **attrs)
    assert match in f"{e.value.message} / hint: {e.value.hint}"


def test_slice_size_counts_like_python():
    from opforge.ir.prims_shape import slice_size
    assert slice_size(5, 2, 1) == 0 and slice_size(5, 2, 3) == 0  # empty, never negative
    assert slice_size(1, 8, 3) == 3
    assert slice_size(0, N, 2) == N / 2 and slice_size(1, N, 2) == N / 2  # both halves of an even axis
    assert slice_size(2, N - 1, 2) == N / 2 - 1
    for start in range(5):
        for cut in range(4):
            for step in range(1, 5):
                size = slice_size(start, N - cut, step)
                for n in range(start + cut, 25):
                    py = len(range(n)[start:n - cut:step])
                    try:
                        got = evaluate(size, {"N": n})
                    except ValueError:
                        assert n % step, (start, cut, step, n, size)  # only when N does not divide
                        continue
                    assert got == py, (start, cut, step, n, size)
