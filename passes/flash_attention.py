"""Pass: rewrite attention into one flash_attention node.

Pipeline position: after canonicalisation, before fusion. The pattern, each intermediate used
once and not a result:

    s = matmul(q, transpose(k))          # the last two axes of k swapped
    s = mul(s, scale)                    # optional, a scalar
    s = where(mask, s, -inf)             # optional: causal(S, T) or a bool tensor
    p = softmax(s, axis=-1)
    o = matmul(p, v)

(scale and mask in either order). The rewrite keeps q, k, v and the mask as they were (views
included) and drops the S x T intermediates, which the kernel never materialises.
"""
from __future__ import annotations

import math

from ..ir.graph import Attrs, Graph, Node, Value
from ..ir.types import ScalarType, TensorType, accumulator
from .canonicalize import dead_code
from .context import PassContext


def _single_use(v: Value, users, outputs) -> Node | None:
    us = users.get(v, [])
    if len(us) != 1 or v in outputs:
        return None
    return us[0]


def match(p_node: Node, producer, users, outputs):
    """From the softmax node: the matched pieces, or None."""
    if p_node.op != "softmax" or p_node.attrs["axis"] != p_node.out.type.rank - 1:
        return None
    o_node = _single_use(p_node.out, users, outputs)
    if o_node is None or o_node.op != "matmul" or o_node.inputs[0] is not p_node.out:
        return None
    scale = mask = None
    causal = None
    x = p_node.inputs[0]
    dead = [p_node]
    while True:
        n = producer.get(x)
        if n is None or _single_use(x, users, outputs) is None:
            return None
        if n.op == "mul" and scale is None:
            a, b = n.inputs
            s, t = (b, a) if isinstance(b.type, ScalarType) else (a, b) if isinstance(a.type, ScalarType) else (None, None)
            if s is None or t.type.shape != n.out.type.shape:
                return None
            scale, x = s, t
        elif n.op == "where" and mask is None:
            c, a, b = n.inputs
            fill = producer.get(b)
            if fill is None or fill.op != "const" or fill.attrs["value"] != -math.inf or a.type.shape != n.out.type.shape:
                return None
            cn = producer.get(c)
            if cn is not None and cn.op == "causal":
                causal = (cn.attrs["S"], cn.attrs["T"])
            if not isinstance(c.type, TensorType):
                return None
            mask, x = c, a
        elif n.op == "matmul":
            break
        else:
            return None
        dead.append(n)
    qk = producer[x]
    q, kt = qk.inputs
    tn = producer.get(kt)
    r = kt.type.rank
    if tn is None or tn.op != "transpose" or (tn.attrs["a"], tn.attrs["b"]) != (r - 2, r - 1) or r < 2 \
            or q.type.rank < 2:
        return None
    if causal is not None:
        S, T = q.type.shape[-2], kt.type.shape[-1]
        if causal != (S, T):
            causal = None  # still a mask, evaluated from its own expression
    k = tn.inputs[0]
    v = o_node.inputs[1]
    if v.type.rank < 2:
        return None
    return dict(q=q, k=k, v=v, scale=scale, mask=mask, causal=causal, out=o_node, first=qk)


def rewrite_flash_attention(g: Graph, ctx: PassContext | None = None) -> Graph:
    producer, users, outputs = g.producers(), g.users(), set(g.outputs)
    replace: dict[Node, Node] = {}      # the final matmul -> the fused node
    for n in g.nodes:
        m = match(n, producer, users, outputs)
        if m is None:
            continue
        inputs = [m["q"], m["k"], m["v"]]
        if m["scale"] is not None:
            inputs.append(m["scale"])
        attrs = {"scale": m["scale"] is not None}
        if m["mask"] is None:
            attrs["mask"] = "none"
        elif m["causal"] is not None:
            attrs["mask"], attrs["causal"] = "causal", m["causal"]
        else:
            attrs["mask"] = "tensor"
            inputs.append(m["mask"])
        out = m["out"].out
        lse = Value(TensorType(accumulator(out.type.dtype), tuple(out.type.shape[:-1])), "lse")
        replace[m["out"]] = Node("flash_attention", tuple(inputs), Attrs(attrs), (out, lse), m["out"].span)
    if not replace:
        return g
    nodes = [replace.get(n, n) for n in g.nodes]
    return g.replace(nodes=tuple(dead_code(nodes, g.outputs)))
