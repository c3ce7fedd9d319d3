"""Bound layers split across ranks: each rank packs and runs its shard of the weights.

``opforge.distributed.bind_sharded(mod.linear_q4, mesh, "column", w=w)`` takes the whole dense
weights (the same on every rank, as a checkpoint gives them), keeps this rank's shard of each,
packs it with the weight's layout (``mod.op.bind`` on the shard) and returns a module that
takes and returns DTensors:
- ``"column"``: the weights split along their first axis (N, the output rows: a
  column-parallel linear); the result is ``Shard`` along N;
- ``"row"``: split along their second axis (K, the contraction: row-parallel); the result is a
  ``Partial(sum)``, reduced where DTensor next needs it.
Which inputs are split, and how, is the op's own sharding rule (passes/sharding.py) for that
symbol; a style the rule refuses is a CallError with the rule's reason (a bias added after the
contraction makes the row split wrong, so ``linear_int8``'s K cannot be split). A shard must
hold whole groups of its layout (int4 groups and 2:4's fours along K, blocks of block sparsity,
runtime/packing.py ``alignment``), so its groups are those one process packs; where DTensor's
split (torch.chunk) cannot give that, a CallError names the sizes. Row scales (int8, fp8) and
low-rank factors are computed per shard: a column split packs what one process does, a row
split gives each shard its own scales (at least as precise, not bit-equal). ``@auto`` chooses per shard
(ranks may choose differently). A DTensor input is redistributed to the placement the rule asks
for; a plain tensor is taken as this rank's piece already.
"""
from __future__ import annotations

import torch

from .binding import CallError
from .packing import alignment

STYLES = {"column": 0, "row": 1}


def _chunks(n: int, world: int) -> list[int]:
    """torch.chunk's sizes (DTensor's Shard): ceil(n / world) each, the rest on the last."""
    c = -(-n // world)
    return [max(0, min(c, n - i * c)) for i in range(world)]


class ShardedBound(torch.nn.Module):
    def __init__(self, local, mesh, style: str, inputs: dict, outputs: list, global_sizes: dict):
        super().__init__()
        self.local = local                # this rank's BoundOp
        self.mesh, self.style = mesh, style
        self._inputs = inputs             # free input name -> DTensor placement (None: a scalar)
        self._outputs = outputs           # result placements
        self._sizes = global_sizes        # symbol -> its size across the ranks

    def forward(self, *args, **kwargs):
        from torch.distributed.tensor import DTensor, Shard
        names = self.local.free
        if len(args) > len(names):
            raise CallError(f"{self.local.op_name}(): takes {len(names)} inputs ({', '.join(names)}), got {len(args)}")
        values = dict(zip(names, args), **kwargs)
        local = {}
        for name, v in values.items():
            want = self._inputs.get(name)
            if isinstance(v, DTensor):
                v = v.redistribute(self.mesh, [want]).to_local()
            local[name] = v
        outs = self.local(**local)
        single = isinstance(outs, torch.Tensor)
        outs = (outs,) if single else tuple(outs)
        wrapped = []
        for y, place in zip(outs, self._outputs):
            shape = list(y.shape)
            if isinstance(place, Shard):
                shape[place.dim] = self._sizes[self.style_symbol]
            stride = torch.empty(shape, device="meta").stride()
            wrapped.append(DTensor.from_local(y, self.mesh, [place], run_check=False, shape=torch.Size(shape),
                                              stride=stride))
        return wrapped[0] if single else tuple(wrapped)

    def extra_repr(self) -> str:
        return f"{self.style}-parallel over {self.mesh.size()} ranks, this rank's shard: {self.local.extra_repr()}"


def bind_sharded(op, mesh, style: str, calibration=None, **weights) -> ShardedBound:
    from torch.distributed.tensor import Partial, Replicate, Shard
    from ..passes import sharding as S
    from .sharding import rule_of

    if style not in STYLES:
        raise CallError(f"{op.name}.bind_sharded(): style must be 'column' or 'row', not {style!r}")
    if mesh.ndim != 1:
        raise CallError(f"{op.name}.bind_sharded(): give a 1-D mesh (a 2-D mesh's tensor-parallel dimension: "
                        f"mesh['tp']), got {mesh.ndim} dimensions")
    params = {p.name: p for p in op.graph.params}
    laid = [n for n in weights if n in params and params[n].layout is not None]
    if not laid:
        raise CallError(f"{op.name}.bind_sharded(): none of {', '.join(weights) or 'the weights'} has a layout; "
                        f"shard dense weights with torch.distributed.tensor.distribute_tensor")
    first = params[laid[0]]
    if first.value.type.rank != 2:
        raise CallError(f"{op.name}.bind_sharded(): '{first.name}' is not a 2-D weight")
    axis_size = first.value.type.shape[STYLES[style]]
    if isinstance(axis_size, int):
        raise CallError(f"{op.name}.bind_sharded(): '{first.name}' has the literal size {axis_size} along the "
                        f"axis a {style} split divides; give it a size symbol")
    symbol = str(axis_size)
    rule = rule_of(op).of(symbol)
    wanted = "shard" if style == "column" else "partial"
    if not rule.shardable or rule.kind != wanted:
        why = rule.why or f"splitting {symbol} gives {', '.join(map(str, rule.outputs))} results"
        raise CallError(f"{op.name}.bind_sharded(): a {style}-parallel split of '{first.name}' splits {symbol}, "
                        f"and {why}")
    world, rank = mesh.size(), mesh.get_local_rank()
    placement = dict(zip(rule_of(op).params, rule.inputs))
    sizes, local = {}, {}
    for name, w in weights.items():
        place = placement.get(name)
        if not isinstance(place, S.Shard):
            local[name] = w
            continue
        n = w.shape[place.axis]
        sizes[symbol] = n
        pieces = _chunks(n, world)
        layout = params[name].layout
        if layout is not None and layout.kind != "auto":
            step, why = alignment(layout, place.axis)
            bad = [p for p in pieces if p % step or p == 0]
            if bad:
                raise CallError(f"{op.name}.bind_sharded(): '{name}' {list(w.shape)} split over {world} ranks along "
                                f"{symbol} gives pieces of {pieces}; {layout} needs each a non-empty multiple of "
                                f"{step} ({why}), so that its groups are those one process packs")
        elif 0 in pieces:
            raise CallError(f"{op.name}.bind_sharded(): '{name}' has {symbol} = {n}, fewer than the {world} ranks")
        local[name] = torch.chunk(w, world, dim=place.axis)[rank]
    bound = op.bind(calibration, **local)

    def dt(x):
        return Shard(x.axis) if isinstance(x, S.Shard) else Partial("sum") if x is S.PARTIAL else Replicate()
    inputs = {name: dt(placement[name]) for name in bound.free if placement.get(name) is not None}
    module = ShardedBound(bound, mesh, style, inputs, [dt(o) for o in rule.outputs], sizes)
    module.style_symbol = symbol
    return module
