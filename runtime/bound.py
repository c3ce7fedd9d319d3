"""``mod.op.bind(**weights)``: pack weights once and return a ``torch.nn.Module``.

The module holds the packed tensors (int8, int4, fp8, 2:4, block-sparse, low-rank) as buffers:
frozen, never differentiated (a gradient asked of one is a CallError). Dense weights (no layout,
or ``@auto`` chose dense) of a float dtype are trainable ``torch.nn.Parameter``s (with
requires_grad off where the op has no gradient with respect to one; an integer or bool dense
tensor is a buffer): copied at bind, in ``parameters()``, their gradients computed by the op's
derived backward (runtime/autograd.py). Both move with ``.to()``
and save and load with ``state_dict``; calling the module with the remaining inputs runs the op
compiled for those packed layouts (its own torch op, ``<op>__<weight>_<layout>``).
"""
from __future__ import annotations

from typing import Any

import torch

from ..ir.graph import Layout
from ..ir.torch_dtypes import to_torch
from ..ir.types import TensorType
from .binding import CallError
from .device import kernel_device
from .packing import pack


class BoundOp(torch.nn.Module):
    def __init__(self, op, packed_op, buffers: dict[str, torch.Tensor], layouts: dict[str, Layout | None],
                 report: dict[str, list] | None = None):
        """``buffers``: every bound tensor by the packed op's parameter name; the dense float
        ones become Parameters, the rest (packed tensors, integer tensors) buffers."""
        super().__init__()
        self.op_name = op.name
        self._packed = packed_op
        self.layouts = layouts
        self.report = report or {}
        self.no_gradient: dict[str, str] = {}    # a dense Parameter without a gradient -> why
        for name, t in buffers.items():
            if name in layouts and layouts[name] is None and t.dtype.is_floating_point:
                why = _no_gradient(packed_op, name)
                if why is not None:
                    self.no_gradient[name] = why
                self.register_parameter(name, torch.nn.Parameter(t, requires_grad=why is None))
            else:
                self.register_buffer(name, t)
        self._bound = tuple(buffers)
        self.free = [p.name for p in packed_op.graph.params if p.name not in buffers]
        self._dense_types = {}
        self._bound_sizes: dict = {}
        # the packed op's arguments in order: a bound buffer's name, or the position of a free
        # input (a call giving exactly the free inputs, positionally, takes this path)
        self._order = tuple(("param" if p.name in self._parameters else "buffer", p.name) if p.name in buffers
                            else ("input", self.free.index(p.name)) for p in packed_op.graph.params)

    # (GenericOp, binding) for a bound layer of a dtype-generic op (runtime/generic.py), else None
    _generic = None

    def _apply(self, fn, recurse=True):
        """Device moves apply. Dtype changes apply where the op is dtype-generic: ``.to(bf16)``
        of a layer bound at ``T = f16`` rebinds it to ``T = bf16`` (a dtype its ``T`` admits),
        converting every tensor the spec types with ``T`` (dense weights, int4 scales, 2:4 values,
        low-rank factors: rounded, as torch rounds any module's weights) and calling the op
        compiled for that binding from then on. Tensors of a fixed dtype in the spec stay as they
        are: an f32 scale stays f32 (and exact) under .half(), and so does every tensor of a
        non-generic op. A Parameter stays the same object (its data moved, as torch.nn.Module
        does), so an optimizer built on it keeps working."""
        rebind = self._rebinding(fn)
        want = rebind[2] if rebind else {}

        def moved(t, name):
            u = fn(t)
            dtype = want.get(name, t.dtype)
            return u if u.dtype == dtype else t.to(device=u.device, dtype=dtype)

        for name, b in list(self._buffers.items()):
            if b is not None:
                self._buffers[name] = moved(b, name)
        with torch.no_grad():
            for name, p in self._parameters.items():
                if p is None:
                    continue
                data = moved(p, name)
                if data is not p:
                    p.data = data
                if p.grad is not None:
                    g = moved(p.grad, name)
                    if g is not p.grad:
                        p.grad = g
        if rebind:
            key, self._packed, _ = rebind
            dense = {p.name: to_torch(p.value.type.dtype) for p in self._generic[0].instance(*key).graph.params
                     if isinstance(p.value.type, TensorType)}
            self._dense_types = {n: (shape, dense.get(n, dt)) for n, (shape, dt) in self._dense_types.items()}
            self._generic = (self._generic[0], key)
        return self

    def _rebinding(self, fn):
        """Where ``fn`` (the conversion ``.to``/``.half()``/``.bfloat16()`` applies) changes a dtype
        variable of a generic op's layer to a dtype it admits: (the new binding, its packed op,
        each bound tensor's dtype in it); else None."""
        if self._generic is None:
            return None
        from ..ir.torch_dtypes import from_torch
        generic, key = self._generic
        new = []
        for d, admitted in zip(key, generic.info.dtypes):
            try:
                nd = from_torch(fn(torch.empty(0, dtype=to_torch(d))).dtype)
            except Exception:      # a dtype opforge has no name for: not a binding
                nd = d
            new.append(nd if nd in admitted else d)
        new = tuple(new)
        if new == tuple(key):
            return None
        chosen = {n: layout for n, layout in self.layouts.items() if layout is not None}
        shapes = {k: tuple(getattr(self, k).shape) for k in self._bound}
        packed = generic.instance(*new).packed_variant(chosen, self._bound_sizes, shapes, bound=tuple(self.layouts))
        dtypes = {p.name: to_torch(p.value.type.dtype) for p in packed.graph.params
                  if p.name in self._bound and isinstance(p.value.type, TensorType)}
        return new, packed, dtypes

    _empty = False      # bound from meta tensors and not loaded yet

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._empty = False

    def forward(self, *args, **kwargs):
        if self._empty:
            raise CallError(f"{self.op_name}: this bound module was made from meta tensors and holds no weights yet; "
                            f"fill it with load_state_dict(...) first")
        if not kwargs and len(args) == len(self.free):
            bufs, params = self._buffers, self._parameters
            return self._packed(*[args[x] if kind == "input" else (bufs[x] if kind == "buffer" else params[x])
                                  for kind, x in self._order])
        if len(args) > len(self.free):
            raise CallError(f"{self.op_name}: the bound op takes {len(self.free)} input(s) "
                            f"({', '.join(self.free)}), got {len(args)}")
        values: dict[str, Any] = dict(zip(self.free, args))
        for k, v in kwargs.items():
            if k not in self.free:
                raise CallError(f"{self.op_name}: '{k}' is not an input of the bound op; its inputs are "
                                f"{', '.join(self.free)}" + (f" ('{k}' is bound)" if k in self.layouts else ""))
            values[k] = v
        full = []
        for p in self._packed.graph.params:
            if p.name in self._bound:
                full.append(getattr(self, p.name))
            elif p.name in values:
                full.append(values[p.name])
            elif p.has_default:
                full.append(p.default)
            else:
                raise CallError(f"{self.op_name}: missing the input '{p.name}'")
        return self._packed(*full)

    def unpacked(self) -> dict[str, torch.Tensor]:
        """The dense weights the kernels compute with (runtime/packing.unpack of the buffers):
        what a reference run of the spec should be given."""
        from .packing import unpack
        out = {}
        for name, layout in self.layouts.items():
            if layout is None:
                out[name] = getattr(self, name).detach()
                continue
            parts = {b[len(name) + 1:]: getattr(self, b) for b in self._bound if b.startswith(f"{name}_")}
            dense = self._dense_types[name]
            out[name] = unpack(layout, parts, dense[0], dense[1])
        return out

    def explain(self, file=None):
        """The layouts chosen (with @auto's table of candidates), then the packed op's stages;
        returned as an Explanation (see CompiledOp.explain), written to ``file`` if given."""
        from .module import Explanation
        lines = [f"== bound {self.op_name}: layouts =="]
        for name, layout in self.layouts.items():
            lines.append(f"  {name}: {layout if layout is not None else 'dense'}")
            for row in self.report.get(name, []):
                lines.append("    " + row)
        # the bytes requested: at the bound weights' sizes and the spec's "# shapes:" line for the rest
        sizes = {**self._packed.default_sizes, **self._bound_sizes}
        text = self._packed.explain(sizes=sizes if all(s in sizes for s in self._packed.graph.symbols) else None)
        return Explanation("\n".join(lines) + "\n\n" + text).written_to(file)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v if v is not None else 'dense'}" for k, v in self.layouts.items())


def _no_gradient(op, name: str) -> str | None:
    """None where the op has a gradient with respect to its dense parameter ``name`` (the
    backward is derived now, a graph pass; its kernels are built at the first call that needs
    it); else why not, and the Parameter is made with requires_grad off, so calls in grad mode
    still run."""
    from ..ir.vjp import NoGradient
    from ..passes.autodiff import derive
    grads = op.gradients
    if not grads.differentiable or name not in grads.params:
        return "the op has no gradient with respect to it (not a float input of an op with a float result)"
    try:
        derive(grads.source, (name,))
    except NoGradient as e:
        return str(e)
    return None


def check_weight(op, name: str, w: torch.Tensor) -> None:
    params = {p.name: p for p in op.graph.params}
    if name not in params:
        raise CallError(f"{op.name}.bind(): it has no parameter '{name}'; its parameters are {', '.join(params)}")
    p = params[name]
    t = p.value.type
    if not isinstance(t, TensorType):
        raise CallError(f"{op.name}.bind(): '{name}' is a scalar; bind tensors")
    if not isinstance(w, torch.Tensor) or w.dtype != to_torch(t.dtype) or w.dim() != t.rank \
            or any(isinstance(d, int) and d != n for d, n in zip(t.shape, w.shape)):
        got = f"{w.dtype} of shape {list(w.shape)}" if isinstance(w, torch.Tensor) else type(w).__name__
        raise CallError(f"{op.name}.bind(): '{name}' expects {t}, got {got}")


def bind(op, calibration=None, **weights) -> BoundOp:
    """Pack ``weights`` (every weight with a layout must be given). Weights on the meta device
    give an *empty* module: its buffers and parameters allocated, not filled, for
    ``load_state_dict`` to fill (a quantized checkpoint loaded without its dense weights); it
    refuses to run until loaded."""
    from .autolayout import choose_layout
    from .packing import packed_like
    for name, w in weights.items():
        check_weight(op, name, w)
    params = {p.name: p for p in op.graph.params}
    missing = [p.name for p in op.graph.params if p.layout is not None and p.name not in weights]
    if missing:
        names = ", ".join(f"'{n}' {params[n].layout}" for n in missing)
        raise CallError(f"{op.name}.bind(): {names} not given; every weight with a layout is bound, packed once "
                        f"(pass it as {missing[0]}=..., a meta tensor for an empty module that load_state_dict "
                        f"fills); a weight to pass at each call cannot have a layout")
    device = kernel_device()
    chosen: dict[str, Layout] = {}
    layouts: dict[str, Layout | None] = {}
    buffers: dict[str, torch.Tensor] = {}
    report: dict[str, list] = {}
    empty = any(w.device.type == "meta" for w in weights.values())
    for name, w in weights.items():
        layout = params[name].layout
        meta = w.device.type == "meta"
        w = w.detach() if meta else w.detach().to(device)
        if layout is not None and layout.kind == "auto":
            if meta:
                raise CallError(f"{op.name}.bind(): '{name}' {layout} chooses its layout from the weight's values, so "
                                f"it cannot be bound empty; bind the weight itself")
            with torch.no_grad():
                layout, report[name] = choose_layout(op, name, w, dict(layout.kwargs)["tol"], weights, calibration)
        layouts[name] = layout
        if layout is None:
            # the module's own copy: training it leaves the caller's tensor alone
            buffers[name] = torch.empty(w.shape, dtype=w.dtype, device=device) if meta else \
                w.clone(memory_format=torch.contiguous_format)
            continue
        chosen[name] = layout
        for suffix, t in (packed_like(layout, w, name) if meta else pack(layout, w, name)).items():
            buffers[f"{name}_{suffix}"] = torch.empty(t.shape, dtype=t.dtype, device=device) if meta else t.to(device)
    sizes = {}
    for name, w in weights.items():
        for d, n in zip(params[name].value.type.shape, w.shape):
            if not isinstance(d, int) and d.is_symbol():
                s = str(d)
                if s in sizes and sizes[s] != int(n):
                    raise CallError(f"{op.name}.bind(): '{name}' has {s} = {int(n)}, another bound weight "
                                    f"has {s} = {sizes[s]}")
                sizes[s] = int(n)
            elif isinstance(d, int) and d != n:
                raise CallError(f"{op.name}.bind(): '{name}' expects {params[name].value.type}, got shape {list(w.shape)}")
    shapes = {k: tuple(t.shape) for k, t in buffers.items()}
    packed_op = op.packed_variant(chosen, sizes, shapes, bound=tuple(weights))
    module = BoundOp(op, packed_op, buffers, layouts, report)
    module._dense_types = {name: (tuple(w.shape), w.dtype) for name, w in weights.items()}
    module._bound_sizes = sizes
    module._empty = empty
    return module
