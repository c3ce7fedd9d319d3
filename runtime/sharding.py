"""opforge ops on DTensors: each registered op's sharding rule, given to DTensor.

Every op the runtime registers (``ns::op__infer`` or the plain ``ns::op``, and the gradients'
``ns::op__fwd_<mask>`` and ``ns::op__bwd_<mask>``) gets a strategy function through
``torch.distributed.tensor.experimental.register_sharding``: all inputs replicated (always
right: every rank runs the whole op), and one strategy per size symbol that can be sharded,
as passes/sharding.py derives it from the op's kernel graph (inputs split along that symbol's
axes, results ``Shard``, ``Partial(sum)`` or ``Replicate``). DTensor takes them per mesh
dimension and redistributes the inputs to the cheapest one, so an all-gather happens exactly
where an op needs a whole axis. The user-facing ``ns::op`` of a differentiable op is a
CompositeImplicitAutograd router (runtime/autograd.py): it runs before DTensor's dispatch and
needs no strategy of its own.

Registration is lazy: importing torch.distributed.tensor costs about a second, which a
process that never shards should not pay. An op is registered at once when
``torch.distributed.tensor`` is already imported, else right after it is (an import hook on
``sys.meta_path``); ``opforge.distributed.register()`` (run by importing ``opforge.distributed``)
and the first call of ``mod.op(...)`` with a DTensor do the same, should the hook not have run.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import threading

from ..ir.types import TensorType

_NOTED: dict[str, object] = {}     # "ns::name" -> the torch op packet, awaiting or done
_DONE: set[str] = set()
_LOCK = threading.Lock()
_MODULE = "torch.distributed.tensor"


def note(qual: str, packet) -> None:
    """runtime/library.py registered ``qual``: give DTensor its rule now if DTensor is loaded,
    else when it is (an import hook)."""
    _NOTED[qual] = packet
    if _MODULE in sys.modules:
        register()
    else:
        _install_hook()


def pending() -> bool:
    """Are there ops without a registered rule? (cheap: torch.compile traces through it)"""
    return len(_DONE) < len(_NOTED)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Registers the noted ops' rules right after torch.distributed.tensor is imported, so ops
    compiled before it work with DTensors everywhere (torch.compile included)."""

    def find_spec(self, name, path, target=None):
        if name != _MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            register()
        spec.loader.exec_module = exec_module
        return spec


_HOOK: list = []


def _install_hook() -> None:
    if not _HOOK:
        _HOOK.append(_AfterImport())
        sys.meta_path.insert(0, _HOOK[0])


def register() -> int:
    """Register the sharding rule of every op registered so far (and not yet given one);
    returns how many were added. Imports torch.distributed.tensor."""
    try:
        from torch.distributed.tensor.experimental import register_sharding
    except ImportError:          # a torch built without distributed support
        return 0
    added = 0
    with _LOCK:
        for qual, packet in list(_NOTED.items()):
            if qual in _DONE:
                continue
            register_sharding(packet.default)(_strategy_fn(qual))
            _DONE.add(qual)
            added += 1
    return added


def registered(qual: str) -> bool:
    return qual in _DONE


def is_dtensor(x) -> bool:
    """Without importing DTensor: only a loaded torch.distributed.tensor can have made one."""
    mod = sys.modules.get(_MODULE)
    return mod is not None and isinstance(x, mod.DTensor)


def rule_of(compiled):
    """The op's sharding rule (passes/sharding.py), computed once per compiled op."""
    rule = getattr(compiled, "_sharding_rule", None)
    if rule is None:
        from ..passes.sharding import sharding_rule
        rule = compiled._sharding_rule = sharding_rule(compiled.fused.graph)
    return rule


def strategies(compiled, nargs: int | None = None) -> list[tuple[list, list]]:
    """DTensor's (output placements, input placements) pairs for one mesh dimension: all
    replicated first, then one per shardable symbol. Scalars get None. ``nargs``: how many
    arguments the call passed (defaults left out have no placement)."""
    from torch.distributed.tensor import Partial, Replicate, Shard
    from ..passes import sharding as S

    params = compiled.graph.params
    nargs = len(params) if nargs is None else nargs
    nout = len(compiled.graph.result_types)
    tensor = [isinstance(p.value.type, TensorType) for p in params][:nargs]

    def placement(x):
        if x is None:
            return None
        if isinstance(x, S.Shard):
            return Shard(x.axis)
        return Partial("sum") if x is S.PARTIAL else Replicate()

    out = [([Replicate()] * nout, [Replicate() if t else None for t in tensor])]
    rule = rule_of(compiled)
    by_name = dict(zip(rule.params, range(len(rule.params))))
    for r in rule.symbols:
        if not r.shardable or r.kind == "replicate":
            continue
        ins = []
        for p, t in zip(params, tensor):
            i = by_name.get(p.name)
            ins.append(placement(r.inputs[i]) if t and i is not None else (Replicate() if t else None))
        out.append(([placement(o) for o in r.outputs], ins))
    return out


def _strategy_fn(qual: str):
    def strategy(*args, **kwargs):
        from .library import _IMPLS
        return strategies(_IMPLS[qual], len(args))
    strategy.__name__ = f"opforge_sharding_{qual.replace('::', '_')}"
    return strategy
