"""The width of a call's index arithmetic.

Kernels compute offsets as ``index * stride`` from program ids and aranges, in int32 as the
Triton tutorials do: fast, and exact while every offset stays below 2**31. A call where some
offset could reach that (16K tokens of 131K-entry logits is 2**31 elements) runs the wide
variant of every kernel instead, lowered with int64 index arithmetic (ir/tile_builder.index64),
built on first need. The test is on the call's real sizes and strides:
- every buffer of the plan (inputs, intermediates, outputs) and every value the kernels index,
  by its element count under the bindings (once per distinct bindings);
- every input tensor by its span, the largest offset its strides reach (a view may reach past
  its element count).
``OPFORGE_INDEX64=1`` runs every call wide (tests use it to check the wide kernels).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..ir.dims import Dim, evaluate
from ..ir.tile import Plan
from ..ir.types import TensorType
from . import env

INT32_LIMIT = 2 ** 31


def numel(shape) -> Dim:
    n: Dim = 1
    for d in shape:
        n = n * d
    return n


def plan_extents(plan: Plan, graph) -> tuple[Dim, ...]:
    """The element counts whose indices a call's kernels compute, symbolically."""
    out: dict = {}
    for buf in plan.buffers.values():
        out[numel(buf.shape)] = None
    for n in graph.nodes:
        for v in n.inputs + n.outputs:
            if isinstance(v.type, TensorType):
                out[numel(v.type.shape)] = None
    return tuple(d for d in out if not isinstance(d, int) or d >= INT32_LIMIT)


def span(t: torch.Tensor) -> int:
    """The largest element offset a tensor's strides reach from its first element."""
    if t.numel() == 0:
        return 0
    return sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))


def forced() -> bool:
    return env.flag("OPFORGE_INDEX64")


def sizes_need_index64(extents: tuple[Dim, ...], bindings: Mapping[str, int]) -> bool:
    return any(evaluate(d, bindings) >= INT32_LIMIT for d in extents)


def inputs_need_index64(values: Mapping[str, Any]) -> bool:
    return any(isinstance(t, torch.Tensor) and span(t) >= INT32_LIMIT for t in values.values())
