"""Binding a call's arguments to an op's parameters, and size symbols to integers.

Shared by the reference executor and the compiled ops, so both reject the same bad calls in the
same words, before any kernel is launched: the parameter, the expected type, the actual shape,
and the symbol bindings that disagree.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..ir.dims import Dim, evaluate, format_shape
from ..ir.graph import Graph
from ..ir.torch_dtypes import from_torch, to_torch
from ..ir.types import TensorType
from . import env


class CallError(ValueError):
    """A call with arguments of the wrong number, dtype, device, rank or size."""


def bind_args(g: Graph, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Python call semantics: positional, then keyword, then defaults."""
    names = [p.name for p in g.params]
    if len(args) > len(names):
        raise CallError(f"{g.name}() takes {len(names)} arguments ({', '.join(names)}), got {len(args)}")
    out = dict(zip(names, args))
    for k, v in kwargs.items():
        if k not in names:
            raise CallError(f"{g.name}() has no parameter '{k}'; its parameters are {', '.join(names)}")
        if k in out:
            raise CallError(f"{g.name}() got '{k}' twice")
        out[k] = v
    for p in g.params:
        if p.name not in out:
            if not p.has_default:
                raise CallError(f"{g.name}() is missing the argument '{p.name}' ({p.value.type})")
            out[p.name] = p.default
        else:
            check_kind(g, p, out[p.name])
    return out


def _shown(x) -> str:
    """An argument as an error message shows it: its type, and its value if it is short."""
    if x is None:
        return "None"
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {list(x.shape)} and dtype {from_torch(x.dtype) or x.dtype}"
    text = repr(x)
    name = type(x).__name__
    return f"{name} {text}" if len(text) <= 40 else name


def _number_kind(x) -> str | None:
    """'bool', 'int' or 'float' for a number a scalar parameter may take (Python, NumPy, a
    torch.Sym* under tracing, or a 0-d tensor); None for anything else."""
    if isinstance(x, torch.Tensor):
        if x.dim() != 0 or x.is_complex():
            return None
        return "bool" if x.dtype == torch.bool else "float" if x.dtype.is_floating_point else "int"
    if isinstance(x, (bool, np.bool_, torch.SymBool)):
        return "bool"
    if isinstance(x, (int, np.integer, torch.SymInt)):
        return "int"
    if isinstance(x, (float, np.floating, torch.SymFloat)):
        return "float"
    return None


SCALAR_ACCEPTS = {"bool": ("bool",), "int": ("int",), "float": ("int", "float")}
SCALAR_HINT = {"bool": "pass True or False", "int": "pass a Python int",
               "float": "pass a Python float (or int)"}


def check_kind(g: Graph, p, x) -> None:
    """A tensor parameter takes a dense torch.Tensor; a scalar parameter a number of its kind:
    a float parameter an int or a float, an integer one an int that fits its dtype, a bool one
    True or False (bool is not taken for a number, nor a number for a bool: each is more
    likely a mistake than meant). NumPy numbers and 0-d tensors count as numbers."""
    want = p.value.type
    if isinstance(want, TensorType):
        if not isinstance(x, torch.Tensor):
            hint = "; pass a torch.Tensor, e.g. torch.tensor(...)" if isinstance(x, (int, float, list, tuple)) \
                or type(x).__module__ == "numpy" else ""
            raise CallError(f"{g.name}(): '{p.name}' expects a tensor {want}, got {_shown(x)}{hint}")
        if x.layout != torch.strided:
            raise CallError(f"{g.name}(): '{p.name}' is a {str(x.layout).replace('torch.', '')} tensor; opforge ops "
                            f"take dense (strided) tensors: convert it with .to_dense()")
        return
    dtype = want.dtype
    kind = "float" if dtype.is_float else "bool" if dtype.is_bool else "int"
    if isinstance(x, torch.Tensor) and x.dim() != 0:
        raise CallError(f"{g.name}(): '{p.name}' is a scalar {want}, got a tensor of shape {list(x.shape)}")
    got = _number_kind(x)
    if got not in SCALAR_ACCEPTS[kind]:
        raise CallError(f"{g.name}(): '{p.name}' is a scalar {want}, got {_shown(x)}; {SCALAR_HINT[kind]}")
    if kind == "int" and isinstance(x, (int, np.integer)):
        from ..frontend.build import fits, int_range_text
        if not fits(int(x), dtype):
            raise CallError(f"{g.name}(): '{p.name}' is a scalar {want}, got {int(x)}, which does not fit: "
                            f"{int_range_text(dtype)}")


def bind_sizes(g: Graph, values: Mapping[str, Any], *, check_dtype: bool = True,
               device: torch.device | None = None) -> dict[str, int]:
    """Size symbol -> int from the tensor arguments' shapes, checking ranks, fixed sizes, dtypes
    and devices, and that every symbol gets one value."""
    bindings: dict[str, int] = {}
    origin: dict[str, str] = {}
    derived = []   # sizes like K/2 in a packed weight's shape, checked once the symbols are bound
    for name in g.size_params:        # integer scalars used as sizes bind their own symbol
        n = values[name]
        n = int(n.item()) if isinstance(n, torch.Tensor) else n
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise CallError(f"{g.name}(): '{name}' is used as a size, so it must be a whole number >= 0, got {n!r}")
        bindings[name] = n
        origin[name] = name
    for p in g.params:
        x = values[p.name]
        want = p.value.type
        if not isinstance(want, TensorType):
            if isinstance(x, torch.Tensor) and x.dim() != 0:
                raise CallError(f"{g.name}(): '{p.name}' is a scalar {want}, got a tensor of shape {list(x.shape)}")
            continue
        if not isinstance(x, torch.Tensor):
            raise CallError(f"{g.name}(): '{p.name}' expects a tensor {want}, got {type(x).__name__}")
        if check_dtype and x.dtype != to_torch(want.dtype):
            got = from_torch(x.dtype)
            raise CallError(f"{g.name}(): '{p.name}' expects dtype {want.dtype} ({want}), got "
                            f"{got or x.dtype}; convert it with .to({to_torch(want.dtype)})")
        if device is not None and x.device != device:
            raise CallError(f"{g.name}(): '{p.name}' is on {x.device}, the other inputs on {device}")
        if x.dim() != want.rank:
            raise CallError(f"{g.name}(): '{p.name}' expects rank {want.rank} {want}, got shape {list(x.shape)}")
        for axis, (d, n) in enumerate(zip(want.shape, x.shape)):
            if isinstance(d, int):
                if d != n:
                    raise CallError(f"{g.name}(): '{p.name}' expects {want}, got shape {list(x.shape)}: "
                                    f"axis {axis} must be {d}")
                continue
            if not d.is_symbol():
                derived.append((p, axis, d, int(n), list(x.shape)))
                continue
            (s,) = d.symbols
            if s in bindings and bindings[s] != n:
                raise CallError(
                    f"{g.name}(): '{p.name}' expects {want}, got shape {list(x.shape)}: "
                    f"{s} = {n} here, but {s} = {bindings[s]} from '{origin[s]}' "
                    f"(bindings so far: {_fmt(bindings)})")
            bindings.setdefault(s, int(n))
            origin.setdefault(s, p.name)
    for p, axis, d, n, shape in derived:
        missing = d.symbols - set(bindings)
        if missing:
            raise CallError(f"{g.name}(): the size {d} of '{p.name}' needs {', '.join(sorted(missing))}, "
                            f"which no parameter binds")
        try:
            want_n = evaluate(d, bindings)
        except ValueError as e:
            raise CallError(f"{g.name}(): '{p.name}' has shape {shape}: {e} (bindings {_fmt(bindings)})") from None
        if want_n != n:
            raise CallError(f"{g.name}(): '{p.name}' expects {p.value.type}, got shape {shape}: axis {axis} "
                            f"must be {d} = {want_n} (bindings {_fmt(bindings)})")
    check_derived_sizes(g, tuple(sorted(bindings.items())))
    return bindings


def _fmt(b: Mapping[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in b.items())


@lru_cache(maxsize=512)
def check_derived_sizes(g: Graph, items: tuple[tuple[str, int], ...]) -> None:
    """Every size in the graph must be a whole number >= 0 under these bindings; reshapes keep
    the element count; slices stay inside their axes."""
    b = dict(items)
    for n in g.nodes:
        try:
            for v in n.outputs:
                for d in v.type.shape:
                    evaluate(d, b)
            if n.op == "reshape" and n.attrs.get("check_numel"):
                a, c = _numel(n.inputs[0].type.shape, b), _numel(n.out.type.shape, b)
                if a != c:
                    raise ValueError(f"reshape of {format_shape(n.inputs[0].type.shape)} ({a} elements) into "
                                     f"{format_shape(n.out.type.shape)} ({c} elements)")
            if n.op == "topk":
                size = evaluate(n.inputs[0].type.shape[n.attrs["axis"]], b)
                if n.attrs["k"] > size:
                    raise ValueError(f"topk with k={n.attrs['k']} over an axis of size {size}")
            if n.op in ("max", "min"):
                check_reduced_axes(g, n, b)
            if n.op == "slice":
                for k, (s0, s1, d) in enumerate(zip(n.attrs["starts"], n.attrs["stops"], n.inputs[0].type.shape)):
                    s0, s1, d = evaluate(s0, b), evaluate(s1, b), evaluate(d, b)
                    if not (0 <= s0 <= d and 0 <= s1 <= d):  # s1 < s0 is an empty slice
                        raise ValueError(f"slice {s0}:{s1} of axis {k} with size {d}")
        except CallError:
            raise
        except (ValueError, ZeroDivisionError) as e:  # D / H with H = 0 divides by zero
            where = f" ({n.span.source.name}:{n.span.line}:{n.span.col})" if n.span else ""
            raise CallError(f"{g.name}(): sizes {_fmt(b)} do not fit the spec{where}: {e}") from None


def check_reduced_axes(g: Graph, n, b: Mapping[str, int]) -> None:
    """max and min over an axis of size 0 have no value: a CallError, as torch raises one (sum
    and mean of no elements are 0 and NaN, as in torch, and need no check)."""
    shape = n.inputs[0].type.shape
    for axis in n.attrs["axis"]:
        d = shape[axis]
        if evaluate(d, b) == 0:
            where = f" ({n.span.source.name}:{n.span.line}:{n.span.col})" if n.span else ""
            size = f"{d} = 0" if not isinstance(d, int) else "0"
            raise CallError(f"{g.name}(): {n.op} over axis {axis}{where}, of size {size} (sizes {_fmt(b)}): the "
                            f"{'maximum' if n.op == 'max' else 'minimum'} of no elements has no value (torch raises "
                            f"too; sum gives 0 and mean NaN)")


def _numel(shape: Sequence[Dim], b) -> int:
    n = 1
    for d in shape:
        n *= evaluate(d, b)
    return n


def output_shapes(g: Graph, bindings: Mapping[str, int]) -> list[tuple[int, ...]]:
    return [tuple(evaluate(d, bindings) for d in t.shape) for t in g.result_types]


VIEWS_OF_ALL = ("reshape", "permute", "transpose", "expand")   # views that keep every entry


@lru_cache(maxsize=256)
def index_params(g: Graph) -> tuple[tuple[str, Dim, str], ...]:
    """Integer parameters used as row ids (emb[ids]) or expert indices, with the size their
    entries must stay below."""
    params = {p.value: p.name for p in g.params}
    producer = g.producers()
    out = []

    def param_behind(v):
        """The parameter an index tensor is, or is a view of (every entry used or not)."""
        while v not in params and v in producer and producer[v].op in VIEWS_OF_ALL:
            v = producer[v].inputs[0]
        return v
    for n in g.nodes:
        if n.op == "take" and (idx := param_behind(n.inputs[1])) in params:
            out.append((params[idx], n.inputs[0].type.shape[n.attrs["axis"]], "indices"))
        if n.op == "gather_rows" and n.inputs[1] in params:
            out.append((params[n.inputs[1]], n.inputs[0].type.shape[0], "row ids"))
        if n.op == "expert_matmul" and n.inputs[2] in params:
            out.append((params[n.inputs[2]], n.inputs[1].type.shape[0], "expert indices"))
    return tuple(out)


def check_indices(g: Graph, values: Mapping[str, Any], bindings: Mapping[str, int]) -> None:
    """Kernels cannot raise, so index tensors that come from the caller are checked here."""
    check_index_args(g.name, index_checks(g, bindings), [values[p.name] for p in g.params])


def index_checks(g: Graph, bindings: Mapping[str, int]) -> tuple:
    """``index_params`` at ``bindings``, as check_index_args takes them: (argument position,
    bound, parameter name, what)."""
    names = [p.name for p in g.params]
    return tuple((names.index(name), evaluate(limit, bindings), name, what)
                 for name, limit, what in index_params(g))


def check_index_args(op: str, checks, args: Sequence[Any]) -> None:
    """``checks``: (argument position, bound, parameter name, what) for each index tensor. The
    cost, per index tensor and call: one min/max reduction (torch.aminmax) and one copy of its
    two results to the host, which on a GPU waits for the device (a synchronisation), so it
    cannot run under CUDA-graph capture. OPFORGE_CHECK_INDICES=0 skips it."""
    if not checks or not env.flag("OPFORGE_CHECK_INDICES", True):
        return
    for pos, n, name, what in checks:
        x = args[pos]
        if x.numel() == 0:
            continue
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            raise CallError(f"{op}(): checking the {what} in '{name}' reads them on the host, which CUDA-graph "
                            f"capture forbids; set OPFORGE_CHECK_INDICES=0 to capture this op (its indices are "
                            f"then not checked)")
        lo, hi = torch.stack(torch.aminmax(x)).tolist()
        if lo < 0 or hi >= n:
            bad = lo if lo < 0 else hi
            raise CallError(f"{op}(): '{name}' holds {what} in [0, {n}); found {bad}")
