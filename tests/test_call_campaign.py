"""Campaign: bad call inputs (issue 9). Seeded random calls of compiled ops, each either a good
call in an awkward form (0-size axes, transposed, strided, offset and broadcast views, meta
tensors) or a good call with one thing wrong (the number of arguments, a Python number, list,
string, None or NumPy array for a tensor, a string, None, tensor or number of the wrong kind for
a scalar, an out-of-range integer, the dtype, the device, the rank, a fixed size, a size that
disagrees with another parameter's, a sparse tensor, index tensors out of range).

A good call must give the float64 reference's result (outputs poisoned first, as everywhere);
a bad one must raise opforge.CallError naming the parameter (and the op) before any kernel
runs, never a torch or Triton exception and never a result, and the reference executor must
reject it in the same words. The CI run is bounded (fixed seeds, a few seconds);
OPFORGE_LONG_CAMPAIGNS=1 runs 2,000 seeds."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

import opforge
from opforge.ir.dims import evaluate
from opforge.ir.types import TensorType
from opforge.runtime import executor
from opforge.runtime.binding import index_params
from opforge.runtime.inputs import random_inputs
from opforge.runtime.reference import run_graph, run_reference

from .kernel_helpers import as_list, check_outputs, compiled

SPEC = """
op lin(x: f32[M, K], w: f32[N, K], b: f32[N], scale: f32 = 1.0) -> f32[M, N] { return (x @ w.T + b) * scale }
op emb(table: f16[V, D], ids: i32[T], n: i64 = 2) -> f16[T, D] { return table[ids] * cast(n, f16) }
op gate(x: f32[M, 4], flag: bool = false, k: i32 = 3) -> f32[M, 4] {
    return where(flag, x, -x) * cast(k, f32)
}
op red(x: f16[B, S, D], y: f16[D]) -> (f32[B, S], f16[B, S, D]) {
    return sum(cast(x, f32), axis=-1), x * y
}
"""
OPS = ("lin", "emb", "gate", "red")
SEEDS = range(2000) if os.environ.get("OPFORGE_LONG_CAMPAIGNS") == "1" else range(200)
SIZES = (1, 2, 3, 5, 7)


@pytest.fixture(scope="module")
def mod():
    return compiled(SPEC, "call_campaign")


@dataclass
class Call:
    op: str
    values: dict                       # parameter -> argument, in parameter order
    bindings: dict
    what: str                          # the variant or the mistake, for failure messages
    error: str | None = None           # the parameter (or keyword) the CallError must name
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    device_case: bool = False          # the reference executor does not check devices

    def arguments(self) -> tuple[tuple, dict]:
        if self.args or self.kwargs:
            return self.args, self.kwargs
        return tuple(self.values.values()), {}


# -- good calls in awkward forms ------------------------------------------------------------------
def noncontiguous(x: torch.Tensor) -> torch.Tensor:
    if x.dim() >= 2:
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)     # same values, swapped strides
    if x.dim() == 1:
        return torch.stack([x, x + 1]).T[:, 0]                        # stride 2
    return x


def offset(x: torch.Tensor) -> torch.Tensor:
    buf = torch.cat([torch.zeros(3, dtype=x.dtype), x.reshape(-1)])   # a view at offset 3
    return buf[3:].view(x.shape)


def broadcast(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 0 or x.shape[0] == 0:
        return x
    return x[:1].expand(x.shape)                                      # stride 0 on axis 0


GOOD = ("plain", "zero-size", "noncontiguous", "offset", "broadcast", "meta")


def good_call(rng: random.Random, g, op: str, variants=GOOD) -> Call:
    syms = sorted({s for p in g.params if isinstance(p.value.type, TensorType)
                   for d in p.value.type.shape if not isinstance(d, int) for s in d.symbols})
    bindings = {s: rng.choice(SIZES) for s in syms}
    variant = rng.choice(variants)
    if variant == "zero-size":
        zeroable = [s for s in syms if s != "V"]      # no rows to gather from is an index error
        bindings[rng.choice(zeroable)] = 0
    values = random_inputs(g, bindings, seed=rng.randrange(10 ** 6))
    for p in g.params:
        x = values[p.name]
        if not isinstance(x, torch.Tensor):
            continue
        if variant == "noncontiguous":
            values[p.name] = noncontiguous(x)
        elif variant == "offset":
            values[p.name] = offset(x)
        elif variant == "broadcast" and p.name not in {n for n, _, _ in index_params(g)}:
            values[p.name] = broadcast(x)
        elif variant == "meta":
            values[p.name] = x.to("meta")
    return Call(op, values, bindings, variant)


# -- one thing wrong ----------------------------------------------------------------------------------
def tensor_params(g):
    return [p for p in g.params if isinstance(p.value.type, TensorType)]


def scalar_params(g):
    return [p for p in g.params if not isinstance(p.value.type, TensorType)]


OTHER_DTYPES = [torch.float64, torch.float16, torch.float32, torch.bfloat16, torch.int64, torch.int32,
                torch.int8, torch.bool, torch.complex64]


def shared_axes(tp) -> list:
    """(parameter, axis, symbol) of every symbolic axis another parameter shares."""
    return [(p, a, d) for p in tp for a, d in enumerate(p.value.type.shape)
            if not isinstance(d, int) and any(q is not p and d in q.value.type.shape for q in tp)]


def bad_call(rng: random.Random, g, op: str) -> Call:
    c = good_call(rng, g, op, GOOD[:-1])
    values, names = c.values, [p.name for p in g.params]
    tp, sp = tensor_params(g), scalar_params(g)
    kinds = ["tensor-not-a-tensor", "dtype", "rank", "too-many", "missing", "unknown-keyword", "twice",
             "sparse", "device"]
    if sp:
        kinds += ["scalar-wrong-kind", "scalar-not-a-number", "scalar-tensor"]
    if shared_axes(tp):
        kinds.append("symbol-disagrees")
    if any(isinstance(d, int) for p in tp for d in p.value.type.shape):
        kinds.append("fixed-size")
    if index_params(g):
        kinds.append("index-out-of-range")
    kind = rng.choice(kinds)
    c.what = kind
    if kind == "tensor-not-a-tensor":
        p = rng.choice(tp)
        values[p.name] = rng.choice([1.5, 2, [1.0, 2.0], None, "x", np.ones(3, np.float32)])
        c.error = p.name
    elif kind == "dtype":
        p = rng.choice(tp)
        x = values[p.name]
        values[p.name] = x.to(rng.choice([d for d in OTHER_DTYPES if d != x.dtype]))
        c.error = p.name
    elif kind == "rank":
        p = rng.choice(tp)
        x = values[p.name]
        values[p.name] = x[None] if rng.random() < 0.5 or x.dim() <= 1 else x.reshape(-1)   # rank +1 or 1
        c.error = p.name
    elif kind == "too-many":
        c.args = tuple(values.values()) + (1.0,)
        c.error = ""
    elif kind == "missing":
        required = [p for p in g.params if not p.has_default]
        p = rng.choice(required)
        c.kwargs = {k: v for k, v in values.items() if k != p.name}
        c.error = p.name
    elif kind == "unknown-keyword":
        c.kwargs = dict(values, bogus=1)
        c.error = "bogus"
    elif kind == "twice":
        c.args = tuple(values.values())
        c.kwargs = {names[0]: values[names[0]]}
        c.error = names[0]
    elif kind == "sparse":
        p = rng.choice([q for q in tp if values[q.name].dim() >= 1])
        values[p.name] = values[p.name].to_sparse()
        c.error = p.name
    elif kind == "device":
        if len(tp) < 2:        # every tensor on meta: a good call, shapes only (torch.compile's)
            return Call(op, {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in values.items()},
                        c.bindings, "meta")
        p = rng.choice(tp[1:])            # the first tensor sets the device the others must share
        values[p.name] = values[p.name].to("meta")
        c.error = p.name
        c.device_case = True
    elif kind == "scalar-wrong-kind":
        p = rng.choice(sp)
        d = p.value.type.dtype
        choices = [1, 2.5, np.int64(3)] if d.is_bool else [True, 2.5, np.float32(2.5), 2 ** 40] \
            if not d.is_float else [True, False, np.bool_(True), 1 + 2j]
        if not d.is_bool and not d.is_float and str(d) == "i64":
            choices = [True, 2.5, np.float32(2.5), 2 ** 70]
        values[p.name] = rng.choice(choices)
        c.error = p.name
    elif kind == "scalar-not-a-number":
        p = rng.choice(sp)
        values[p.name] = rng.choice(["1.0", None, [1.0], (1,), object()])
        c.error = p.name
    elif kind == "scalar-tensor":
        p = rng.choice(sp)
        values[p.name] = torch.ones(rng.choice([1, 2, 3]))
        c.error = p.name
    elif kind == "symbol-disagrees":
        p, a, d = rng.choice(shared_axes(tp))
        firsts = [q for q in tp if d in q.value.type.shape]
        if p is firsts[0]:
            p = firsts[1]               # the later parameter is the one that disagrees
            a = list(p.value.type.shape).index(d)
        x = values[p.name]
        shape = list(x.shape)
        shape[a] += 1
        values[p.name] = torch.zeros(shape, dtype=x.dtype)
        c.error = p.name
    elif kind == "fixed-size":
        p, a = next((p, a) for p in tp for a, d in enumerate(p.value.type.shape) if isinstance(d, int))
        x = values[p.name]
        shape = list(x.shape)
        shape[a] += rng.choice([-1, 1, 3])
        values[p.name] = torch.zeros(shape, dtype=x.dtype)
        c.error = p.name
    elif kind == "index-out-of-range":
        name, limit, _ = index_params(g)[0]
        n = evaluate(limit, c.bindings)
        ids = values[name]
        if ids.numel() == 0:
            ids = torch.zeros(3, dtype=ids.dtype)
            c.bindings = dict(c.bindings, T=3)
            values["table"] = values["table"] if values["table"].shape[0] else torch.zeros(2, 3, dtype=torch.float16)
            n = values["table"].shape[0]
        ids = ids.clone()
        ids[rng.randrange(ids.numel())] = rng.choice([n, n + 5, -1, -n - 1])
        values[name] = ids
        c.error = name
    return c


def make_call(seed: int, mod) -> Call:
    rng = random.Random(seed)
    op = OPS[seed % len(OPS)]
    g = getattr(mod, op).graph
    return good_call(rng, g, op) if rng.random() < 0.35 else bad_call(rng, g, op)


@pytest.fixture
def launches(monkeypatch):
    """Records plan runs and buffer allocations (a bad call must make neither)."""
    seen = []
    run, alloc = executor.PlanRunner.__call__, executor.allocate

    def spy_run(self, *a, **k):
        seen.append("run")
        return run(self, *a, **k)

    def spy_alloc(*a, **k):
        seen.append("alloc")
        return alloc(*a, **k)

    monkeypatch.setattr(executor.PlanRunner, "__call__", spy_run)
    monkeypatch.setattr(executor, "allocate", spy_alloc)
    return seen


@pytest.mark.parametrize("seed", SEEDS)
def test_call(seed, mod, launches):
    c = make_call(seed, mod)
    op = getattr(mod, c.op)
    args, kwargs = c.arguments()
    label = f"seed {seed}: {c.op} {c.what} at {c.bindings}"
    if c.error is None:
        outs = as_list(op(*args, **kwargs))
        if c.what == "meta":
            assert all(o.device.type == "meta" for o in outs), label
            want = [tuple(evaluate(d, c.bindings) for d in t.shape) for t in op.graph.result_types]
            assert [tuple(o.shape) for o in outs] == want, label
            return
        refs = run_graph(op.graph, c.values, c.bindings, check=True)
        check_outputs(op.graph, outs, refs, f" ({label})")
        return
    try:
        op(*args, **kwargs)
    except opforge.CallError as e:
        msg = str(e)
    except Exception as e:        # noqa: BLE001 - the campaign's point: nothing else may escape
        pytest.fail(f"{label}: {type(e).__name__} instead of a CallError: {e}")
    else:
        pytest.fail(f"{label}: no error")
    assert msg.startswith(f"{c.op}()"), (label, msg)
    if c.error:
        assert f"'{c.error}'" in msg, (label, msg)
    assert launches == [], (label, launches)
    if not c.device_case:
        with pytest.raises(opforge.CallError) as ref:
            run_reference(op.graph, *args, **kwargs)
        assert str(ref.value) == msg, label


def test_the_campaign_covers_every_mistake_and_variant(mod):
    """The bounded run draws every kind of mistake and every good variant at least once."""
    seen = {make_call(seed, mod).what for seed in SEEDS}
    want = {"plain", "zero-size", "noncontiguous", "offset", "broadcast", "meta", "tensor-not-a-tensor",
            "dtype", "rank", "too-many", "missing", "unknown-keyword", "twice", "sparse", "scalar-wrong-kind",
            "scalar-not-a-number", "scalar-tensor", "symbol-disagrees", "fixed-size", "index-out-of-range"}
    assert want <= seen, want - seen
    assert any(w.startswith("device") for w in seen)
