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

Any other change of the scores (soft-capping ``tanh(s / c) * c``, an ALiBi or relative-position
bias, a bias tensor, a mask computed from positions with ``arange`` and ``&``) takes the general
form, ``flash_attention_mod(s, v)``: only ``softmax(s) @ v`` is replaced; the scores' matmul
and the pointwise *score cone* that computes ``s`` from it stay in the graph, and fusion puts
them into the flash kernel (:func:`score_cone`), where they are evaluated on each tile of scores.
"""
from __future__ import annotations

import math

from ..ir import registry
from ..ir.graph import Attrs, Graph, Node, Value
from ..ir.registry import Kind
from ..ir.types import ScalarType, TensorType, accumulator
from .canonicalize import dead_code
from .context import PassContext


def _single_use(v: Value, users, outputs) -> Node | None:
    us = users.get(v, [])
    if len(us) != 1 or v in outputs:
        return None
    return us[0]


def _softmax_matmul(p_node: Node, users, outputs) -> Node | None:
    """The matmul ``softmax(s, axis=-1) @ v`` of a softmax node, its probabilities used there only."""
    if p_node.op != "softmax" or p_node.attrs["axis"] != p_node.out.type.rank - 1:
        return None
    o_node = _single_use(p_node.out, users, outputs)
    if o_node is None or o_node.op != "matmul" or o_node.inputs[0] is not p_node.out:
        return None
    return o_node


def match(p_node: Node, producer, users, outputs):
    """From the softmax node: the matched pieces, or None."""
    o_node = _softmax_matmul(p_node, users, outputs)
    if o_node is None:
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
    if not is_score_matmul(qk, producer):
        return None
    q, kt = qk.inputs
    tn = producer[kt]
    if causal is not None:
        S, T = q.type.shape[-2], kt.type.shape[-1]
        if causal != (S, T):
            causal = None  # still a mask, evaluated from its own expression
    k = tn.inputs[0]
    v = o_node.inputs[1]
    if v.type.rank < 2:
        return None
    return dict(q=q, k=k, v=v, scale=scale, mask=mask, causal=causal, out=o_node, first=qk)


VIEWS = {"reshape", "expand", "slice", "permute", "transpose"}


def is_score_matmul(n: Node | None, producer) -> bool:
    """``q @ transpose(k)`` over the last two axes."""
    if n is None or n.op != "matmul":
        return False
    q, kt = n.inputs
    tn = producer.get(kt)
    r = kt.type.rank
    return (tn is not None and tn.op == "transpose" and r >= 2 and q.type.rank >= 2
            and (tn.attrs["a"], tn.attrs["b"]) == (r - 2, r - 1))


def score_cone(s: Value, nodes, producer, users, outputs) -> tuple[list[Node], Node] | None:
    """The nodes that compute the scores ``s`` inside a flash kernel, and the scores' matmul.

    The cone is every pointwise node that ``s`` depends on whose results are used only inside
    the cone (and are not results of the graph), plus the one ``q @ k.T`` matmul at its edge,
    of ``s``'s shape (that matmul may be a result: the backward saves the scores). Values at the
    cone's edge (parameters, views, other kernels' results) are read per tile. None when ``s``
    does not come from exactly one such matmul through pointwise work."""
    sink = producer.get(s)
    if sink is None:
        return None
    order = {n: i for i, n in enumerate(nodes)}
    inside: set[Node] = set()
    mm: list[Node] = []
    for n in sorted(_ancestors(sink, producer), key=order.__getitem__, reverse=True):
        if len(n.outputs) != 1 or (n is not sink and not all(u in inside for u in users.get(n.out, []))):
            continue
        if is_score_matmul(n, producer) and tuple(n.out.type.shape) == tuple(s.type.shape):
            mm.append(n)
            inside.add(n)
        elif (registry.get(n.op).kind is Kind.POINTWISE or n.op in VIEWS) and (n is sink or n.out not in outputs):
            inside.add(n)      # views are evaluated where used; they only let the cone see through
    if len(mm) != 1 or sink not in inside:
        return None
    return [n for n in nodes if n in inside and n is not mm[0] and n.op not in VIEWS], mm[0]


def _ancestors(n: Node, producer) -> set[Node]:
    """n and every node it depends on, stopping at matmuls (the scores' matmul is an edge)."""
    seen: set[Node] = set()
    stack = [n]
    while stack:
        x = stack.pop()
        if x in seen:
            continue
        seen.add(x)
        if x.op == "matmul":
            continue
        stack.extend(p for p in (producer.get(v) for v in x.inputs) if p is not None)
    return seen


def match_general(p_node: Node, nodes, producer, users, outputs):
    """softmax(s) @ v with s any pointwise function of q @ k.T: the pieces, or None."""
    o_node = _softmax_matmul(p_node, users, outputs)
    if o_node is None or p_node.out.type.rank < 2:
        return None
    s = p_node.inputs[0]
    if _single_use(s, users, outputs) is None or o_node.inputs[1].type.rank < 2:
        return None
    if score_cone(s, nodes, producer, users, outputs) is None:
        return None
    return dict(s=s, v=o_node.inputs[1], out=o_node, softmax=p_node)


def _simple_mask(m, producer) -> bool:
    """A mask the simple form reads as it is: none, causal(S, T), or a stored tensor (a
    parameter or a view of one); a mask computed from positions goes to the general form."""
    return m["mask"] is None or m["causal"] is not None or _is_stored(m["mask"], producer)


def _is_stored(v: Value, producer) -> bool:
    n = producer.get(v)
    while n is not None:
        if n.op not in VIEWS:
            return False
        n = producer.get(n.inputs[0])
    return True


def _lse(out: Value) -> Value:
    """The log-sum-exp result beside attention's output: one per query row, in the accumulator."""
    return Value(TensorType(accumulator(out.type.dtype), tuple(out.type.shape[:-1])), "lse")


def rewrite_flash_attention(g: Graph, ctx: PassContext | None = None) -> Graph:
    producer, users, outputs = g.producers(), g.users(), set(g.outputs)
    replace: dict[Node, Node] = {}      # the final matmul -> the fused node
    for n in g.nodes:
        m = match(n, producer, users, outputs)
        if m is None or not _simple_mask(m, producer):
            gm = match_general(n, g.nodes, producer, users, outputs)
            if gm is None:
                continue
            out = gm["out"].out
            replace[gm["out"]] = Node("flash_attention_mod", (gm["s"], gm["v"]), Attrs({}), (out, _lse(out)),
                                      gm["out"].span)
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
        replace[m["out"]] = Node("flash_attention", tuple(inputs), Attrs(attrs), (out, _lse(out)), m["out"].span)
    if not replace:
        return g
    nodes = [replace.get(n, n) for n in g.nodes]
    return g.replace(nodes=tuple(dead_code(nodes, g.outputs)))
