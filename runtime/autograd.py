"""Gradients of compiled ops, registered with torch autograd.

An op that can be differentiated (a float tensor parameter that is not a packed weight, and a
float result) is registered as three kinds of torch op (runtime/library.py):
- ``ns::op``, the op users call: CompositeImplicitAutograd. When no input needs a gradient it
  runs ``ns::op__infer`` (the plain forward kernels); otherwise ``ns::op__fwd_<mask>``, the
  forward for that set of inputs, and returns its first results;
- ``ns::op__fwd_<mask>``: the forward kernels, which also store what the backward reads
  (passes/autodiff.py decides: inputs, results, contraction and reduction results), with
  ``torch.library.register_autograd`` (setup_context saves exactly those);
- ``ns::op__bwd_<mask>``: the backward graph's kernels (fused, lowered, cached and tuned like
  any op), with a fake implementation, so torch.compile traces forward and backward.
``<mask>`` has one digit per differentiable parameter (1: differentiated), built on first use.
Gradients nobody asked for (``ctx.needs_input_grad``) are not computed: the backward for just
those is used when the forward saved what it reads. Double backward, and a gradient asked of a
packed weight, are CallErrors that say so.
"""
from __future__ import annotations

from typing import Any

import torch

from ..ir.graph import Graph
from ..ir.vjp import NoGradient
from ..passes.autodiff import Derivative, derive, differentiable_params
from .binding import CallError


class Variant:
    """One set of differentiated inputs: the forward and backward ops and how to call them."""

    def __init__(self, owner: "Gradients", mask: tuple[bool, ...]):
        self.owner = owner
        op = owner.op
        self.mask = mask
        self.bits = "".join("1" if m else "0" for m in mask)
        self.wrt = tuple(n for n, m in zip(owner.params, mask) if m)
        try:
            self.derivative: Derivative = derive(owner.source, self.wrt)
        except NoGradient as e:
            raise CallError(f"{op.public}(): no gradient with respect to {', '.join(self.wrt)}: {e}") from None
        self.forward = op.derived(self.derivative.forward, f"{op.name}__fwd_{self.bits}")
        self.backward = op.derived(self.derivative.backward, f"{op.name}__bwd_{self.bits}")
        self.index = {p.name: i for i, p in enumerate(op.graph.params)}
        self._register()

    def _register(self) -> None:
        qual = f"{self.owner.op.namespace}::{self.forward.name}"
        first = qual not in _CURRENT
        _CURRENT[qual] = self          # a spec compiled again re-points the registration
        if first:
            def backward(ctx, *grads):
                return ctx.opforge_variant.backward_of(ctx, grads)

            def setup_context(ctx, inputs, output):
                _CURRENT[qual].setup_context(ctx, inputs, output)
            torch.library.register_autograd(qual, backward, setup_context=setup_context)

    def setup_context(self, ctx, inputs, output) -> None:
        """Keep what the backward reads: forward inputs and results (the saved values among them)."""
        output = output if isinstance(output, (tuple, list)) else (output,)
        kept = [inputs[s.index] if s.kind == "input" else output[s.index]
                for s in self.derivative.sources if s is not None]
        ctx.save_for_backward(*[x for x in kept if isinstance(x, torch.Tensor)])
        ctx.opforge_kept = [None if isinstance(x, torch.Tensor) else x for x in kept]
        ctx.opforge_variant = self

    def backward_of(self, ctx, grads):
        name = self.owner.op.public
        if torch.is_grad_enabled():
            raise CallError(f"{name}(): gradients of its gradients (double backward, create_graph=True) "
                            f"are not supported")
        d = self.derivative
        saved = iter(ctx.saved_tensors)
        kept = iter([next(saved) if x is None else x for x in ctx.opforge_kept])
        cts = iter(d.cotangents)
        args = []
        for s in d.sources:
            if s is None:
                i = next(cts)
                if grads[i] is None:
                    raise CallError(f"{name}(): no gradient reached its result {i}")
                args.append(grads[i])
            else:
                args.append(next(kept))
        outs = self.backward.torch_op(*args)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        result: list[Any] = [None] * len(self.owner.op.graph.params)
        for k, w in enumerate(self.wrt):
            i = self.index[w]
            if ctx.needs_input_grad[i]:
                result[i] = outs[k]
        return tuple(result)


_CURRENT: dict[str, Variant] = {}   # "ns::op__fwd_mask" -> the variant its autograd runs


class Gradients:
    """The derivatives of one compiled op, by set of differentiated inputs."""

    def __init__(self, op, source, frozen=()):
        self.op = op
        self._source = source                   # the graph derivatives are taken of, or a function giving it
        self.frozen = frozenset(frozen)         # packed weights: never differentiated
        self.params = differentiable_params(op.graph, self.frozen)
        self._variants: dict[tuple, Variant] = {}

    @property
    def source(self) -> Graph:
        if callable(self._source):
            self._source = self._source()       # the op's plan loads at its first gradient
        return self._source

    @property
    def differentiable(self) -> bool:
        return bool(self.params) and any(t.dtype.is_float for t in self.op.graph.result_types)

    @staticmethod
    def wanted(args) -> bool:
        """Could this call need a gradient (cheap: grad mode and some input requiring grad)?"""
        return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)

    def mask(self, args) -> tuple[bool, ...]:
        """Which differentiable inputs need a gradient in this call (none outside grad mode)."""
        if not torch.is_grad_enabled():
            return (False,) * len(self.params)
        values = dict(zip((p.name for p in self.op.graph.params), args))
        for name in self.frozen:
            x = values.get(name)
            if isinstance(x, torch.Tensor) and x.requires_grad:
                raise CallError(f"{self.op.public}(): '{name}' is a packed weight, frozen once bound: it has no "
                                f"gradient (gradients flow through it to the other inputs); leave its "
                                f"requires_grad off")
        return tuple(isinstance(values.get(n), torch.Tensor) and values[n].requires_grad for n in self.params)

    def variant(self, mask: tuple[bool, ...]) -> Variant:
        if mask not in self._variants:
            self._variants[mask] = Variant(self, mask)
        return self._variants[mask]

    def forward(self, args):
        """The op's results, through the forward that saves for the backward when any input
        needs a gradient (the composite op's implementation)."""
        mask = self.mask(args)
        op = self.op
        if not any(mask):
            return op.infer_op(*args)
        v = self.variant(mask)
        outs = v.forward.torch_op(*args)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        res = tuple(outs[: v.derivative.n_results])
        return res if op.graph.tuple_result else res[0]
