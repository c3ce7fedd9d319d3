"""The text form of level 1 (``opforge show --stage graph``).

Stable by construction (golden tests compare it): values are named by their spec name where it
is unique and by a counter otherwise, attributes print in sorted order, one node per line.
"""
from __future__ import annotations

from .graph import Graph, Value, fmt_attr


class Namer:
    def __init__(self):
        self.names: dict[Value, str] = {}
        self.used: set[str] = set()
        self.counter = 0

    def __call__(self, v: Value) -> str:
        if v not in self.names:
            base = v.name
            if base and base not in self.used:
                name = base
            elif base:
                k = 1
                while f"{base}.{k}" in self.used:
                    k += 1
                name = f"{base}.{k}"
            else:
                while str(self.counter) in self.used:
                    self.counter += 1
                name = str(self.counter)
                self.counter += 1
            self.used.add(name)
            self.names[v] = name
        return "%" + self.names[v]


def format_attrs(attrs) -> str:
    if not attrs:
        return ""
    return " {" + ", ".join(f"{k}={fmt_attr(v)}" for k, v in attrs.items()) + "}"


def print_graph(g: Graph) -> str:
    name = Namer()
    params = []
    for p in g.params:
        s = f"{name(p.value)}: {p.value.type}"
        if p.layout is not None:
            s += f" {p.layout}"
        if p.has_default:
            s += f" = {fmt_attr(p.default)}"
        params.append(s)
    results = ", ".join(str(t) for t in g.result_types)
    if g.tuple_result:
        results = f"({results})"
    lines = [f"op {g.name}({', '.join(params)}) -> {results} {{"]
    for n in g.nodes:
        outs = ", ".join(f"{name(v)}: {v.type}" for v in n.outputs)
        ins = ", ".join(name(v) for v in n.inputs)
        if isinstance(n.attrs.get("body"), Graph):
            # a region (scan): its attributes on the node's line, its body indented below
            rest = {k: v for k, v in n.attrs.items() if k != "body"}
            lines.append(f"  {outs} = {n.op}({ins}){format_attrs(rest)} {{")
            lines += ["    " + line for line in print_graph(n.attrs["body"]).splitlines()]
            lines.append("  }")
            continue
        lines.append(f"  {outs} = {n.op}({ins}){format_attrs(n.attrs)}")
    lines.append(f"  return {', '.join(name(v) for v in g.outputs)}")
    lines.append("}")
    return "\n".join(lines)
