"""The primitive registry: one entry per primitive, holding in one place its signature as a spec
writes it, its shape and dtype rule, its kind, and its PyTorch reference implementation.

The entries live in the ``prims_*.py`` files beside this one and register themselves with
:func:`primitive`. Lowering to level 2 is keyed by kind and name in passes/lower_*.py, which
check at import that every non-internal primitive has a lowering. A missing rule or reference
fails at import, not in a user's run.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .types import Type


class Kind(enum.Enum):
    SOURCE = "source"            # constants, symbolic sizes used as values, causal masks
    POINTWISE = "pointwise"
    REDUCTION = "reduction"
    SCAN = "scan"
    CONTRACTION = "contraction"
    SHAPE = "shape"              # views and copies that move data without arithmetic
    GATHER = "gather"
    SELECTION = "selection"      # topk
    MOE = "moe"
    CALL = "call"                # a call of another op of the file, removed by inlining
    RECURRENCE = "recurrence"    # a scan over steps with carries (ir/prims_scan.py)
    FUSED = "fused"              # produced by pattern rewrites (flash attention, ...)


REQUIRED = object()


@dataclass(frozen=True)
class Arg:
    """One argument of a primitive as written in a spec.

    kind: ``tensor`` (an operand), ``tensors`` (any number of operands), ``int``, ``axes``
    (an int or a tuple of ints), ``ints`` (a list of ints), ``bool``, ``float``, ``str``,
    ``dtype``, ``dim`` (a size: a symbol or an int), ``dims`` (a list of sizes).
    """
    name: str
    kind: str
    default: Any = REQUIRED
    choices: tuple = ()

    @property
    def is_operand(self) -> bool:
        return self.kind in ("tensor", "tensors")

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


class RuleError(Exception):
    """A type or shape rule failed. ``arg`` names the argument to point at: an operand index
    (int) or an attribute name (str); None points at the whole call."""

    def __init__(self, message: str, hint: str | None = None, arg: int | str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.arg = arg


InferFn = Callable[[Sequence[Type], dict], "Sequence[Type] | tuple[Sequence[Type], dict]"]


@dataclass(frozen=True)
class Primitive:
    name: str
    kind: Kind
    args: tuple[Arg, ...]
    infer: InferFn
    reference: Callable[..., Any]
    doc: str = ""
    internal: bool = False        # not callable by name from a spec
    n_outputs: int = 1
    extra: dict = field(default_factory=dict)

    def run_infer(self, types: Sequence[Type], attrs: dict) -> tuple[list[Type], dict]:
        res = self.infer(types, dict(attrs))
        if isinstance(res, tuple) and len(res) == 2 and isinstance(res[1], dict):
            out, new_attrs = res
        else:
            out, new_attrs = res, dict(attrs)
        if not isinstance(out, (list, tuple)):
            out = [out]
        return list(out), new_attrs


REGISTRY: dict[str, Primitive] = {}


def primitive(name: str, kind: Kind, args: Sequence[Arg] = (), *, internal: bool = False,
              n_outputs: int = 1, doc: str = "", **extra):
    """Decorator-free registration: ``primitive(...)(infer=..., reference=...)``."""

    def register(infer: InferFn, reference: Callable) -> Primitive:
        if name in REGISTRY:
            raise RuntimeError(f"primitive {name!r} registered twice")
        if infer is None or reference is None:
            raise RuntimeError(f"primitive {name!r} needs both a type rule and a reference")
        p = Primitive(name, kind, tuple(args), infer, reference, doc, internal, n_outputs, dict(extra))
        REGISTRY[name] = p
        return p

    return register


def get(name: str) -> Primitive:
    _load()
    return REGISTRY[name]


def spec_builtins() -> dict[str, Primitive]:
    """The primitives a spec may call by name."""
    _load()
    return {n: p for n, p in REGISTRY.items() if not p.internal}


_loaded = False


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        from . import prims_elementwise, prims_reduce, prims_shape, prims_select, prims_contract  # noqa: F401
        from . import prims_call, prims_fused, prims_layout, prims_scan  # noqa: F401
        missing = sorted(n for n, p in REGISTRY.items() if "vjp" not in p.extra)
        if missing:
            raise RuntimeError(f"primitives without a gradient rule (vjp=..., or vjp=no_grad(why)): {missing}")
