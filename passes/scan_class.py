"""Analysis: the class of a scan's recurrence, for ``explain()`` and the choice of a lowering.

Pipeline position: read-only, on the canonical graph's scan nodes (ir/prims_scan.py).

A scan is a *linear recurrence* when every carry's next value is ``a * carry + b`` with ``a``
and ``b`` free of carries and ``a`` broadcasting over the carry (gated linear attention,
state-space models, RetNet, linear attention, HGRN): followed from the carry, only additions
and subtractions of carry-free values, products with carry-free values, negation and casts,
each keeping the carry's shape. Anything else (a carry through a nonlinearity, a matmul, a
reduction, a reshape, a product of two carries) makes it a *general* recurrence, and the
reason names the first node that does it.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir.graph import Graph, Node

AFFINE_OPS = {"add", "sub", "mul", "neg", "cast"}


@dataclass(frozen=True)
class ScanClass:
    kind: str            # "linear" or "general"
    why: str             # for a general one: the node that makes it so; for a linear one, its form


def classify(node: Node) -> ScanClass:
    body: Graph = node.attrs["body"]
    k = node.attrs["carries"]
    first = 1 if node.attrs["uses_index"] else 0
    carries = [p.value for p in body.params[first:first + k]]
    carry_of = {c: c for c in carries}       # value -> the carry it is affine in
    producer = body.producers()
    # only the carries' next values decide: a step's outputs may read the carries any way
    # (GLA's readout sums q * h over an axis)
    cone: set = set()
    todo = list(body.outputs[:k])
    while todo:
        v = todo.pop()
        if v in cone:
            continue
        cone.add(v)
        if v in producer:
            todo.extend(producer[v].inputs)
    for n in body.nodes:
        hit = [carry_of[v] for v in n.inputs if v in carry_of]
        if not hit or not any(o in cone for o in n.outputs):
            continue
        where = f"line {n.span.line}" if n.span is not None else "the body"
        if n.op not in AFFINE_OPS:
            return ScanClass("general", f"a carry goes through {n.op} ({where})")
        if len(hit) > 1 and n.op == "mul":
            return ScanClass("general", f"two carry-dependent values are multiplied ({where})")
        if len(set(hit)) > 1:
            return ScanClass("general", f"the carries {', '.join(sorted({c.name or '?' for c in hit}))} mix ({where})")
        c = hit[0]
        if tuple(n.out.type.shape) != tuple(c.type.shape):
            return ScanClass("general", f"a carry-dependent value changes shape ({where})")
        carry_of[n.out] = c
    for c, nxt in zip(carries, body.outputs[:k]):
        if nxt in carry_of and carry_of[nxt] is not c:
            src = producer.get(nxt)
            return ScanClass("general", f"the next value of carry '{c.name}' depends on carry '{carry_of[nxt].name}'"
                             + (f" (line {src.span.line})" if src is not None and src.span is not None else ""))
    names = ", ".join(c.name or "?" for c in carries)
    dep = set(carries)
    for n in body.nodes:
        if any(v in dep for v in n.inputs):
            dep.update(n.outputs)
    readout = [n.op for n in body.nodes if n.op in ("sum", "matmul") and any(v in dep for v in n.inputs)]
    return ScanClass("linear", f"each carry ({names}) is a * carry + b, a and b free of carries"
                     + (f"; the outputs read the carries through {', '.join(sorted(set(readout)))}" if readout else ""))
