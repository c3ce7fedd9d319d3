"""The reference executor: runs a level-1 graph with PyTorch, node by node, on any device, in the
spec's dtypes or (check=True) with every float in float64. It is the oracle for every test of
the compiled kernels."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..ir import registry
from ..ir.dims import evaluate
from ..ir.graph import Graph
from ..ir.torch_dtypes import RefCtx
from .binding import bind_args, bind_sizes, check_derived_sizes, check_indices


def run_graph(g: Graph, values: Mapping[str, Any], bindings: Mapping[str, int], *, check: bool = False,
              device: torch.device | str | None = None) -> list[torch.Tensor]:
    """Run ``g`` on bound arguments (parameter name -> tensor or number)."""
    if g.size_params:       # integer parameters used as sizes: their values are bindings too
        bindings = {**{n: int(values[n]) for n in g.size_params if n in values}, **bindings}
    check_derived_sizes(g, tuple(sorted(bindings.items())))  # a CallError for sizes that do not fit
    check_indices(g, values, bindings)
    if device is None:
        device = next((v.device for v in values.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
    ctx = RefCtx(check=check, device=device, bindings=dict(bindings))
    env: dict = {}
    for p in g.params:
        x = values[p.name]
        env[p.value] = x.to(device=device, dtype=ctx.dt(p.value.type.dtype)) if isinstance(x, torch.Tensor) \
            else ctx.tensor(x, p.value.type.dtype)
    for n in g.nodes:
        prim = registry.get(n.op)
        ins = [env[v] for v in n.inputs]
        outs = prim.reference(ctx, ins, dict(n.attrs), [v.type for v in n.outputs], [v.type for v in n.inputs])
        if isinstance(outs, torch.Tensor):
            outs = [outs]
        for v, t in zip(n.outputs, outs):
            want = tuple(evaluate(d, bindings) for d in v.type.shape)
            if tuple(t.shape) != want:
                raise AssertionError(f"{g.name}: {n.op} gave shape {tuple(t.shape)}, its type says {want}")
            env[v] = t
    return [env[v] for v in g.outputs]


def run_reference(g: Graph, *args, check: bool = False, **kwargs) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Call ``g`` like the compiled op: ``run_reference(g, x, w, eps=1e-5)``. Needs a graph
    without calls (see passes.pipeline.canonical_graph)."""
    values = bind_args(g, args, kwargs)
    bindings = bind_sizes(g, values, check_dtype=not check)
    outs = run_graph(g, values, bindings, check=check)
    return tuple(outs) if g.tuple_result else outs[0]


def reference_outputs(g: Graph, values: Mapping[str, Any], bindings: Mapping[str, int]) -> Sequence[torch.Tensor]:
    """The float64 oracle's outputs."""
    return run_graph(g, values, bindings, check=True)
