"""Emitting level-1 nodes from a pass: each primitive's rule types the outputs, as the front
end does, so rewritten graphs verify like built ones."""
from __future__ import annotations

from . import registry
from .graph import Attrs, Node, Value
from .types import DType, ScalarType


class Emitter:
    def __init__(self, span=None):
        self.nodes: list[Node] = []
        self.span = span

    def __call__(self, op: str, inputs, attrs=None, name: str | None = None, out: Value | None = None) -> Value:
        """One output of a new node; ``out`` reuses a given value (it must type the same)."""
        prim = registry.get(op)
        types, attrs = prim.run_infer([v.type for v in inputs], dict(attrs or {}))
        if out is not None:
            if out.type != types[0]:
                raise AssertionError(f"{op} gives {types[0]}, the value it replaces is {out.type}")
            outs = (out,)
        else:
            outs = tuple(Value(t, name) for t in types)
        self.nodes.append(Node(op, tuple(inputs), Attrs(attrs), outs, self.span))
        return outs[0]

    def multi(self, op: str, inputs, attrs=None) -> tuple[Value, ...]:
        """All outputs of a new node."""
        prim = registry.get(op)
        types, attrs = prim.run_infer([v.type for v in inputs], dict(attrs or {}))
        outs = tuple(Value(t) for t in types)
        self.nodes.append(Node(op, tuple(inputs), Attrs(attrs), outs, self.span))
        return outs

    def const(self, value, dtype: DType) -> Value:
        v = Value(ScalarType(dtype))
        self.nodes.append(Node("const", (), Attrs({"value": value, "dtype": dtype}), (v,), self.span))
        return v
