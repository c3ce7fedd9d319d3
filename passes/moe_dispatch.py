"""Pass: mixture-of-experts dispatch.

Pipeline position: after canonicalisation, before fusion (beside the flash rewrite).
Two rewrites, each "this shape of graph becomes that":
- router: ``topk(cast?(x @ w.T), k)`` (and a softmax of the chosen logits, if that is their only
  use) becomes one ``moe_router`` node: the logits of a token never leave registers;
- dispatch: the expert_matmul nodes that share an index tensor get one ``moe_align`` (the
  slots t*k+j sorted by expert, padded per expert to the GEMM's row block) and become
  ``expert_gemm`` nodes: grouped GEMMs over each expert's contiguous slots, gathering token
  rows in their loads and scattering results in their stores (no per-expert copies).
Fusion then gives the expert GEMMs their epilogues (silu * up, the gated combine).
"""
from __future__ import annotations

from ..ir.graph import Attrs, Graph, Node, Value
from ..ir.types import DType
from .canonicalize import dead_code
from .context import PassContext

ROUTER_MAX_K = 32


def _only_use(v: Value, users, outputs) -> Node | None:
    us = users.get(v, [])
    return us[0] if len(us) == 1 and v not in outputs else None


def rewrite_router(g: Graph, ctx: PassContext | None = None) -> Graph:
    producer, users, outputs = g.producers(), g.users(), set(g.outputs)
    replace: dict[Node, Node] = {}
    remap: dict[Value, Value] = {}
    drop: set[Node] = set()
    for tk in g.nodes:
        if tk.op != "topk" or tk.attrs["axis"] != tk.inputs[0].type.rank - 1 or tk.attrs["k"] > ROUTER_MAX_K:
            continue
        x = tk.inputs[0]
        n = producer.get(x)
        out_dtype = x.type.dtype
        if n is not None and n.op == "cast" and _only_use(x, users, outputs):
            x, n = n.inputs[0], producer.get(n.inputs[0])
        if n is None or n.op != "matmul" or _only_use(x, users, outputs) is None:
            continue
        a, wt = n.inputs
        tn = producer.get(wt)
        if a.type.rank != 2 or tn is None or tn.op != "transpose" or tn.inputs[0].type.rank != 2:
            continue
        if not out_dtype.is_float:
            continue
        values, indices = tk.outputs
        sm = _only_use(values, users, outputs)
        softmax = sm is not None and sm.op == "softmax" and sm.attrs["axis"] == 1
        outs = (sm.out if softmax else values, indices)
        node = Node("moe_router", (a, tn.inputs[0]),
                    Attrs({"k": tk.attrs["k"], "dtype": out_dtype, "softmax": softmax}),
                    outs, tk.span)
        replace[sm if softmax else tk] = node
        if softmax:
            drop.add(tk)
    if not replace:
        return g
    nodes = [replace.get(n, n) for n in g.nodes if n not in drop]
    return g.replace(nodes=tuple(dead_code(nodes, g.outputs)), outputs=tuple(remap.get(v, v) for v in g.outputs))


def rewrite_expert_dispatch(g: Graph, ctx: PassContext | None = None) -> Graph:
    by_idx: dict[Value, list[Node]] = {}
    for n in g.nodes:
        if n.op == "expert_matmul":
            by_idx.setdefault(n.inputs[2], []).append(n)
    if not by_idx:
        return g
    first = {nodes[0]: idx for idx, nodes in by_idx.items()}
    align_of: dict[Value, tuple[Value, Value, Value]] = {}
    out: list[Node] = []
    for n in g.nodes:
        if n in first:
            idx = first[n]
            experts = n.inputs[1].type.shape[0]
            t, k = idx.type.shape
            from ..ir.prims_fused import MOE_BLOCK_MAX
            vals = (Value(_i32((t * k + MOE_BLOCK_MAX * experts,)), "sorted_slots"),
                    Value(_i32((t * k + experts,)), "block_expert"), Value(_i32((1,)), "num_blocks"))
            out.append(Node("moe_align", (idx,), Attrs({"experts": experts}), vals, n.span))
            align_of[idx] = vals
        if n.op == "expert_matmul":
            x, w, idx = n.inputs
            out.append(Node("expert_gemm", (x, w, idx) + align_of[idx], n.attrs, n.outputs, n.span))
        else:
            out.append(n)
    return g.replace(nodes=tuple(out))


def _i32(shape):
    from ..ir.types import TensorType
    return TensorType(DType.i32, tuple(shape))
