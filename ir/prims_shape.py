"""Shape primitives: reshape, permute, transpose, concat, and the internal forms the front end
and canonicalisation produce: ``expand`` (explicit broadcasting), ``slice`` (static, possibly
symbolic bounds) and ``gather_rows`` (``emb[ids]``).
"""
from __future__ import annotations

import torch

from . import rules
from . import vjp as V
from .dims import Dim, Sym, div, format_shape, free_symbols
from .registry import Arg, Kind, RuleError, primitive
from .types import TensorType

X = Arg("x", "tensor")


def numel(shape) -> Dim:
    n: Dim = 1
    for d in shape:
        n = n * d
    return n


def _reshape_infer(types, attrs):
    t = rules.need_tensor(types[0], "reshape")
    dims = list(attrs["shape"])
    holes = [i for i, d in enumerate(dims) if isinstance(d, int) and d == -1]
    if len(holes) > 1:
        raise RuleError("reshape may infer at most one size (-1)", arg="shape")
    for d in dims:
        if isinstance(d, int) and d < -1:
            raise RuleError(f"reshape size {d} is negative", arg="shape")
    total = numel(t.shape)
    if holes:
        known = numel([d for d in dims if not (isinstance(d, int) and d == -1)])
        if known == 0:
            raise RuleError("reshape cannot infer a size next to a size 0", arg="shape")
        if isinstance(known, Sym) and len(known.terms) != 1:
            raise RuleError(f"reshape cannot infer -1 by dividing by the sum {known}", arg="shape")
        dims[holes[0]] = div(total, known)
        if isinstance(dims[holes[0]], Sym) and dims[holes[0]].terms[0][1].denominator != 1 \
                and not dims[holes[0]].symbols:
            raise RuleError(f"cannot reshape {format_shape(t.shape)} into {format_shape(attrs['shape'])}",
                            hint=f"{total} elements do not split evenly", arg="shape")
    new = numel(dims)
    check = False
    if new != total:
        if isinstance(new, int) and isinstance(total, int) or not (free_symbols([new]) | free_symbols([total])):
            raise RuleError(f"cannot reshape {format_shape(t.shape)} ({total} elements) into "
                            f"{format_shape(dims)} ({new} elements)", arg="shape")
        check = True  # equal only if the bound sizes agree: checked at call time
    attrs = {"shape": tuple(dims)}
    if check:
        attrs["check_numel"] = True
    return [TensorType(t.dtype, tuple(dims))], attrs


def _reshape_ref(ctx, inputs, attrs, out_types, in_types):
    from .dims import evaluate
    shape = [evaluate(d, ctx.bindings) for d in attrs["shape"]]
    return inputs[0].reshape(shape)


def _view_back(fn):
    """A view's gradient: the inverse view of the cotangent."""
    def rule(e, node, cts):
        (dy,) = cts
        x = node.inputs[0]
        return [None if dy is None or not V.differentiable(x) else fn(e, node, dy, x)]
    return rule


primitive("reshape", Kind.SHAPE, [X, Arg("shape", "dims")], doc="same elements, new shape (-1 infers one size)",
          vjp=_view_back(lambda e, n, dy, x: e("reshape", [dy], {"shape": tuple(x.type.shape)})))(
    infer=_reshape_infer, reference=_reshape_ref)


def _permute_infer(types, attrs):
    t = rules.need_tensor(types[0], "permute")
    perm = tuple(attrs["perm"])
    if sorted(rules.norm_axis(p, t.rank, "permute", "perm") for p in perm) != list(range(t.rank)) \
            or len(perm) != t.rank:
        raise RuleError(f"{list(perm)} is not a permutation of the {t.rank} axes of {t}",
                        hint=f"name each of 0..{t.rank - 1} once", arg="perm")
    perm = tuple(p % t.rank for p in perm)
    return [TensorType(t.dtype, tuple(t.shape[p] for p in perm))], {"perm": perm}


def _permute_ref(ctx, inputs, attrs, out_types, in_types):
    return inputs[0].permute(*attrs["perm"])


def _inverse(perm):
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


primitive("permute", Kind.SHAPE, [X, Arg("perm", "ints")], doc="reorder axes",
          vjp=_view_back(lambda e, n, dy, x: e("permute", [dy], {"perm": _inverse(n.attrs["perm"])})))(
    infer=_permute_infer, reference=_permute_ref)


def _transpose_infer(types, attrs):
    t = rules.need_tensor(types[0], "transpose")
    if t.rank < 2 and attrs.get("is_T"):
        raise RuleError(f".T needs a tensor of rank 2 or more, got {t}", arg=0)
    a = rules.norm_axis(attrs["a"], t.rank, "transpose", "a")
    b = rules.norm_axis(attrs["b"], t.rank, "transpose", "b")
    shape = list(t.shape)
    shape[a], shape[b] = shape[b], shape[a]
    return [TensorType(t.dtype, tuple(shape))], {"a": min(a, b), "b": max(a, b)}


def _transpose_ref(ctx, inputs, attrs, out_types, in_types):
    return inputs[0].transpose(attrs["a"], attrs["b"])


primitive("transpose", Kind.SHAPE, [X, Arg("a", "int"), Arg("b", "int")], doc="swap two axes (x.T swaps the last two)",
          vjp=_view_back(lambda e, n, dy, x: e("transpose", [dy], {"a": n.attrs["a"], "b": n.attrs["b"]})))(
    infer=_transpose_infer, reference=_transpose_ref)


def _concat_infer(types, attrs):
    if len(types) < 1:
        raise RuleError("concat needs at least one tensor")
    ts = [rules.need_tensor(t, "concat", i) for i, t in enumerate(types)]
    t0 = ts[0]
    axis = rules.norm_axis(attrs.get("axis", 0), t0.rank, "concat")
    total: Dim = 0
    for i, t in enumerate(ts):
        if t.dtype != t0.dtype:
            raise RuleError(f"concat of different dtypes {t0.dtype} and {t.dtype}",
                            hint=f"cast({{{i}}}, {t0.dtype})", arg=i)
        if t.rank != t0.rank:
            raise RuleError(f"concat of ranks {t0.rank} and {t.rank}: {t0} and {t}", arg=i)
        for k in range(t.rank):
            if k != axis and t.shape[k] != t0.shape[k]:
                raise RuleError(f"concat along axis {axis}: shapes {format_shape(t0.shape)} and "
                                f"{format_shape(t.shape)} differ in axis {k}", arg=i)
        total = total + t.shape[axis]
    shape = list(t0.shape)
    shape[axis] = total
    return [TensorType(t0.dtype, tuple(shape))], {"axis": axis}


def _concat_ref(ctx, inputs, attrs, out_types, in_types):
    return torch.cat(list(inputs), dim=attrs["axis"])


def _concat_vjp(e, node, cts):
    """Each operand's part of the cotangent, sliced out."""
    (dy,) = cts
    axis = node.attrs["axis"]
    out, start = [], 0
    for x in node.inputs:
        stop = start + x.type.shape[axis]
        if dy is None or not V.differentiable(x):
            out.append(None)
        else:
            shape = dy.type.shape
            starts = tuple(start if i == axis else 0 for i in range(len(shape)))
            stops = tuple(stop if i == axis else d for i, d in enumerate(shape))
            out.append(e("slice", [dy], {"starts": starts, "stops": stops, "steps": (1,) * len(shape)}))
        start = stop
    return out


primitive("concat", Kind.SHAPE, [Arg("xs", "tensors"), Arg("axis", "int", 0)], doc="join tensors along an axis",
          vjp=_concat_vjp)(
    infer=_concat_infer, reference=_concat_ref)


# -- internal forms -----------------------------------------------------------------------------
def _expand_infer(types, attrs):
    t = rules.need_tensor(types[0], "expand")
    shape = tuple(attrs["shape"])
    if rules.broadcast_shapes([t.shape, shape]) != shape:
        raise RuleError(f"cannot expand {t} to {format_shape(shape)}")
    return [TensorType(t.dtype, shape)]


def _expand_ref(ctx, inputs, attrs, out_types, in_types):
    from .dims import evaluate
    return inputs[0].expand(*[evaluate(d, ctx.bindings) for d in attrs["shape"]])


primitive("expand", Kind.SHAPE, [X, Arg("shape", "dims")], internal=True, doc="broadcast to a shape",
          vjp=_view_back(lambda e, n, dy, x: V.unbroadcast(e, dy, x)))(
    infer=_expand_infer, reference=_expand_ref)


def slice_size(start: Dim, stop: Dim, step: int) -> Dim:
    n = stop - start
    if isinstance(n, int):
        return max(0, -(-n // step))  # an empty slice (start >= stop) has size 0, as in NumPy
    if step == 1:
        return n
    # ceil(n / step) for n = P + c (P the symbolic terms, c the integer constant) is
    # P / step + ceil(c / step) whenever P / step is whole, which the runtime checks: so
    # x[::2] and x[1::2] of an even axis E both have E/2 elements.
    c = dict(n.terms).get((), 0)
    if c.denominator != 1:
        return div(n + (step - 1), step)  # exact only if divisible; the runtime checks it
    return div(n - int(c), step) + -(-int(c) // step)


def _slice_infer(types, attrs):
    t = rules.need_tensor(types[0], "slice")
    starts, stops, steps = attrs["starts"], attrs["stops"], attrs["steps"]
    shape = tuple(slice_size(a, b, s) for a, b, s in zip(starts, stops, steps))
    return [TensorType(t.dtype, shape)]


def _slice_ref(ctx, inputs, attrs, out_types, in_types):
    from .dims import evaluate
    b = ctx.bindings
    idx = tuple(slice(evaluate(a, b), evaluate(e, b), s)
                for a, e, s in zip(attrs["starts"], attrs["stops"], attrs["steps"]))
    return inputs[0][idx]


primitive("slice", Kind.SHAPE, [X], internal=True, doc="x[start:stop:step, ...] with static bounds",
          vjp=_view_back(lambda e, n, dy, x: e("unslice", [dy], {**dict(n.attrs), "shape": tuple(x.type.shape)})))(
    infer=_slice_infer, reference=_slice_ref)


def _unslice_infer(types, attrs):
    (t,) = types
    return [TensorType(t.dtype, tuple(attrs["shape"]))]


def _unslice_ref(ctx, inputs, attrs, out_types, in_types):
    from .dims import evaluate
    b = ctx.bindings
    out = torch.zeros([evaluate(d, b) for d in attrs["shape"]], dtype=inputs[0].dtype, device=inputs[0].device)
    idx = tuple(slice(evaluate(a, b), evaluate(z, b), s) for a, z, s in zip(attrs["starts"], attrs["stops"], attrs["steps"]))
    out[idx] = inputs[0]
    return out


primitive("unslice", Kind.SHAPE, [X], internal=True,
          doc="a slice's gradient: the values at the slice's positions of a zero tensor of the sliced shape",
          vjp=_view_back(lambda e, n, dy, x: e("slice", [dy], {k: n.attrs[k] for k in ("starts", "stops", "steps")})))(
    infer=_unslice_infer, reference=_unslice_ref)


def _fill_infer(types, attrs):
    return [TensorType(attrs["dtype"], tuple(attrs["shape"]))]


def _fill_ref(ctx, inputs, attrs, out_types, in_types):
    from .dims import evaluate
    return torch.full([evaluate(d, ctx.bindings) for d in attrs["shape"]], attrs["value"],
                      dtype=ctx.dt(attrs["dtype"]), device=ctx.device)


primitive("fill", Kind.SOURCE, internal=True, doc="a tensor of one value (zero gradients): never stored",
          vjp=V.no_grad("a constant tensor has no inputs"))(infer=_fill_infer, reference=_fill_ref)


def _gather_infer(types, attrs):
    table, ids = types
    table = rules.need_tensor(table, "index", 0)
    if not ids.dtype.is_int:
        raise RuleError(f"an index tensor must be an integer tensor, got {ids}",
                        hint="cast({1}, i32)", arg=1)
    if table.rank < 1:
        raise RuleError("cannot index a rank-0 tensor", arg=0)
    return [TensorType(table.dtype, tuple(ids.shape) + tuple(table.shape[1:]))]


def _gather_ref(ctx, inputs, attrs, out_types, in_types):
    table, ids = inputs
    return table[ids.long()]


def _gather_vjp(e, node, cts):
    (dy,) = cts
    table, ids = node.inputs
    if dy is None or not V.differentiable(table):
        return [None, None]
    return [e("scatter_rows", [dy, ids], {"rows": table.type.shape[0]}), None]


primitive("gather_rows", Kind.GATHER, [Arg("table", "tensor"), Arg("ids", "tensor")], internal=True,
          doc="table[ids]: rows of a table picked by an integer tensor", vjp=_gather_vjp)(
    infer=_gather_infer, reference=_gather_ref)


def _scatter_rows_infer(types, attrs):
    src, ids = types
    return [TensorType(src.dtype, (attrs["rows"],) + tuple(src.shape[ids.rank:]))]


def _scatter_rows_ref(ctx, inputs, attrs, out_types, in_types):
    from .dims import evaluate
    src, ids = inputs
    rows = evaluate(attrs["rows"], ctx.bindings)
    flat = src.reshape((-1,) + tuple(src.shape[ids.dim():]))
    out = torch.zeros((rows,) + tuple(flat.shape[1:]), dtype=flat.dtype, device=flat.device)
    return out.index_add_(0, ids.reshape(-1).long(), flat)


primitive("scatter_rows", Kind.GATHER, [Arg("src", "tensor"), Arg("ids", "tensor")], internal=True,
          doc="out[ids[i]] += src[i]: table[ids]'s gradient (added with atomics: the order of the "
              "additions into one row is not fixed)",
          vjp=lambda e, n, cts: [None if cts[0] is None else e("gather_rows", [cts[0], n.inputs[1]]), None])(
    infer=_scatter_rows_infer, reference=_scatter_rows_ref)
