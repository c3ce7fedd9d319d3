"""Pass: inline calls of other ops of the same file.

Pipeline position: first, right after the front end builds the graphs. Needs
``PassContext.program`` for the callees. After it no ``call`` node remains. The callee's sizes
are substituted by the caller's (the call's ``sizes`` attribute holds the unification the front
end did), in value types and in attributes alike.

Linear in the size of the result: each (callee, sizes) pair becomes a *template* once (its own
nodes with the sizes substituted, and references to the templates of the ops it calls), kept in
``PassContext.memo`` for every op compiled with that context; a call site copies the template's
nodes with fresh values, following nested templates with an explicit stack (a chain of thousands
of ops calling ops neither re-inlines a callee per caller nor recurses in Python). A value of a
callee is named ``callee.name`` (``outer.inner.name`` through nested calls; a binding of a
dtype-generic op by its op's name: ``rms_norm.ms``, not ``rms_norm__f16.ms``).
"""
from __future__ import annotations

from ..ir.dims import Sym, subst, subst_any
from ..ir.graph import Attrs, Graph, Node, Value
from ..ir.types import ScalarType, TensorType, Type
from .context import PassContext


def subst_type(t: Type, mapping) -> Type:
    if isinstance(t, ScalarType) or not mapping:
        return t
    return TensorType(t.dtype, tuple(subst(d, mapping) for d in t.shape))


def _reduced(mapping: dict) -> tuple:
    """The mapping without entries that map a symbol to itself, as a hashable key."""
    return tuple(sorted((s, d) for s, d in mapping.items() if not (isinstance(d, Sym) and d == Sym.of(s))))


def _compose(inner: tuple, outer: dict) -> tuple:
    """Sizes of a call inside a callee, in the caller's symbols: substituting ``inner`` and then
    ``outer`` is substituting this."""
    out = dict(outer)
    out.update((s, subst(d, outer) if outer else d) for s, d in inner)
    return _reduced(out)


class _Template:
    """A callee at given sizes: ``entries`` in order, each ("node", op, input refs, attrs,
    output types, output names, span) or ("call", template, input refs, name prefix); a ref
    numbers the callee's values (its parameters first, then every output in order)."""
    __slots__ = ("entries", "outputs")

    def __init__(self, entries: list, outputs: tuple):
        self.entries = entries
        self.outputs = outputs


def _template(program, name: str, key: tuple, memo: dict) -> _Template:
    """The template of ``name`` at sizes ``key``, and of every op it reaches (an explicit stack:
    callees first)."""
    todo = [(name, key)]
    while todo:
        callee_name, sizes = todo[-1]
        if (callee_name, sizes) in memo:
            todo.pop()
            continue
        callee = program[callee_name]
        mapping = dict(sizes)
        missing = []
        for n in callee.nodes:
            if n.op == "call":
                sub = (n.attrs["callee"], _compose(n.attrs["sizes"], mapping))
                if sub not in memo:
                    missing.append(sub)
        if missing:
            todo.extend(missing)
            continue
        todo.pop()
        refs: dict[Value, int] = {p.value: i for i, p in enumerate(callee.params)}
        entries = []
        types: dict[Type, Type] = {}
        for n in callee.nodes:
            ins = tuple(refs[v] for v in n.inputs)
            if n.op == "call":
                sub = memo[(n.attrs["callee"], _compose(n.attrs["sizes"], mapping))]
                entries.append(("call", sub, ins, f"{program.op_of(n.attrs['callee'])}."))
            else:
                outs = []
                for v in n.outputs:
                    if v.type not in types:
                        types[v.type] = subst_type(v.type, mapping)
                    outs.append(types[v.type])
                attrs = Attrs({k: subst_any(v, mapping) for k, v in n.attrs.items()}) if mapping else n.attrs
                entries.append(("node", n.op, ins, attrs, tuple(outs), tuple(v.name for v in n.outputs), n.span))
            for v in n.outputs:
                refs[v] = len(refs)
        memo[(callee_name, sizes)] = _Template(entries, tuple(refs[v] for v in callee.outputs))
    return memo[(name, key)]


def _expand(t: _Template, args: tuple, prefix: str, nodes: list) -> list[Value]:
    """Append the template's nodes (fresh values, named under ``prefix``); its result values."""
    stack = [(t, list(args), prefix, 0, None)]
    result: list[Value] = []
    while stack:
        t, values, prefix, i, ret = stack.pop()
        if ret is not None:           # back from a nested call: its results are values here
            values.extend(ret)
        while i < len(t.entries):
            e = t.entries[i]
            i += 1
            if e[0] == "call":
                _, sub, ins, sub_prefix = e
                stack.append((t, values, prefix, i, None))
                stack.append((sub, [values[r] for r in ins], prefix + sub_prefix, 0, None))
                break
            _, op, ins, attrs, out_types, out_names, span = e
            outs = tuple(Value(ty, prefix + nm if nm else None) for ty, nm in zip(out_types, out_names))
            nodes.append(Node(op, tuple(values[r] for r in ins), attrs, outs, span))
            values.extend(outs)
        else:
            result = [values[r] for r in t.outputs]
            if stack:
                parent = stack.pop()
                stack.append(parent[:4] + (result,))
    return result


def _calls(g: Graph) -> bool:
    return any(n.op == "call" or n.op == "scan" and _calls(n.attrs["body"]) for n in g.nodes)


def inline(g: Graph, ctx: PassContext) -> Graph:
    """Every call replaced by its callee's nodes, also inside scan bodies."""
    if not _calls(g):
        return g
    if ctx.program is None:
        raise ValueError(f"{g.name} calls other ops; inlining needs PassContext(program=...)")
    memo = ctx.memo.setdefault(("inline", id(ctx.program)), {})
    nodes: list[Node] = []
    remap: dict[Value, Value] = {}
    for n in g.nodes:
        ins = tuple(remap.get(v, v) for v in n.inputs)
        if n.op == "scan" and _calls(n.attrs["body"]):
            nodes.append(Node(n.op, ins, n.attrs.replace(body=inline(n.attrs["body"], ctx)), n.outputs, n.span))
            continue
        if n.op != "call":
            nodes.append(n if ins == n.inputs else Node(n.op, ins, n.attrs, n.outputs, n.span))
            continue
        callee = n.attrs["callee"]
        t = _template(ctx.program, callee, _reduced(dict(n.attrs["sizes"])), memo)
        outs = _expand(t, ins, f"{ctx.program.op_of(callee)}.", nodes)
        remap.update(zip(n.outputs, outs))
    return g.replace(nodes=tuple(nodes), outputs=tuple(remap.get(v, v) for v in g.outputs))
