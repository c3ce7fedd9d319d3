"""Indexing in a spec: integers, slices, None and ... on a tensor (views), a tensor of indices
(gathers); part of OpBuilder (frontend/build.py).
"""
from __future__ import annotations

from ..ir.dims import Dim
from ..ir.prims_shape import slice_size
from ..ir.graph import Value
from ..ir.types import TensorType
from . import ast as A
from .diagnostics import SpecError


class IndexMixin:
    def index(self, e: A.Index) -> Value:
        stepped = self.step_slice(e)          # x[t] in a scan's body (frontend/build_scan.py)
        if stepped is not None:
            return stepped
        v = self.value(e.value)
        if not isinstance(v.type, TensorType):
            raise SpecError(f"cannot index the scalar {v.type}", e.value.span)
        for it in e.items[1:]:
            if self.is_tensor_index(it):
                raise SpecError("an index tensor is only allowed in the first position", it.span,
                                "emb[ids] gathers rows; index other axes with integers and slices")
        return self.index_items(v, list(e.items), e)

    def index_items(self, v: Value, items: list, e: A.Index) -> Value:
        """v indexed by ``items`` (a tensor of indices allowed first: a gather of rows)."""
        if self.is_tensor_index(items[0]):
            ids = self.value(items[0])
            v = self.emit("gather_rows", [v, ids], {}, e.span, [e.value, items[0]])[0]
            if len(items) == 1:
                return v
            # The gathered axes come first and stay whole; the other items index the table's axes.
            items = [A.SliceItem(items[0].span, None, None, None)] * ids.type.rank + items[1:]
        return self.basic_index(v, items, e)

    def is_tensor_index(self, it) -> bool:
        if isinstance(it, (A.SliceItem, A.EllipsisItem)):
            return False
        if isinstance(it, A.Name) and it.id == "None":
            return False
        try:
            self.static_dim(it)
            return False
        except SpecError:
            pass
        if isinstance(it, A.Name) and it.id in self.env:
            return isinstance(self.env[it.id][0].type, TensorType)
        return not isinstance(it, (A.Num, A.Neg, A.BinOp))

    def basic_index(self, v: Value, items: list, e: A.Index) -> Value:
        shape = list(v.type.shape)
        n_ell = sum(isinstance(i, A.EllipsisItem) for i in items)
        if n_ell > 1:
            raise SpecError("an index may contain '...' once", e.span)
        consumes = [i for i in items if not isinstance(i, A.EllipsisItem)
                    and not (isinstance(i, A.Name) and i.id == "None")]
        if len(consumes) > len(shape):
            raise SpecError(f"too many indices ({len(consumes)}) for a tensor of rank {len(shape)}",
                            consumes[len(shape)].span, f"the tensor is {v.type}")
        if n_ell:
            k = next(j for j, i in enumerate(items) if isinstance(i, A.EllipsisItem))
            fill = [A.SliceItem(items[k].span, None, None, None)] * (len(shape) - len(consumes))
            items = items[:k] + fill + items[k + 1:]
        else:
            items = items + [A.SliceItem(e.span, None, None, None)] * (len(shape) - len(consumes))
        starts, stops, steps, out_shape = [], [], [], []
        axis = 0
        sliced = False
        for it in items:
            if isinstance(it, A.Name) and it.id == "None":
                out_shape.append(1)
                continue
            size = shape[axis]
            if isinstance(it, A.SliceItem):
                step = self.static_int(it.step, "a slice step") if it.step is not None else 1
                if step <= 0:
                    raise SpecError(f"slice step {step} must be positive", it.step.span)
                start = self.bound(it.start, size, 0)
                stop = self.bound(it.stop, size, size)
                if start != 0 or stop != size or step != 1:
                    sliced = True
                n = slice_size(start, stop, step)
                if isinstance(n, int) and n < 0:
                    n = 0
                out_shape.append(n)
                starts.append(start), stops.append(stop), steps.append(step)
            else:
                i = self.bound(it, size, None)
                if isinstance(i, int) and isinstance(size, int) and not 0 <= i < size:
                    raise SpecError(f"index {i} is out of range for size {size}", it.span)
                starts.append(i), stops.append(i + 1), steps.append(1)
                sliced = True
            axis += 1
        if sliced:
            v = self.emit("slice", [v], {"starts": tuple(starts), "stops": tuple(stops), "steps": tuple(steps)},
                          e.span, [e.value])[0]
        if tuple(out_shape) != tuple(v.type.shape):
            v = self.emit("reshape", [v], {"shape": tuple(out_shape)}, e.span, [e.value])[0]
        return v

    def bound(self, x, size: Dim, default) -> Dim:
        """A slice bound or an integer index, negative values counting from the end."""
        if x is None:
            return default
        d = self.static_dim(x, allow_hole=False) if not self._is_negative_literal(x) else self.static_int(x, "an index")
        if isinstance(d, int) and d < 0:
            d = size + d
            if isinstance(d, int) and d < 0:
                raise SpecError(f"index {self.static_int(x, 'an index')} is out of range for size {size}", x.span)
        if isinstance(d, int) and isinstance(size, int) and d > size:
            d = size  # NumPy clamps slice bounds past the end
        return d

    @staticmethod
    def _is_negative_literal(x) -> bool:
        return isinstance(x, A.Neg) and isinstance(x.operand, A.Num)
