"""Shape primitives: reshape, permute, transpose, concat, and the internal forms the front end
and canonicalisation produce: ``expand`` (explicit broadcasting), ``slice`` (static, possibly
symbolic bounds) and ``gather_rows`` (``emb[ids]``).
"""
from __future__ import annotations

import torch

from . import rules
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


primitive("reshape", Kind.SHAPE, [X, Arg("shape", "dims")], doc="same elements, new shape (-1 infers one size)")(
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


primitive("permute", Kind.SHAPE, [X, Arg("perm", "ints")], doc="reorder axes")(
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


primitive("transpose", Kind.SHAPE, [X, Arg("a", "int"), Arg("b", "int")], doc="swap two axes (x.T swaps the last two)")(
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


primitive("concat", Kind.SHAPE, [Arg("xs", "tensors"), Arg("axis", "int", 0)], doc="join tensors along an axis")(
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


primitive("expand", Kind.SHAPE, [X, Arg("shape", "dims")], internal=True, doc="broadcast to a shape")(
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


primitive("slice", Kind.SHAPE, [X], internal=True, doc="x[start:stop:step, ...] with static bounds")(
    infer=_slice_infer, reference=_slice_ref)


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


primitive("gather_rows", Kind.GATHER, [Arg("table", "tensor"), Arg("ids", "tensor")], internal=True,
          doc="table[ids]: rows of a table picked by an integer tensor")(infer=_gather_infer, reference=_gather_ref)
