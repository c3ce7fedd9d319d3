"""Dtype-generic ops at run time: one compiled op per binding of the dtype variables.

``op rms_norm<T: f16 | bf16 | f32>(...)`` has one graph per binding (the front end builds and
checks them all: ``rms_norm__f16``, ...). ``mod.rms_norm`` is a :class:`GenericOp`: a call reads
each variable's dtype from its parameter's argument, compiles that binding's op on first use
(a CompiledOp registered as ``ns::rms_norm__f16``, cached like any op) and runs it. The op
users call, ``torch.ops.ns.rms_norm``, is one CompositeImplicitAutograd op doing the same
choice, so torch.compile and autograd see through it to the binding's registered op (its
fake implementation, its gradients). Anything else asked of a GenericOp (explain, plan,
kernel_count, ...) is its default binding's (the first, or the compile's ``dtype=``), or
``op.instance(torch.float16)``'s. A bound layer of a generic op follows ``.to(dtype)`` by
binding again in the new dtype (runtime/bound.py).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..ir.graph import Generic, Graph
from ..ir.torch_dtypes import FROM_TORCH, from_torch
from .binding import CallError, bind_args


class GenericOp:
    def __init__(self, namespace: str, info: Generic, graphs: dict[str, Graph], make: Callable[[str], Any],
                 default=None):
        """``graphs``: the instances' graphs by name; ``make(name)``: compile one (a CompiledOp);
        ``default``: the dtype of the binding tools see (``opforge run --dtype``), if admitted."""
        self.namespace = namespace
        self.info = info
        self.name = self.public = info.name
        self._graphs = graphs
        self._make = make
        self._compiled: dict[tuple, Any] = {}
        first = graphs[next(iter(info.instances.values()))]
        from .library import register_composite, schema_of
        schemas = {schema_of(graphs[n]) for n in info.instances.values()}
        if len(schemas) > 1:
            raise CallError(f"{info.name}: its bindings have different signatures ({' / '.join(sorted(schemas))}); "
                            f"a scalar parameter typed with a dtype variable must stay a float (or an integer) "
                            f"in every binding")
        combos = list(info.instances)
        self._default = next((c for c in combos if default is not None and all(d == default for d in c)), combos[0])
        # the signature every binding shares (checked: a scalar parameter's kind may not vary),
        # typed as the default binding (what tools and random inputs read)
        self.graph = graphs[info.instances[self._default]].replace(name=info.name)
        self.torch_op = register_composite(namespace, first.replace(name=info.name), self, route="generic")
        self._index = {p.name: i for i, p in enumerate(first.params)}
        self._default_sizes: dict = {}
        # the fast path of a call: the positions of the parameters the variables are read from
        self._sources = tuple(self._index[p] for p in info.sources)
        self._reach = max(self._sources, default=-1) + 1

    # -- choosing the binding ------------------------------------------------------------------
    def instance(self, *dtypes) -> Any:
        """The compiled op of one binding (torch or opforge dtypes, one per variable)."""
        key = tuple(from_torch(d) if isinstance(d, torch.dtype) else d for d in dtypes)
        op = self._compiled.get(key)
        if op is None:
            name = self.info.instance_name(*key)
            if name is None:
                raise CallError(f"{self.name}(): no binding {', '.join(map(str, key))}: it admits {self.info.admitted()}")
            op = self._compiled[key] = self._make(name)
            op.public = self.name
            op.default_sizes = self.default_sizes
        return op

    @property
    def default_sizes(self) -> dict:
        """The spec file's ``# shapes:`` sizes (explain's default), shared by every binding."""
        return self._default_sizes

    @default_sizes.setter
    def default_sizes(self, sizes: dict) -> None:
        self._default_sizes = sizes
        for op in self._compiled.values():
            op.default_sizes = sizes

    def binding_of(self, values: dict) -> tuple:
        """Each variable's dtype, from the argument of the parameter it is read from."""
        out = []
        for var, param, admitted in zip(self.info.variables, self.info.sources, self.info.dtypes):
            x = values.get(param)
            if not isinstance(x, torch.Tensor):
                raise CallError(f"{self.name}(): '{param}' must be a tensor (its dtype is {var}), got "
                                f"{type(x).__name__ if x is not None else 'nothing'}")
            dt = from_torch(x.dtype)
            if dt not in admitted:
                raise CallError(f"{self.name}(): '{param}' is {x.dtype}, and {var} admits "
                                f"{' | '.join(map(str, admitted))}; convert it with .to(...)")
            out.append(dt)
        return tuple(out)

    def dispatch(self, args: list) -> Any:
        """The composite ``ns::op``'s implementation: every argument positional."""
        values = dict(zip(self._index, args))
        return self.instance(*self.binding_of(values)).torch_op(*args)

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            # torch.compile: the registered op, opaque to Dynamo (a binding compiled at first use
            # is compiled where the op runs on fake tensors, not traced)
            return self.torch_op(*args, **kwargs)
        if not kwargs and len(args) >= self._reach:
            # positional arguments of a binding compiled before: its op, found by their dtypes
            src = self._sources
            try:
                op = self._compiled.get((FROM_TORCH[args[src[0]].dtype],) if len(src) == 1 else
                                        tuple([FROM_TORCH[args[i].dtype] for i in src]))
            except (AttributeError, KeyError):
                op = None
            if op is not None:
                return op(*args)
        values = bind_args(self.graph, args, kwargs)
        return self.instance(*self.binding_of(values))(*args, **kwargs)

    def bind(self, calibration=None, **weights):
        """A bound module of the binding the weights' dtypes pick (where the weights include
        each variable's parameter; else the default binding)."""
        key = []
        for i, (var, typed) in enumerate(zip(self.info.variables, self.info.typed)):
            given = next((weights[p] for p in typed if isinstance(weights.get(p), torch.Tensor)), None)
            key.append(from_torch(given.dtype) if given is not None else self._default[i])
        module = self.instance(*key).bind(calibration, **weights)
        module._generic = (self, tuple(key))      # .to(dtype) rebinds it (runtime/bound.py)
        return module

    @property
    def bindings(self) -> list[tuple]:
        return list(self.info.instances)

    def __getattr__(self, name: str):
        # what tools ask of a compiled op (plan, explain, kernel_count, ...): the default binding's
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.instance(*self._default), name)

    def __repr__(self) -> str:
        admitted = self.info.admitted(": ")
        built = ", ".join("/".join(map(str, k)) for k in self._compiled) or "none yet"
        return f"<opforge generic op {self.namespace}::{self.name}<{admitted}>: compiled {built}>"
