"""Launch records: one call's host work, decided once per distinct call and then replayed.

What a plan decides at call time depends only on the call's *key*: each tensor argument's shape,
strides, dtype and device, each scalar argument's value, and the OPFORGE_INDEX64 switch. From
those follow the bindings of the size symbols, the int64-index choice (runtime/indexing.py), the
host scalars, each step's alternative (its guard, or the autotuner's choice), each kernel's
configuration and grid, every size and stride argument, and the buffers to allocate. A
:class:`LaunchRecord` holds all of that as plain integers, and its *replay*, which allocates
the chosen alternatives' buffers, launches each kernel with its argument list, and returns the
outputs (from a key's second call on, as straight-line Python written for the record). A call
whose key was seen before checks nothing symbolic again (every argument check held for that
key) and evaluates no size.

Both the function behind the torch op (``call_function``) and each replay are generated as
straight-line code: loops over parameters, buffers and kernel arguments cost about twice as
much per call. ``LaunchRecord.source`` holds a replay's text.

Records are kept per op (``PlanRunner.records``), at most MAX_RECORDS of them, the oldest
dropped first. A call with tensors of a subclass (fake or functional tensors under tracing) is
run from a record built for it and not kept: the autotuner cannot time such a call, so a record
made then could hold a configuration chosen without timing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

MAX_RECORDS = 512


class KernelCall(NamedTuple):
    """One launch: ``fn[grid](*args, **meta)``, where ``args`` is ``template`` with the buffer
    of slot ``s`` at each position ``p`` of ``ptrs``."""
    fn: Any
    grid: tuple[int, ...]
    template: list
    ptrs: tuple[tuple[int, int], ...]
    meta: dict
    name: str
    config: Any


@dataclass(slots=True, eq=False)
class LaunchRecord:
    """Buffer slots: the call's ``n_inputs`` arguments in parameter order, then one per entry of
    ``allocs`` (shape, torch dtype, device, zeroed), the buffers the chosen kernels use.
    ``replay`` runs it: first a loop over ``allocs`` and ``calls`` (``generic_replay``); from the
    second call on, straight-line code compiled for it (``compile_replay``; compiling costs about
    50 us per kernel, which a key seen only once, as in a decode loop whose sizes grow, never
    pays)."""
    n_inputs: int
    allocs: tuple[tuple[tuple[int, ...], torch.dtype, torch.device, bool], ...]
    calls: tuple[KernelCall, ...]
    outputs: tuple[int, ...]
    tuple_result: bool
    wide: bool                        # the int64-indexed kernels
    chosen: tuple[str, ...]           # the first kernel of each step's chosen alternative
    index_checks: tuple = ()          # (argument position, bound, parameter name, what)
    replay: Any = None                # replay(args) -> the outputs
    source: str = ""                  # the compiled replay's text, once compiled


def contiguous_strides(shape) -> tuple[int, ...]:
    """The strides torch.empty gives (c10's rule: a size 0 or 1 counts as 1)."""
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= max(int(n), 1)
    return tuple(reversed(out))


def generic_replay(rec: LaunchRecord, runner, allocator):
    """The replay of a record's first call: loops over its buffers and calls; on its second
    call it compiles the straight-line replay and hands over to it."""
    uses = [0]

    def replay(args):
        uses[0] += 1
        if uses[0] > 1:
            compile_replay(rec, runner, allocator)
            return rec.replay(args)
        bufs = list(args)
        for shape, dtype, device, zeroed in rec.allocs:
            bufs.append((allocator.zeros if zeroed else allocator.allocate)(shape, dtype, device))
        launch = runner.launcher
        for call in rec.calls:
            a = call.template.copy()
            for pos, slot in call.ptrs:
                a[pos] = bufs[slot]
            launch(call, a)
        if rec.tuple_result:
            return tuple([bufs[i] for i in rec.outputs])
        return bufs[rec.outputs[0]]
    rec.replay = replay
    return rec


def compile_replay(rec: LaunchRecord, runner, allocator) -> LaunchRecord:
    """Give ``rec`` its straight-line replay: allocate each buffer through
    ``allocator.allocate`` (or ``allocator.zeros``), launch each kernel through
    ``runner.launcher`` (both looked up at every call, so a test can patch the allocator and
    ``bench --host`` stub the launches) with its argument list written out, return the outputs."""
    scope: dict = {"runner": runner, "ex": allocator}
    names = [f"a{i}" for i in range(rec.n_inputs)]
    lines = ["def replay(args):"]
    if names:
        lines.append(f"    {', '.join(names)}, = args")
    lines.append("    launch = runner.launcher")
    for j, (shape, dtype, device, zeroed) in enumerate(rec.allocs):
        b = f"b{rec.n_inputs + j}"
        names.append(b)
        scope[f"{b}_shape"], scope[f"{b}_dtype"], scope[f"{b}_device"] = shape, dtype, device
        lines.append(f"    {b} = ex.{'zeros' if zeroed else 'allocate'}({b}_shape, {b}_dtype, {b}_device)")
    for i, call in enumerate(rec.calls):
        scope[f"call{i}"] = call
        items = [_literal(v, f"call{i}_arg{pos}", scope) for pos, v in enumerate(call.template)]
        for pos, slot in call.ptrs:
            items[pos] = names[slot]
        lines.append(f"    launch(call{i}, [{', '.join(items)}])")
    outs = [names[i] for i in rec.outputs]
    lines.append(f"    return ({', '.join(outs)},)" if rec.tuple_result else f"    return {outs[0]}")
    src = "\n".join(lines) + "\n"
    exec(compile(src, "<opforge launch record>", "exec"), scope)
    rec.replay, rec.source = scope["replay"], src
    return rec


def _literal(v, name: str, scope: dict) -> str:
    """An int or bool as a literal; anything else (floats, inf, nan) through a name."""
    if type(v) is bool or type(v) is int:
        return repr(v)
    scope[name] = v
    return name


MISSING = type("Missing", (), {"__repr__": lambda self: "<missing>"})()


def call_function(op: str, params: list[tuple[bool, bool, Any]], state: dict):
    """The function behind an op's torch registration. ``params``: (is a tensor, has a default,
    the default) per parameter. It builds the call's key (each tensor's shape, strides, dtype
    and device, each scalar's value, then ``index64()``: OPFORGE_INDEX64 as set), looks the
    record up in ``records`` and replays it, or hands the call to ``first_run`` (every check,
    then a record). ``state`` becomes the function's globals: records, first_run,
    check_indices, index64; registering a changed spec again re-points the op by updating it.
    The defaults sit in the signature (the dispatcher leaves trailing defaults out)."""
    names = [f"a{i}" for i in range(len(params))]
    trailing = 0
    for _, has_default, _ in reversed(params):
        if not has_default:
            break
        trailing += 1
    state.update(MISSING=MISSING, op=op)
    sig, key = [], []
    for i, (n, (is_tensor, has_default, default)) in enumerate(zip(names, params)):
        if has_default and i >= len(params) - trailing:
            state[f"default{i}"] = default
            sig.append(f"{n}=default{i}")
        else:
            sig.append(f"{n}=MISSING")
        key += [f"{n}.shape", f"{n}.stride()", f"{n}.dtype", f"{n}.device"] if is_tensor else [n]
    args = f"({', '.join(names)},)" if names else "()"
    src = "\n".join([
        f"def run({', '.join(sig + ['*rest'])}):",
        f"    args = {args}",
        "    if rest:",
        "        return first_run(args + rest)",
        "    try:",
        f"        rec = records.get(({', '.join(key + ['index64()'])},))",
        "    except (AttributeError, TypeError):    # not a tensor, or unhashable: first_run says what",
        "        return first_run(args)",
        "    if rec is None:",
        "        return first_run(args)",
        "    if rec.index_checks:",
        "        check_indices(op, rec.index_checks, args)",
        "    return rec.replay(args)",
        ""])
    exec(compile(src, f"<opforge call of {op}>", "exec"), state)
    return state["run"]


def call_key(args, params, index64) -> tuple:
    """The key ``call_function``'s code builds, for the same arguments (to keep a record)."""
    key = []
    for a, (is_tensor, _, _) in zip(args, params):
        key += [a.shape, a.stride(), a.dtype, a.device] if is_tensor else [a]
    return tuple(key + [index64()])


def plain_tensors(args) -> bool:
    """No tensor subclass among the arguments (nothing is being traced)."""
    for a in args:
        if isinstance(a, torch.Tensor) and type(a) is not torch.Tensor and type(a) is not torch.nn.Parameter:
            return False
    return True
