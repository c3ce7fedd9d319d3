"""The ``call`` node: a call of another op of the same file, typed by the front end against the
callee's signature (its size symbols unified with the arguments'), removed by passes/inline.py."""
from __future__ import annotations

from .registry import Kind, primitive
from .vjp import NoGrad


def _call_infer(types, attrs):
    raise RuntimeError("calls are typed by the front end against the callee's signature")


def _call_ref(ctx, inputs, attrs, out_types, in_types):
    raise RuntimeError("calls are inlined before execution (passes.inline)")


primitive("call", Kind.CALL, internal=True, doc="a call of another op of the same file",
          vjp=NoGrad("calls are inlined before gradients are derived"))(
    infer=_call_infer, reference=_call_ref)
