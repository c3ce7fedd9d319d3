"""Registering compiled ops with torch.library, as ``torch.ops.<namespace>.<op>``.

Three paths, one schema, chosen with registration=... or OPFORGE_REGISTRATION:
- ``library`` (the default): ``torch.library.Library(ns, "FRAGMENT")``, ``define`` and ``impl``
  for CompositeExplicitAutograd (every backend), the fake implementation with
  ``torch.library.register_fake``. The op is opaque to torch.compile, which calls it through the
  fake implementation's shapes; passes ``opcheck`` and ``fullgraph=True`` on any device (the
  interpreter too), and takes ``torch.library.register_autograd`` (it has no Autograd kernel
  of its own). The cheapest dispatch: the C++ dispatcher calls the implementation directly,
  where ``custom_op`` adds Python layers (its autograd wrapper, its checks); measured with
  ``opforge bench --host`` (README: about 1.1 us a call against about 6 us).
- ``custom_op``: ``torch.library.custom_op`` with ``register_fake``, the same behaviour at the
  higher cost (kept to compare).
- ``triton_op``: the implementation launches kernels through ``wrap_triton``, so torch.compile
  can see into them (GPU only; torch.compile of a triton_op reads data pointers of fake
  tensors, which fails on the CPU). It is a custom_op underneath, so it costs the same.
Compiling a changed spec again in the same process re-points the op (a changed signature needs
a new namespace: torch.library cannot redefine an op). Under ``library`` the registered
function is the op's generated call function (runtime/records.py), re-pointed by updating the
state it reads; under the other two it is a trampoline to the op's current implementation.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import sys
import threading
from typing import Callable

import torch

from ..ir.graph import Graph
from ..ir.types import TensorType
from . import sharding

_IMPLS: dict[str, object] = {}        # "ns::name" -> the CompiledOp behind it
_SCHEMAS: dict[str, tuple[str, str]] = {}   # "ns::name" -> (schema, registration)
_LIBRARIES: dict[str, torch.library.Library] = {}   # kept alive: a Library's registrations end with it
_DIRECT: dict[str, Callable] = {}     # "ns::name" -> the call function registered under library
MODES = ("library", "custom_op", "triton_op")


def library_of(namespace: str) -> torch.library.Library:
    """The namespace's torch.library.Library fragment (one per namespace, kept alive)."""
    lib = _LIBRARIES.get(namespace)
    if lib is None:
        lib = _LIBRARIES[namespace] = torch.library.Library(namespace, "FRAGMENT")
    return lib


class RegistrationError(RuntimeError):
    pass


def scalar_type(dtype) -> str:
    if dtype.is_float:
        return "float"
    if dtype.is_bool:
        return "bool"
    return "int"


def default_text(v) -> str:
    if isinstance(v, bool):
        return "True" if v else "False"
    return repr(v)


def schema_of(g: Graph) -> str:
    params = []
    for p in g.params:
        if isinstance(p.value.type, TensorType):
            params.append(f"Tensor {p.name}")
        else:
            s = f"{scalar_type(p.value.type.dtype)} {p.name}"
            if p.has_default:
                s += f"={default_text(p.default)}"
            params.append(s)
    rets = "Tensor" if len(g.result_types) == 1 and not g.tuple_result else \
        "(" + ", ".join("Tensor" for _ in g.result_types) + ")"
    return f"({', '.join(params)}) -> {rets}"


PY_TYPES = {"float": float, "int": int, "bool": bool}


def python_signature(g: Graph) -> inspect.Signature:
    params = []
    for p in g.params:
        if isinstance(p.value.type, TensorType):
            ann, default = torch.Tensor, inspect.Parameter.empty
        else:
            ann = PY_TYPES[scalar_type(p.value.type.dtype)]
            default = p.default if p.has_default else inspect.Parameter.empty
        params.append(inspect.Parameter(p.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default,
                                        annotation=ann))
    ret = torch.Tensor if len(g.result_types) == 1 and not g.tuple_result else \
        tuple.__class_getitem__(tuple(torch.Tensor for _ in g.result_types))
    return inspect.Signature(params, return_annotation=ret)


def registration_mode(requested: str | None = None) -> str:
    mode = requested or os.environ.get("OPFORGE_REGISTRATION", "library")
    if mode not in MODES:
        raise ValueError(f"registration must be library, custom_op or triton_op, not {mode!r}")
    return mode


def _same_schema(qual: str, schema: str) -> None:
    """A spec compiled again re-points ``qual``; its schema must be the registered one."""
    old_schema, _ = _SCHEMAS[qual]
    if old_schema != schema:
        raise RegistrationError(
            f"torch.ops.{qual.replace('::', '.')} is already registered as {old_schema}; the new spec "
            f"gives {schema}. torch.library cannot redefine an op: pass another namespace= "
            f"(or restart the process)")


_PATCHING = threading.Lock()     # _plain_source patches process-wide functions: one registration at a time


@contextlib.contextmanager
def _plain_source():
    """register_fake records where it was called from with inspect.getframeinfo, which reads
    and scans this file (about 12 ms a call, most of a warm compile's time), and the caller's
    module with inspect.getmodule; the file and line of the caller, and the module, from the
    frame say the same."""
    utils = getattr(getattr(torch, "_library", None), "utils", None)
    real = getattr(utils, "get_source", None)
    if real is None:
        yield
        return

    def get_source(stacklevel: int) -> str:
        f = sys._getframe(stacklevel + 1)
        return f"{f.f_code.co_filename}:{f.f_lineno}"

    real_getmodule = inspect.getmodule

    def getmodule(obj, _filename=None):
        # the caller's module from the frame's globals; inspect's first call maps the file of
        # every loaded module (thousands with torch: about 10 ms)
        if inspect.isframe(obj):
            module = sys.modules.get(obj.f_globals.get("__name__", ""))
            if module is not None:
                return module
        return real_getmodule(obj, _filename)
    with _PATCHING:
        utils.get_source, inspect.getmodule = get_source, getmodule
        try:
            yield
        finally:
            utils.get_source, inspect.getmodule = real, real_getmodule


def register(namespace: str, g: Graph, compiled, mode: str) -> Callable:
    """Register (or re-point) ``namespace::g.name``; returns ``torch.ops.namespace.name``."""
    qual = f"{namespace}::{g.name}"
    schema = schema_of(g)
    if qual in _SCHEMAS:
        _same_schema(qual, schema)
        _IMPLS[qual] = compiled
        if qual in _DIRECT:
            _DIRECT[qual].__globals__.update(compiled.call_state())
        return getattr(getattr(torch.ops, namespace), g.name)

    names = [p.name for p in g.params]

    def positional(args, kwargs):
        return list(args) + [kwargs[n] for n in names[len(args):] if n in kwargs]

    def impl(*args, **kwargs):
        if kwargs:
            args = positional(args, kwargs)
        return _IMPLS[qual].run(*args)

    def fake(*args, **kwargs):
        return _IMPLS[qual].fake(*positional(args, kwargs))

    # torch infers a triton_op's schema from the Python signature: give the trampoline the op's
    impl.__signature__ = python_signature(g)

    if mode == "triton_op":
        torch.library.triton_op(qual, impl, mutates_args=(), schema=schema)
    elif mode == "custom_op":
        torch.library.custom_op(qual, impl, mutates_args=(), schema=schema)
    else:
        lib = library_of(namespace)
        lib.define(f"{g.name}{schema}")
        # no trampoline: the dispatcher calls the op's call function itself
        _DIRECT[qual] = direct = compiled.call_function()
        lib.impl(g.name, direct, "CompositeExplicitAutograd")
    with _plain_source():
        torch.library.register_fake(qual, fake)
    _IMPLS[qual] = compiled
    _SCHEMAS[qual] = (schema, mode)
    packet = getattr(getattr(torch.ops, namespace), g.name)
    sharding.note(qual, packet)      # its DTensor sharding rule (now, or when DTensor loads)
    return packet


def register_composite(namespace: str, g: Graph, compiled, route: str = "gradients") -> Callable:
    """Register (or re-point) ``namespace::g.name`` as a CompositeImplicitAutograd op that
    routes to other registered ops, so autograd and torch.compile see through it to ops with
    autograd formulas and fake implementations. ``route``: ``"gradients"``, the implementation is
    ``compiled.gradients.forward`` (runtime/autograd.py: the plain forward, or the forward that
    saves for the backward); ``"generic"``, it is ``compiled.dispatch`` (runtime/generic.py: the
    registered op of the binding the arguments' dtypes pick); ``"scan"``, also ``compiled.dispatch``
    (runtime/scan.py: the op's pieces and the steps of its scans)."""
    qual = f"{namespace}::{g.name}"
    schema = schema_of(g)
    if qual in _SCHEMAS:
        _same_schema(qual, schema)
        _IMPLS[qual] = compiled
        return getattr(getattr(torch.ops, namespace), g.name)
    names = [p.name for p in g.params]
    defaults = {p.name: p.default for p in g.params if p.has_default}

    def impl(*args, **kwargs):
        full = list(args) + [kwargs[n] if n in kwargs else defaults[n] for n in names[len(args):]]
        target = _IMPLS[qual]
        return target.dispatch(full) if route in ("generic", "scan") else target.gradients.forward(full)

    lib = library_of(namespace)
    lib.define(f"{g.name}{schema}")
    lib.impl(g.name, impl, "CompositeImplicitAutograd")
    _IMPLS[qual] = compiled
    _SCHEMAS[qual] = (schema, "composite" if route == "gradients" else route)
    return getattr(getattr(torch.ops, namespace), g.name)
