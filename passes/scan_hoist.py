"""Pass: hoist a scan body's carry-free contractions out of the loop, done for all steps at once.

Pipeline position: on the canonical graph of an op with scans, before it is split into pieces
(runtime/scan.py); the hoisted nodes join the piece before the scan, so ``x[t] @ w.T + b``
becomes one GEMM over the whole sequence, fused as usual, and the body reads its rows step by
step like any step slice.

What is hoisted: every matmul whose operands depend on neither a carry nor the step index
(only on step slices and values from before the scan), the carry-free nodes it needs, and the
carry-free pointwise nodes and views that consume hoisted values without growing them (the
bias add; a view only where a hoisted node reads it: a GRU's gate slices stay in the body).
Other carry-free work (GLA's outer product ``k[t] v[t]^T``) stays in the body: hoisting it
would store an S-times larger tensor than its operands.

Each hoisted node is *batched*: its step-slice operands become the sliced tensors with the step
axis first, values from before the scan stay as they are (they broadcast), and the node gets a
leading axis of the scan's length (a pointwise node's batched operands take size-1 axes so that
broadcasting stays aligned; a view's attributes, a reduction's axes and a transpose's axes move
by one). A node without such a rule stays in the body.
"""
from __future__ import annotations

from ..ir import registry
from ..ir.graph import Attrs, Graph, Node, Param, Value, unique_param_names
from ..ir.registry import Kind, RuleError
from ..ir.types import TensorType

VIEWS = {"reshape", "expand", "slice", "transpose", "cast"}


def hoist_scans(g: Graph, ctx=None) -> Graph:
    if not any(n.op == "scan" for n in g.nodes):
        return g
    nodes: list[Node] = []
    for n in g.nodes:
        if n.op == "scan":
            outer, n = hoist(n)
            nodes += outer
        nodes.append(n)
    return g.replace(nodes=tuple(nodes))


def hoist(node: Node) -> tuple[list[Node], Node]:
    """(nodes to run before the scan, the scan node without them)."""
    a = node.attrs
    body: Graph = a["body"]
    k, first = a["carries"], 1 if a["uses_index"] else 0
    n_fill = sum(f is not None for f in a["fills"])
    carried = k - n_fill
    sliced = len(a["slice_axes"])
    params = [p.value for p in body.params]
    index = params[0] if first else None
    carries = params[first:first + k]
    slice_params = params[first + k:first + k + sliced]
    closed_params = params[first + k + sliced:]
    outer_of: dict[Value, Value] = {}           # body value -> its value before the scan
    slice_inputs = node.inputs[carried:carried + sliced]
    closed_inputs = node.inputs[carried + sliced:]
    outer_of.update(zip(closed_params, closed_inputs))
    varying = set(carries) | ({index} if index is not None else set())
    for n in body.nodes:
        if any(v in varying for v in n.inputs):
            varying.update(n.outputs)
    free = [n for n in body.nodes if not any(o in varying for o in n.outputs)]
    chosen = _choose(body, free)
    if not chosen:
        return [], node

    outer: list[Node] = []
    batched: dict[Value, Value] = {}            # body value -> the value over all steps [S, ...]
    length = a["length"]
    for p, x, axis in zip(slice_params, slice_inputs, a["slice_axes"]):
        if axis == 0:
            batched[p] = x
        else:
            perm = (axis,) + tuple(i for i in range(x.type.rank) if i != axis)
            batched[p] = _emit(outer, "permute", [x], {"perm": perm}, node)
    producer = body.producers()
    for n in body.nodes:
        if n not in chosen:
            continue
        res = _batched_node(n, batched, outer_of, producer, length, outer)
        if res is None:                          # no rule: it (and what needs it) stays in the body
            chosen = {m for m in chosen if m is not n and not _needs(m, n, producer)}
            continue
        out, over_steps = res
        (batched if over_steps else outer_of)[n.out] = out
    # loop-invariant nodes (w.T) are made before the scan for the hoisted ones and stay in the
    # body for the others (views: no work); the step-varying ones leave the body
    kept_hoisted = [n for n in body.nodes if n in chosen and n.out in batched]
    if not kept_hoisted:
        return [], node
    # the body reads what left it as step slices (axis 0), in place of what they needed
    gone = set(kept_hoisted)
    remaining = [n for n in body.nodes if n not in gone]
    used = {v for n in remaining for v in n.inputs} | set(body.outputs)
    new_slices = [n.out for n in kept_hoisted if n.out in used]
    fresh = {v: Value(v.type, v.name) for v in new_slices}
    remaining = [Node(n.op, tuple(fresh.get(v, v) for v in n.inputs), n.attrs, n.outputs, n.span) for n in remaining]
    results = tuple(fresh.get(v, v) for v in body.outputs)
    used = {v for n in remaining for v in n.inputs} | set(results)
    keep_slices = [(p, x, ax) for p, x, ax in zip(slice_params, slice_inputs, a["slice_axes"]) if p in used]
    keep_closed = [(p, x) for p, x in zip(closed_params, closed_inputs) if p in used]
    by_value = {p.value: p for p in body.params}
    new_params = [by_value[v] for v in params[:first + k]]
    new_params += [by_value[p] for p, _, _ in keep_slices]
    new_params += [Param(_name(v, i), fresh[v]) for i, v in enumerate(new_slices)]
    new_params += [by_value[p] for p, _ in keep_closed]
    new_params = unique_param_names(new_params)
    new_body = body.replace(params=tuple(new_params), nodes=tuple(remaining), outputs=results)
    inputs = list(node.inputs[:carried]) + [x for _, x, _ in keep_slices] + [batched[v] for v in new_slices] + \
        [x for _, x in keep_closed]
    axes = tuple(ax for _, _, ax in keep_slices) + (0,) * len(new_slices)
    attrs = a.replace(body=new_body, slice_axes=axes, hoisted=tuple(n.op for n in kept_hoisted))
    return outer, Node(node.op, tuple(inputs), attrs, node.outputs, node.span)


def _choose(body: Graph, free: list[Node]) -> set:
    """The carry-free nodes to hoist: matmuls and the free nodes they need, then free pointwise
    nodes and views reading hoisted values whose outputs are no larger than those values."""
    producer = body.producers()
    free_set = set(free)
    chosen: set = set()
    for n in free:
        if n.op != "matmul":
            continue
        todo = [n]
        while todo:
            m = todo.pop()
            if m in chosen:
                continue
            chosen.add(m)
            todo += [producer[v] for v in m.inputs if v in producer and producer[v] in free_set]
    if not chosen:
        return chosen
    for n in free:
        if n in chosen or not n.outputs or not isinstance(n.out.type, TensorType):
            continue
        kind = registry.get(n.op).kind
        if kind is not Kind.POINTWISE and n.op not in VIEWS:
            continue
        hoisted = [v for v in n.inputs if v in producer and producer[v] in chosen]
        no_larger = n.op in ("slice", "cast") or any(tuple(v.type.shape) == tuple(n.out.type.shape) for v in hoisted)
        if hoisted and no_larger and \
                all(v not in producer or producer[v] in chosen or producer[v] not in free_set or
                    registry.get(producer[v].op).kind is Kind.SOURCE for v in n.inputs):
            chosen.add(n)
    # a view at the frontier is index arithmetic wherever it runs: in the body it costs nothing,
    # hoisted it would store a copy of its slice of the hoisted value (a GRU's three gate slices)
    frontier = True
    while frontier:
        frontier = [n for n in chosen if n.op in VIEWS - {"cast"} and
                    not any(m in chosen and n.out in m.inputs for m in free)]
        chosen.difference_update(frontier)
    return chosen


def _needs(m: Node, n: Node, producer: dict) -> bool:
    todo, seen = list(m.inputs), set()
    while todo:
        v = todo.pop()
        if v in seen:
            continue
        seen.add(v)
        if v in n.outputs:
            return True
        if v in producer:
            todo += producer[v].inputs
    return False


def _batched_node(n: Node, batched: dict, outer_of: dict, producer: dict, length, outer: list):
    """(the node's value before the scan, whether it runs over the steps), or None when it has
    no batching rule here. A node reading no step-varying value is made once, as it is."""
    prim = registry.get(n.op)
    args, body_ranks = [], []
    for v in n.inputs:
        if v in batched:
            args.append(batched[v])
        elif v in outer_of:
            args.append(outer_of[v])
        elif v in producer and producer[v].op == "const":      # a literal of the body: made again
            c = producer[v]
            outer_of[v] = _emit(outer, "const", [], dict(c.attrs), c)
            args.append(outer_of[v])
        else:
            return None
        body_ranks.append(v.type.rank if isinstance(v.type, TensorType) else 0)
    is_b = [v in batched for v in n.inputs]
    attrs = dict(n.attrs)
    if not any(is_b):
        try:
            return _emit(outer, n.op, args, attrs, n), False
        except RuleError:
            return None
    if prim.kind is Kind.POINTWISE:
        r = n.out.type.rank
        for i, (x, b, rank) in enumerate(zip(args, is_b, body_ranks)):
            if b and rank < r:
                shape = (length,) + (1,) * (r - rank) + tuple(x.type.shape[1:])
                args[i] = _emit(outer, "reshape", [x], {"shape": shape}, n)
    elif n.op == "matmul":
        if is_b[1] and n.inputs[1].type.rank < 2 or is_b[0] and is_b[1] and n.inputs[0].type.rank < 2:
            return None
    elif n.op in ("reshape", "expand"):
        attrs["shape"] = (length,) + tuple(attrs["shape"])
    elif n.op == "slice":
        attrs = {"starts": (0,) + tuple(attrs["starts"]), "stops": (length,) + tuple(attrs["stops"]),
                 "steps": (1,) + tuple(attrs["steps"])}
    elif n.op == "transpose":
        attrs = {"a": attrs["a"] + 1, "b": attrs["b"] + 1}
    else:
        return None
    try:
        return _emit(outer, n.op, args, attrs, n), True
    except RuleError:
        return None


def _emit(outer: list, op: str, inputs: list, attrs: dict, like: Node) -> Value:
    types, attrs = registry.get(op).run_infer([v.type for v in inputs], attrs)
    out = Value(types[0], like.outputs[0].name if like.op == op else None)
    outer.append(Node(op, tuple(inputs), Attrs(attrs), (out,), like.span))
    return out


def _name(v: Value, i: int) -> str:
    return f"{v.name}_t" if v.name else f"hoisted{i}_t"
