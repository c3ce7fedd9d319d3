"""The ``scan`` node: a recurrence (DSL ``scan t in S [reverse] with CARRY, ... { BODY }``).

Attributes: ``body``, a level-1 graph whose parameters are, in order, the step index (an i64
scalar, when ``uses_index``), the carries, the step slices and the closed-over values, and whose
results are the carries' next values then the step's outputs; ``length`` (a size); ``reverse``;
``carries`` (how many); ``fills`` (per carry, the literal it starts from, or None when it starts
from an input); ``slice_axes`` (per step slice, the axis of its input that the step indexes).

Operands: the carries' first values (those not filled), the sliced values, the closed-over
values. Results: each step output stacked along a new leading axis of size ``length`` (the
output of step t at index t, with or without ``reverse``), then each carry's final value.

The reference runs the body step by step (the oracle of every lowering). Gradients are not
derived through a scan node: an op with a scan runs as its pieces (runtime/scan.py), each
differentiable, so autograd flows through the steps.
"""
from __future__ import annotations

import torch

from .dims import evaluate
from .registry import Kind, RuleError, primitive
from .types import TensorType
from .vjp import NoGrad


def scan_layout(attrs) -> tuple[int, int, int]:
    """(carry inputs, sliced inputs, closed-over inputs) of a scan node."""
    carried = sum(f is None for f in attrs["fills"])
    sliced = len(attrs["slice_axes"])
    body = attrs["body"]
    closed = len(body.params) - (1 if attrs["uses_index"] else 0) - attrs["carries"] - sliced
    return carried, sliced, closed


def _scan_infer(types, attrs):
    body, k = attrs["body"], attrs["carries"]
    carried, sliced, closed = scan_layout(attrs)
    if len(types) != carried + sliced + closed:
        raise RuleError(f"scan: {len(types)} operands, its body reads {carried + sliced + closed}")
    res = body.result_types
    if len(res) < k:
        raise RuleError(f"scan: the body gives {len(res)} values for {k} carries")
    stacked = [TensorType(t.dtype, (attrs["length"],) + tuple(t.shape)) for t in res[k:]]
    return stacked + list(res[:k])


def scan_steps(attrs, ins: list, bindings, step, full, stack) -> list:
    """The loop of a scan, for any executor: ``step(args)`` runs the body on its parameters (in
    order) and returns its results; ``full(type, value)`` makes a filled first carry; ``stack``
    stacks a list of step outputs (``empty(type)`` for a scan of length 0 is ``stack([], type)``)."""
    body, k = attrs["body"], attrs["carries"]
    carried, sliced, closed = scan_layout(attrs)
    inits, slices, rest = ins[:carried], ins[carried:carried + sliced], ins[carried + sliced:]
    it = iter(inits)
    params = body.params[(1 if attrs["uses_index"] else 0):]
    h = [full(p.value.type, f) if f is not None else next(it) for p, f in zip(params[:k], attrs["fills"])]
    n = evaluate(attrs["length"], bindings)
    outs: list = [None] * n
    order = range(n - 1, -1, -1) if attrs["reverse"] else range(n)
    for t in order:
        args = ([t] if attrs["uses_index"] else []) + h + [x.select(a, t) for x, a in zip(slices, attrs["slice_axes"])] + rest
        res = step(args)
        h, outs[t] = list(res[:k]), list(res[k:])
    n_out = len(body.result_types) - k
    stacked = [stack([o[j] for o in outs], body.result_types[k + j]) for j in range(n_out)]
    return stacked + h


def _scan_ref(ctx, inputs, attrs, out_types, in_types):
    from ..runtime.reference import run_graph
    body = attrs["body"]

    def step(args):
        return run_graph(body, {p.name: a for p, a in zip(body.params, args)}, ctx.bindings, check=ctx.check,
                         device=ctx.device)

    def full(t, value):
        return torch.full([evaluate(d, ctx.bindings) for d in t.shape], value, dtype=ctx.dt(t.dtype), device=ctx.device)

    def stack(xs, t):
        if not xs:
            return torch.empty([0] + [evaluate(d, ctx.bindings) for d in t.shape], dtype=ctx.dt(t.dtype), device=ctx.device)
        return torch.stack(xs)

    return scan_steps(attrs, list(inputs), ctx.bindings, step, full, stack)


primitive("scan", Kind.RECURRENCE, internal=True, n_outputs=-1,
          doc="a recurrence: the body run for each step, its carries passed on",
          vjp=NoGrad("an op with a scan is differentiated through its pieces (runtime/scan.py)"))(
    infer=_scan_infer, reference=_scan_ref)
