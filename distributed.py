"""opforge under torch.distributed: importing this gives every opforge op compiled so far (and
every one compiled later) its DTensor sharding rule, so ``torch.ops.<ns>.<op>`` called directly
with DTensors works (calls through ``mod.op(...)`` register on their own).

    import opforge.distributed
    opforge.distributed.rules(mod.swiglu_mlp)     # the rule, one line per size symbol

docs/distributed.md has tensor-parallel, sequence-parallel and FSDP2 examples.
"""
from __future__ import annotations

from .runtime.sharding import register, rule_of

__all__ = ["register", "rules", "bind_sharded"]


def rules(op) -> str:
    """What sharding each size symbol of ``op`` (a compiled op) does, as explain() shows it."""
    return rule_of(op).text()


register()


def bind_sharded(op, mesh, style: str, calibration=None, **weights):
    """``op.bind(**weights)`` on this rank's shard of each weight: ``style`` "column" splits
    the weights' rows (N), "row" their columns (K); the module takes and returns DTensors
    (runtime/sharded_bind.py)."""
    from .runtime.sharded_bind import bind_sharded as bind
    return bind(op, mesh, style, calibration, **weights)
