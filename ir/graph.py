"""Level 1: SSA values, nodes and graphs.

Values are compared by identity (one object per SSA value); nodes and graphs are immutable, and
passes build new graphs instead of editing shared ones. Every node keeps the source span of the
expression it came from, so that errors found late still point at the user's text.
"""
from __future__ import annotations

import contextlib
import functools
import gc
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .dims import free_symbols
from .types import DType, ScalarType, TensorType, Type


@dataclass(frozen=True)
class Source:
    """A spec's text and the name it is reported under (a path or '<string>')."""
    name: str
    text: str

    def line(self, n: int) -> str:
        lines = self.text.splitlines()
        return lines[n - 1] if 0 < n <= len(lines) else ""


@dataclass(frozen=True)
class Span:
    source: Source
    line: int
    col: int
    end_line: int
    end_col: int

    def __repr__(self) -> str:
        return f"Span({self.source.name}:{self.line}:{self.col})"


class Value:
    """One SSA value. ``name`` is a hint for printing (the spec's name where there is one)."""

    __slots__ = ("type", "name")

    def __init__(self, type: Type, name: str | None = None):
        self.type = type
        self.name = name

    @property
    def dtype(self):
        return self.type.dtype

    @property
    def shape(self):
        return self.type.shape

    @property
    def is_scalar(self) -> bool:
        return isinstance(self.type, ScalarType)

    def __repr__(self) -> str:
        return f"Value({self.name or hex(id(self))}: {self.type})"


class Attrs(Mapping[str, Any]):
    """A frozen, hashable mapping of node attributes, iterated in sorted key order."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any] | Iterable[tuple[str, Any]] = ()):
        d = dict(items)
        self._items = tuple(sorted(d.items()))

    def __getitem__(self, k):
        for key, v in self._items:
            if key == k:
                return v
        raise KeyError(k)

    def __iter__(self):
        return (k for k, _ in self._items)

    def __len__(self):
        return len(self._items)

    def __hash__(self):
        return hash(self._items)

    def __eq__(self, other):
        return isinstance(other, Attrs) and self._items == other._items

    def replace(self, **kw) -> "Attrs":
        d = dict(self._items)
        d.update(kw)
        return Attrs(d)

    def __repr__(self):
        return f"Attrs({dict(self._items)})"


@dataclass(frozen=True, eq=False)
class Node:
    op: str
    inputs: tuple[Value, ...]
    attrs: Attrs
    outputs: tuple[Value, ...]
    span: Span | None = None

    @property
    def out(self) -> Value:
        assert len(self.outputs) == 1, f"{self.op} has {len(self.outputs)} outputs"
        return self.outputs[0]


@dataclass(frozen=True)
class Layout:
    """A weight layout annotation, ``@quant(int4, group=128)``: kind, positional and keyword args."""
    kind: str
    args: tuple[Any, ...] = ()
    kwargs: Attrs = field(default_factory=Attrs)
    span: Span | None = None

    def __str__(self) -> str:
        def show(a):
            return a if isinstance(a, str) else f"{a[0]}:{a[1]}" if isinstance(a, tuple) else _fmt_attr(a)
        parts = [show(a) for a in self.args] + [f"{k}={show(v)}" for k, v in self.kwargs.items()]
        return f"@{self.kind}({', '.join(parts)})"

    def __eq__(self, other):
        return isinstance(other, Layout) and (self.kind, self.args, self.kwargs) == (other.kind, other.args, other.kwargs)

    def __hash__(self):
        return hash((self.kind, self.args, self.kwargs))


@dataclass(frozen=True, eq=False)
class Param:
    """An op parameter: a tensor (possibly with a layout) or a scalar attribute with a default."""
    name: str
    value: Value
    default: Any = None
    has_default: bool = False
    layout: Layout | None = None
    span: Span | None = None

    @property
    def is_tensor(self) -> bool:
        return isinstance(self.value.type, TensorType)


@dataclass(frozen=True, eq=False)
class Graph:
    name: str
    params: tuple[Param, ...]
    nodes: tuple[Node, ...]
    outputs: tuple[Value, ...]
    result_types: tuple[Type, ...]
    tuple_result: bool = False
    span: Span | None = None

    @property
    def inputs(self) -> tuple[Value, ...]:
        return tuple(p.value for p in self.params)

    @property
    def tensor_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.is_tensor)

    @property
    def scalar_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.is_tensor)

    @functools.cached_property
    def used_symbols(self) -> tuple[str, ...]:
        """Every size symbol the graph uses (in tensor parameters' and values' shapes and in
        node attributes), in the order first met."""
        used: dict[str, None] = {}

        def visit(x):
            if isinstance(x, (tuple, list)):
                for y in x:
                    visit(y)
            elif hasattr(x, "terms") and hasattr(x, "symbols"):
                used.update(dict.fromkeys(sorted(x.symbols)))
        for p in self.params:
            if p.is_tensor:
                used.update(dict.fromkeys(sorted(free_symbols(list(p.value.type.shape)))))
        for n in self.nodes:
            for v in n.outputs:
                if isinstance(v.type, TensorType):
                    used.update(dict.fromkeys(sorted(free_symbols(list(v.type.shape)))))
            for a in n.attrs.values():
                visit(a)
        return tuple(used)

    @functools.cached_property
    def size_params(self) -> tuple[str, ...]:
        """Integer scalar parameters used as sizes (``reshape(x, [B, S, heads, -1])``): a call
        binds the size symbol of that name to the argument's value."""
        names = {p.name for p in self.scalar_params if p.value.type.dtype.is_int and not p.value.type.dtype.is_bool}
        if not names:
            return ()
        used = set(self.used_symbols)
        return tuple(p.name for p in self.scalar_params if p.name in names and p.name in used)

    @property
    def symbols(self) -> tuple[str, ...]:
        """Size symbols in the order they first appear in the tensor parameters."""
        seen: list[str] = []
        for p in self.tensor_params:
            for d in p.value.type.shape:
                for s in sorted(free_symbols([d])):
                    if s not in seen:
                        seen.append(s)
        return tuple(seen)

    def producers(self) -> dict[Value, Node]:
        return {v: n for n in self.nodes for v in n.outputs}

    def users(self) -> dict[Value, list[Node]]:
        out: dict[Value, list[Node]] = {}
        for n in self.nodes:
            for v in n.inputs:
                out.setdefault(v, []).append(n)
        return out

    def replace(self, **kw) -> "Graph":
        d = dict(name=self.name, params=self.params, nodes=self.nodes, outputs=self.outputs,
                 result_types=self.result_types, tuple_result=self.tuple_result, span=self.span)
        d.update(kw)
        return Graph(**d)


def _fmt_attr(v: Any) -> str:
    from .types import DType
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if v == float("inf"):
            return "inf"
        if v == float("-inf"):
            return "-inf"
        return repr(v)
    if isinstance(v, DType):
        return v.text
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_fmt_attr(x) for x in v) + "]"
    if v is None:
        return "None"
    return str(v)


fmt_attr = _fmt_attr


@dataclass(frozen=True, eq=False)
class Program:
    """All ops of one spec file, in definition order; ``namespace`` names their torch.library
    namespace (the file's stem unless given). A dtype-generic op has one graph per binding of
    its dtype variables (``rms_norm__f16``, ...), listed in ``generics`` under its own name."""
    namespace: str
    source: Source
    graphs: dict[str, Graph]
    generics: dict[str, "Generic"] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Graph:
        return self.graphs[name]

    def replace_graphs(self, graphs: dict[str, Graph]) -> "Program":
        return Program(self.namespace, self.source, graphs, self.generics)

    @property
    def op_names(self) -> list[str]:
        """The ops users call, in definition order: each graph's own name, and a dtype-generic
        op's name once for all its bindings."""
        return list(dict.fromkeys(self.op_of(n) for n in self.graphs))

    def binding(self, name: str, dtype) -> str | None:
        """The graph of dtype-generic op ``name``'s binding of ``dtype`` (every variable bound
        to it; a DType or its spec name), or None if it has none."""
        if isinstance(dtype, str):
            from .types import SPEC_DTYPES
            dtype = SPEC_DTYPES.get(dtype)
        return next((g for k, g in self.generics[name].instances.items()
                     if dtype is not None and all(d == dtype for d in k)), None)

    def graph_of(self, name: str, dtype=None) -> str:
        """The graph of op ``name``: its own, or of a dtype-generic op the binding of ``dtype``
        where it admits one (:meth:`binding`), else its first binding."""
        info = self.generics.get(name)
        if info is None:
            return name
        return self.binding(name, dtype) or next(iter(info.instances.values()))

    def op_of(self, graph: str) -> str:
        """The op a graph is of: a dtype-generic op's name for each of its bindings' graphs."""
        for info in self.generics.values():
            if graph in info.instances.values():
                return info.name
        return graph


@dataclass
class Generic:
    """A dtype-generic op (``op rms_norm<T: f16 | bf16 | f32>(...)``): its dtype variables, the
    dtypes each admits, the tensor parameter each is read from at a call, and the graph name of
    each binding (a tuple of dtypes, one per variable)."""
    name: str
    variables: tuple[str, ...]
    dtypes: tuple[tuple[DType, ...], ...]
    sources: tuple[str, ...]
    instances: dict[tuple, str]
    typed: tuple[tuple[str, ...], ...] = ()     # per variable, every tensor parameter of that dtype

    def instance_name(self, *dtypes) -> str | None:
        return self.instances.get(tuple(dtypes))

    def admitted(self, sep: str = " = ") -> str:
        """The dtypes each variable admits, for messages: ``T = f16 | bf16 | f32``."""
        return "; ".join(f"{v}{sep}{' | '.join(map(str, ds))}" for v, ds in zip(self.variables, self.dtypes))


@contextlib.contextmanager
def collector_paused():
    """Python's cyclic garbage collector off while the front end and the graph passes run: they
    allocate hundreds of thousands of small objects, keep them, and make no cycles worth
    collecting, while each full collection walks everything allocated so far (which made
    checking a 10,000-statement spec grow faster than the spec). Re-entrant; restored on exit,
    when one collection may run."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def unique_param_names(params) -> list[Param]:
    """The parameters with clashing names renamed ``name_1``, ``name_2`` (graphs cut out of
    others: a scan's body, the pieces of an op with a scan)."""
    used: set[str] = set()
    out = []
    for p in params:
        name, k = p.name, 1
        while name in used:
            name, k = f"{p.name}_{k}", k + 1
        used.add(name)
        out.append(p if name == p.name else Param(name, p.value, p.default, p.has_default, p.layout, p.span))
    return out
