"""Registering compiled ops with torch.library, as ``torch.ops.<namespace>.<op>``.

Two paths, one schema:
- ``custom_op`` with ``register_fake``: the op is opaque to torch.compile, which calls it
  through the fake implementation's shapes; passes ``opcheck`` and ``fullgraph=True`` on any
  device (the interpreter too). The default.
- ``triton_op``: the implementation launches kernels through ``wrap_triton``, so torch.compile
  can see into them (GPU only; torch.compile of a triton_op reads data pointers of fake
  tensors, which fails on the CPU). Chosen with registration="triton_op" or
  OPFORGE_REGISTRATION=triton_op.
The registered function is a trampoline to the op's current implementation, so compiling a
changed spec again in the same process re-points the op; a changed signature needs a new
namespace (torch.library cannot redefine an op).
"""
from __future__ import annotations

import inspect
import os
from typing import Callable

import torch

from ..ir.graph import Graph
from ..ir.types import TensorType

_IMPLS: dict[str, object] = {}        # "ns::name" -> the CompiledOp behind it
_SCHEMAS: dict[str, tuple[str, str]] = {}   # "ns::name" -> (schema, registration)


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
    mode = requested or os.environ.get("OPFORGE_REGISTRATION", "custom_op")
    if mode not in ("custom_op", "triton_op"):
        raise ValueError(f"registration must be custom_op or triton_op, not {mode!r}")
    return mode


def register(namespace: str, g: Graph, compiled, mode: str) -> Callable:
    """Register (or re-point) ``namespace::g.name``; returns ``torch.ops.namespace.name``."""
    qual = f"{namespace}::{g.name}"
    schema = schema_of(g)
    if qual in _SCHEMAS:
        old_schema, old_mode = _SCHEMAS[qual]
        if old_schema != schema:
            raise RegistrationError(
                f"torch.ops.{namespace}.{g.name} is already registered as {old_schema}; the new spec "
                f"gives {schema}. torch.library cannot redefine an op: pass another namespace= "
                f"(or restart the process)")
        _IMPLS[qual] = compiled
        return getattr(getattr(torch.ops, namespace), g.name)

    names = [p.name for p in g.params]

    def positional(args, kwargs):
        return list(args) + [kwargs[n] for n in names[len(args):] if n in kwargs]

    def impl(*args, **kwargs):
        return _IMPLS[qual].run(*positional(args, kwargs))

    def fake(*args, **kwargs):
        return _IMPLS[qual].fake(*positional(args, kwargs))

    # torch infers a triton_op's schema from the Python signature: give the trampoline the op's
    impl.__signature__ = python_signature(g)

    if mode == "triton_op":
        torch.library.triton_op(qual, impl, mutates_args=(), schema=schema)
    else:
        torch.library.custom_op(qual, impl, mutates_args=(), schema=schema)
    torch.library.register_fake(qual, fake)
    _IMPLS[qual] = compiled
    _SCHEMAS[qual] = (schema, mode)
    return getattr(getattr(torch.ops, namespace), g.name)


_LIBRARIES: list = []     # torch.library.Library objects must stay alive for their registrations


def register_composite(namespace: str, g: Graph, compiled) -> Callable:
    """Register (or re-point) ``namespace::g.name`` as a CompositeImplicitAutograd op whose
    implementation is ``compiled.gradients.forward`` (runtime/autograd.py): it calls other
    registered ops (the plain forward, or the forward that saves for the backward), so autograd
    and torch.compile see through it to ops with autograd formulas and fake implementations."""
    qual = f"{namespace}::{g.name}"
    schema = schema_of(g)
    if qual in _SCHEMAS:
        old_schema, _ = _SCHEMAS[qual]
        if old_schema != schema:
            raise RegistrationError(
                f"torch.ops.{namespace}.{g.name} is already registered as {old_schema}; the new spec "
                f"gives {schema}. torch.library cannot redefine an op: pass another namespace= "
                f"(or restart the process)")
        _IMPLS[qual] = compiled
        return getattr(getattr(torch.ops, namespace), g.name)
    names = [p.name for p in g.params]
    defaults = {p.name: p.default for p in g.params if p.has_default}

    def impl(*args, **kwargs):
        full = list(args) + [kwargs[n] if n in kwargs else defaults[n] for n in names[len(args):]]
        return _IMPLS[qual].gradients.forward(full)

    lib = torch.library.Library(namespace, "FRAGMENT")
    lib.define(f"{g.name}{schema}")
    lib.impl(g.name, impl, "CompositeImplicitAutograd")
    _LIBRARIES.append(lib)
    _IMPLS[qual] = compiled
    _SCHEMAS[qual] = (schema, "composite")
    return getattr(getattr(torch.ops, namespace), g.name)
