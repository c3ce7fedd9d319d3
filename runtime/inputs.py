"""Seeded random inputs of an op's parameter types (never zeros).

Floats are standard normal, except weights: a parameter that is the right-hand operand of a
contraction (``x @ w.T``, an expert weight) is scaled by 1/sqrt(K), its fan-in, as initialised
weights are, so deep blocks keep activations near unit scale instead of overflowing f16 or
turning softmax into an argmax that flips under rounding. Integer tensors that index something
get values inside its range: the ids of a gather stay below the table's row count, the expert
indices of expert_matmul below the expert count. Integer tensors compared with positions
(``j < lens[b]`` against ``arange(T)``) are lengths: values in [1, T], so no row is empty.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..ir.dims import evaluate
from ..ir.graph import Graph, Value
from ..ir.torch_dtypes import to_torch
from ..ir.types import DType, TensorType


def index_ranges(g: Graph) -> dict[Value, object]:
    """Parameter value -> the size its entries must stay below."""
    out: dict[Value, object] = {}
    params = {p.value for p in g.params}
    producer = {v: n for n in g.nodes for v in n.outputs}

    def param(v: Value):            # the parameter an index tensor views, if it is one
        while v not in params:
            n = producer.get(v)
            if n is None or n.op not in VIEW_OPS | {"expand"}:
                return None
            v = n.inputs[0]
        return v

    for n in g.nodes:
        if n.op == "gather_rows" and n.inputs[1] in params:
            out[n.inputs[1]] = n.inputs[0].type.shape[0]
        if n.op == "expert_matmul" and n.inputs[2] in params:
            out[n.inputs[2]] = n.inputs[1].type.shape[0]
        if n.op in ("take", "scatter_along", "scatter_rows") and param(n.inputs[1]) is not None:
            size = {"take": lambda: n.inputs[0].type.shape[n.attrs["axis"]],
                    "scatter_along": lambda: n.attrs["size"], "scatter_rows": lambda: n.attrs["rows"]}[n.op]()
            out[param(n.inputs[1])] = size
    return out


VIEW_OPS = {"transpose", "permute", "reshape"}
POSITION_VIEWS = VIEW_OPS | {"expand", "slice", "cast"}
COMPARISONS = {"lt", "le", "gt", "ge"}


def length_ranges(g: Graph) -> dict[Value, object]:
    """Integer parameter compared with arange(N) positions -> N (its entries lie in [1, N])."""
    producer = {v: n for n in g.nodes for v in n.outputs}
    params = {p.value for p in g.params}

    def root(v: Value):
        while v not in params:
            n = producer.get(v)
            if n is None:
                return None
            if n.op == "arange":
                return n
            if n.op not in POSITION_VIEWS:
                return None
            v = n.inputs[0]
        return v

    out: dict[Value, object] = {}
    for n in g.nodes:
        if n.op in COMPARISONS:
            a, b = (root(x) for x in n.inputs)
            for pos, other in ((a, b), (b, a)):
                if getattr(pos, "op", None) == "arange" and other in params and not other.type.dtype.is_float:
                    out[other] = pos.attrs["N"]
    return out


def fan_in(g: Graph) -> dict[Value, object]:
    """Weight parameter -> the size it is contracted over."""
    producer = {v: n for n in g.nodes for v in n.outputs}
    params = {p.value for p in g.params}

    def root(v: Value) -> Value | None:
        while v not in params:
            n = producer.get(v)
            if n is None or n.op not in VIEW_OPS:
                return None
            v = n.inputs[0]
        return v

    out: dict[Value, object] = {}
    for n in g.nodes:
        if n.op == "matmul":
            w = root(n.inputs[1])
            if w is not None and w.type.rank == 2:
                b = n.inputs[1].type.shape
                out[w] = b[-2] if len(b) > 1 else b[0]
        elif n.op == "expert_matmul" and n.inputs[1] in params:
            out[n.inputs[1]] = n.inputs[1].type.shape[2]
    return out


def random_inputs(g: Graph, bindings: Mapping[str, int], *, seed: int = 0, device: str = "cpu",
                  scale: float = 1.0) -> dict[str, object]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ranges = index_ranges(g)
    lengths = length_ranges(g)
    fans = fan_in(g)
    out: dict[str, object] = {}
    for p in g.params:
        t = p.value.type
        if not isinstance(t, TensorType):
            if p.name in g.size_params and p.name in bindings:    # an integer used as a size
                out[p.name] = int(bindings[p.name])
                continue
            out[p.name] = p.default if p.has_default else _scalar(t.dtype, gen)
            continue
        shape = tuple(evaluate(d, bindings) for d in t.shape)
        dt = t.dtype
        if p.value in ranges:
            hi = evaluate(ranges[p.value], bindings)
            if p.value in {n.inputs[2] for n in g.nodes if n.op == "expert_matmul"} and shape:
                x = _distinct_rows(shape, hi, gen)
            else:
                x = torch.randint(0, max(hi, 1), shape, generator=gen)
        elif p.value in lengths:
            n = max(evaluate(lengths[p.value], bindings), 1)
            x = torch.randint(1, n + 1, shape, generator=gen)
        elif dt.is_float:
            k = evaluate(fans[p.value], bindings) if p.value in fans else 1
            x = torch.randn(shape, generator=gen) * (scale / max(k, 1) ** 0.5)
        elif dt is DType.bool:
            x = torch.rand(shape, generator=gen) < 0.5
        elif dt is DType.u8:
            x = torch.randint(0, 256, shape, generator=gen)
        elif dt is DType.i8:
            x = torch.randint(-128, 128, shape, generator=gen)
        else:
            x = torch.randint(-16, 16, shape, generator=gen)
        out[p.name] = x.to(dtype=to_torch(dt)).to(device)
    return out


def _distinct_rows(shape, hi: int, gen) -> torch.Tensor:
    """Expert indices: each token's k choices distinct, as top-k routing gives."""
    t, k = shape[0], shape[-1]
    if k > hi:
        return torch.randint(0, max(hi, 1), shape, generator=gen)
    scores = torch.rand((t, hi), generator=gen)
    return scores.topk(k, dim=-1).indices.reshape(shape)


def _scalar(dtype: DType, gen):
    if dtype.is_float:
        return float(torch.rand((), generator=gen)) + 0.5
    if dtype.is_bool:
        return True
    return int(torch.randint(1, 8, (), generator=gen))
