"""Pass: partition a canonical graph into fusion groups (``opforge show --stage fused``).

Every join that is valid is then put to the cost model (passes/cost.py): it must save bytes,
and the group must stay within the register budget (distinct full tiles loaded plus
accumulators, PassContext.max_live_tiles) and the shared-memory budget of its GEMM operand
tiles (max_shared_bytes). Operand prologues are costed by the bytes their whole chain reads.

Pipeline position: after canonicalisation (and layouts/pattern rewrites); before lowering.

Nodes fall in three classes:
- host: scalar-only nodes (literals, symbolic sizes, arithmetic of those), evaluated on the host
  and passed to kernels as arguments;
- glue: views (reshape, permute, transpose, slice, expand), concat, gather_rows and causal
  masks. Glue is never stored: every group that needs it recomputes it as index arithmetic on
  its loads, so a view costs nothing and a concat of computed values stays in registers;
- compute: everything else. Each compute node belongs to exactly one group.

Grouping is consumer-first (reverse topological order): a pointwise or reduction node joins the
row group of its consumers when all its consumers are in that one group, its result need not
be stored at a shape the group cannot index, the group stays acyclic, and the reductions in the
group agree on their domain. Contractions, top-k, scans and expert matmuls are one group each
here; passes/fuse_contractions.py extends this in the fusion issue.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..ir import registry
from ..ir.dims import format_shape
from ..ir.graph import Graph, Node, Value
from ..ir.registry import Kind
from ..ir.types import TensorType
from .context import PassContext
from .cost import join_saves_bytes, resources
from .flash_attention import score_cone
from .groups import (CANONICAL_GLUE, GLUE_OPS, JOINS_CONSUMERS, MATMULS, OWN_GROUP, ROW_REDUCTIONS,  # noqa: F401
                     FusedGraph, Group, is_unit_reshape, node_class, recomputed_casts)

if TYPE_CHECKING:
    import networkx as nx

def is_row_node(n: Node) -> bool:
    prim = registry.get(n.op)
    return prim.kind is Kind.POINTWISE or n.op in ROW_REDUCTIONS


def reduction_domain(n: Node) -> tuple[tuple, tuple[int, ...]]:
    x = n.inputs[0].type.shape
    axes = n.attrs["axis"]
    return tuple(x), (axes,) if isinstance(axes, int) else tuple(axes)


def reduced_shapes(domain, axes) -> set[tuple]:
    keep = tuple(1 if i in axes else d for i, d in enumerate(domain))
    drop = tuple(d for i, d in enumerate(domain) if i not in axes)
    return {keep, drop}


class Partitioner:
    """Consumer-first grouping with explicit group kinds: ``row`` (pointwise and reductions),
    ``matmul`` (one or more matmuls sharing the A operand, with pointwise prologues and
    epilogues), and the kinds that are one node each (top-k, scans, expert matmuls)."""

    def __init__(self, g: Graph, ctx: PassContext | None = None, alone: frozenset = frozenset()):
        self.g = g
        self.ctx = ctx or PassContext()
        self.alone = alone                       # nodes that start a group of their own
        self.producer: dict[Value, Node] = g.producers()
        self.users: dict[Value, list[Node]] = g.users()
        self.outputs = set(g.outputs)
        self.recompute = recomputed_casts(g)
        self.compute = [n for n in g.nodes if self.cls(n) == "compute"]
        self.group_of: dict[Node, int] = {}
        self.members: list[list[Node]] = []
        self.kind: list[str] = []
        self.dom: list[tuple | None] = []        # per group: (domain, axes) or None
        self.prologue: set[Node] = set()         # nodes computing a matmul operand in their group
        self.dag = self._compute_dag()
        self.cone: dict[Node, Node] = {}         # score-cone node -> its flash_attention_mod
        for n in g.nodes:
            if n.op == "flash_attention_mod":
                found = score_cone(n.inputs[0], g.nodes, self.producer, self.users, self.outputs)
                for m in (found[0] + [found[1]]) if found else ():
                    self.cone[m] = n

    def cls(self, n: Node) -> str:
        return node_class(n, self.recompute)

    # compute node -> compute nodes it feeds, through any chain of glue
    def _compute_dag(self) -> nx.DiGraph:
        import networkx as nx      # here, not at import: a compile from stored plans never fuses
        dag = nx.DiGraph()
        dag.add_nodes_from(self.compute)
        for n in self.compute:
            for c, _ in self.consumers(n):
                dag.add_edge(n, c)
        return dag

    def consumers(self, n: Node) -> list[tuple[Node, tuple[Node, ...]]]:
        """(compute consumer, glue path) pairs for the outputs of n."""
        out = []
        stack = [(v, ()) for v in n.outputs]
        while stack:
            v, path = stack.pop()
            for u in self.users.get(v, []):
                cls = self.cls(u)
                if cls == "glue":
                    stack.extend((w, path + (u,)) for w in u.outputs)
                elif cls == "compute":
                    out.append((u, path))
        return out

    def glue_outputs(self, n: Node) -> bool:
        """Is a view of n's result a graph output (so n's result is reached through glue there)?"""
        stack = list(n.outputs)
        while stack:
            v = stack.pop()
            for u in self.users.get(v, []):
                if self.cls(u) == "glue":
                    if any(w in self.outputs for w in u.outputs):
                        return True
                    stack.extend(u.outputs)
        return False

    def run(self) -> list[list[Node]]:
        for n in reversed(self.compute):
            gid = self.try_join(n)
            if gid is None:
                gid = len(self.members)
                self.members.append([])
                self.kind.append(OWN_GROUP.get(n.op, "row"))
                self.dom.append(self.root_domain(n))
            self.members[gid].append(n)
            self.group_of[n] = gid
        return self.members

    def root_domain(self, n: Node):
        if n.op in JOINS_CONSUMERS and n.op != "expert_gemm":
            return (tuple(n.out.type.shape), ())
        if n.op in OWN_GROUP:
            return None
        if n.op in ROW_REDUCTIONS:
            return reduction_domain(n)
        return (tuple(n.out.type.shape), ())

    # -- joining -------------------------------------------------------------------------------
    def try_join(self, n: Node) -> int | None:
        """The consumer group n joins, or None. With consumers in several groups, n may join
        one of them if its result can be stored there for the others to read. The scores'
        matmul and the pointwise work of a flash kernel's score cone join that kernel."""
        f = self.cone.get(n)
        if f is not None and f in self.group_of and n not in self.alone:
            return self.group_of[f]
        if n in self.alone or (n.op in OWN_GROUP and n.op not in JOINS_CONSUMERS):
            return None
        if n.op not in JOINS_CONSUMERS and not is_row_node(n):
            return None
        cons = self.consumers(n)
        if not cons or self.glue_outputs(n):
            return None
        gids = {self.group_of.get(c) for c, _ in cons}
        if None in gids:
            return None
        if len(gids) > 1:
            # joining one of several consumers' groups (and storing the result for the others)
            # pays only into a row group, and never when the node could be the epilogue of the
            # contraction that produces it (a residual add after a projection)
            if any(self.producer_is_contraction(n)):
                return None
            gids = {g for g in gids if self.kind[g] == "row"}
        for gid in sorted(gids):
            here = [(c, p) for c, p in cons if self.group_of[c] == gid]
            if self.fits(n, gid, here, stored=len(gids) > 1 or n.out in self.outputs):
                if n.op in JOINS_CONSUMERS:
                    self.kind[gid] = OWN_GROUP[n.op]
                elif n.op in ROW_REDUCTIONS and not self.dom[gid][1]:
                    self.dom[gid] = reduction_domain(n)
                return gid
        return None

    def compute_sources(self, values):
        """The (value, compute node) pairs that values are read from, through glue."""
        stack = list(values)
        while stack:
            x = stack.pop()
            p = self.producer.get(x)
            if p is None:
                continue
            if self.cls(p) == "glue":
                stack.extend(p.inputs)
            elif self.cls(p) == "compute":
                yield x, p

    def producer_is_contraction(self, n: Node):
        return (p.op in JOINS_CONSUMERS for _, p in self.compute_sources(n.inputs))

    def fits(self, n: Node, gid: int, cons, stored: bool) -> bool:
        if self.dom[gid] is None:
            return False
        paths = [p for _, p in cons]
        plain = all(all(u.op in CANONICAL_GLUE or is_unit_reshape(u) for u in p) for p in paths)
        if stored and not self.storable(n, gid, plain):
            return False
        if n.op in MATMULS:
            ok = self.ctx.fuse_contractions and self.join_matmul(n, gid, plain)
        elif n.op in ("bsr_matmul", "lowrank_matmul"):
            ok = self.ctx.fuse_contractions and self.join_matmul(n, gid, plain) and \
                not any(m.op in JOINS_CONSUMERS for m in self.members[gid])
        elif n.op == "expert_gemm":
            ok = self.ctx.fuse_contractions and not stored and self.join_expert(n, gid, plain)
        elif self.kind[gid] in ("matmul", "moe", "bsr", "lowrank"):
            ok = self.ctx.fuse_contractions and self.join_around_matmul(n, gid, cons, plain)
        else:
            ok = self.join_row(n, gid, paths, plain)
        return ok and not self.creates_cycle(n, gid) and len(self.members[gid]) < self.ctx.max_group_nodes \
            and self.worth_it(n, gid, stored)

    def worth_it(self, n: Node, gid: int, stored: bool) -> bool:
        """The cost model's verdict on a join that is valid: it must save bytes (a node whose
        result is stored anyway saves only its inputs' round trip), and the group must stay
        within the register and shared-memory budgets of passes/cost.py."""
        if not join_saves_bytes(n, stored, self.producer):
            return False
        res = resources(self.members[gid] + [n], self.producer, self.recompute)
        return res.fits(self.ctx)

    def storable(self, n: Node, gid: int, plain: bool) -> bool:
        """Can the group write n's result at its canonical indices?"""
        if not plain:
            return False
        domain, axes = self.dom[gid]
        if n.op in ROW_REDUCTIONS and not axes:
            domain, axes = reduction_domain(n)
        shape = tuple(n.out.type.shape)
        if not axes and domain:
            axes = (len(domain) - 1,)    # a pointwise group can write per-row values too
        return shape == tuple(domain) or shape in reduced_shapes(domain, axes)

    def join_row(self, n: Node, gid: int, paths, plain: bool) -> bool:
        domain, axes = self.dom[gid]
        out_shape = tuple(n.out.type.shape)
        reduces = n.op in ROW_REDUCTIONS
        if reduces:
            nd, na = reduction_domain(n)
            if axes and (nd, na) != (domain, axes):
                return False
            if not axes and not self.pointwise_group_fits(gid, nd, na):
                return False
            if not plain:
                return False   # a view of a reduced value would need non-canonical indices
        elif axes and not plain:
            return False       # a reduction pulled in later would be upstream of a real view
        if n.out in self.outputs:
            # its result is stored by this group, at the group's canonical indices
            d, a = reduction_domain(n) if reduces and not axes else (domain, axes)
            if not plain or (out_shape != tuple(d) and out_shape not in reduced_shapes(d, a)):
                return False
        return True

    def join_matmul(self, n: Node, gid: int, plain: bool) -> bool:
        """A matmul takes a pure pointwise consumer group as its epilogue, or joins a matmul
        group whose matmuls read the same A operand (one pass over A for both: x @ wg.T and
        x @ wu.T of a gated MLP)."""
        domain, axes = self.dom[gid]
        if axes or not plain or tuple(n.out.type.shape) != tuple(domain):
            return False
        mms = [m for m in self.members[gid] if m.op in MATMULS]
        if not mms:
            return True
        if any(m.op != n.op for m in mms):
            return False
        if len(mms) >= MAX_SHARED_A:
            return False
        return all(m.inputs[0] is n.inputs[0] and m.inputs[1].type.shape == n.inputs[1].type.shape
                   and m.out.type == n.out.type for m in mms)

    def join_expert(self, n: Node, gid: int, plain: bool) -> bool:
        """An expert GEMM takes a pointwise consumer group as its epilogue, optionally ending
        in the sum over the k choices (the gated combine: a scatter-add per token); or joins
        expert GEMMs with the same tokens and routing (gate and up projections)."""
        domain, axes = self.dom[gid]
        if not plain or tuple(n.out.type.shape) != tuple(domain):
            return False
        if axes:
            if axes != (1,):
                return False
            reductions = [m for m in self.members[gid] if m.op in ROW_REDUCTIONS]
            if len(reductions) != 1 or reductions[0].op != "sum" or any(
                    self.is_upstream(r, m) for r in reductions for m in self.members[gid] if m is not r):
                return False
        gemms = [m for m in self.members[gid] if m.op == "expert_gemm"]
        if self.kind[gid] == "moe":
            return len(gemms) < MAX_SHARED_A and all(
                m.inputs[0] is n.inputs[0] and m.inputs[2] is n.inputs[2] and m.out.type == n.out.type for m in gemms)
        return self.kind[gid] == "row"

    def is_upstream(self, a: Node, b: Node) -> bool:
        import networkx as nx
        return nx.has_path(self.dag, a, b)

    def join_around_matmul(self, n: Node, gid: int, cons, plain: bool) -> bool:
        """A pointwise node joins a matmul group as part of the epilogue (computed on the output
        tile) or as a prologue of an operand (recomputed for every tile that loads it), the
        latter only when it reads no more bytes than the operand it makes (a cast, a
        dequantisation, a scale by a vector), never a reduction."""
        if n.op in ROW_REDUCTIONS:
            return False
        domain, _ = self.dom[gid]
        feeds_operand = any(c in self.prologue or (c.op in JOINS_CONSUMERS and any(
            self.reaches(n, v) for v in c.inputs)) for c, _ in cons)
        if feeds_operand and self.kind[gid] == "moe":
            return False       # expert GEMM operands are gathered rows: no prologues
        if not feeds_operand:
            if n.out in self.outputs and (not plain or tuple(n.out.type.shape) != tuple(domain)):
                return False
            return True
        if n.out in self.outputs or not prologue_is_cheap(n, self.producer, self.recompute):
            return False
        self.prologue.add(n)
        return True

    def reaches(self, n: Node, v: Value) -> bool:
        """Does n's output reach value v through glue only?"""
        stack = list(n.outputs)
        while stack:
            x = stack.pop()
            if x is v:
                return True
            for u in self.users.get(x, []):
                if self.cls(u) == "glue":
                    stack.extend(u.outputs)
        return False

    def pointwise_group_fits(self, gid: int, nd: tuple, na: tuple) -> bool:
        """A pointwise group takes a reduction when its stored values fit the new domain."""
        ok = {tuple(nd)} | reduced_shapes(nd, na)
        for m in self.members[gid]:
            for v in m.outputs:
                if v in self.outputs and tuple(v.type.shape) not in ok:
                    return False
        root = self.members[gid][0]
        return tuple(root.out.type.shape) in ok

    def creates_cycle(self, n: Node, gid: int) -> bool:
        """With n in the group, would some path leave the group and come back into it?
        (Walk the nodes outside the group reachable from it; none may feed the group.)"""
        members = set(self.members[gid]) | {n}
        seen: set[Node] = set()
        stack = [y for m in members for y in self.dag.successors(m) if y not in members]
        while stack:
            x = stack.pop()
            if x in seen:
                continue
            seen.add(x)
            for y in self.dag.successors(x):
                if y in members:
                    return True
                stack.append(y)
        return False

MAX_SHARED_A = 3


def prologue_is_cheap(n: Node, producer: dict, recompute: frozenset = frozenset()) -> bool:
    """Operand prologues are recomputed for every tile that loads them, so the whole pointwise
    chain behind an operand may read no more bytes than the operand itself: the tensors it
    reads at the operand's full size count (their dtype's bytes), broadcast or packed smaller
    ones do not (a dequantising cast of int8 passes, silu(a) * b of two activations does not)."""
    out = n.out.type
    want = sorted(map(str, out.shape))
    total = 0
    seen: set = set()
    stack = [v for v in n.inputs if isinstance(v.type, TensorType)]
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        p = producer.get(v)
        if p is not None and node_class(p, recompute) == "glue":
            stack.extend(x for x in p.inputs if isinstance(x.type, TensorType))
            continue
        if p is not None and node_class(p, recompute) == "compute" and is_row_node(p) and p.op not in ROW_REDUCTIONS:
            stack.extend(x for x in p.inputs if isinstance(x.type, TensorType))
            continue
        if sorted(map(str, v.type.shape)) == want:
            total += v.type.dtype.itemsize
    return total <= out.dtype.itemsize


def _name_values(g: Graph, groups) -> dict:
    names: dict[Value, str] = {}
    used: set[str] = set()

    def name(v: Value, hint: str) -> None:
        if v in names:
            return
        base = hint or "t"
        s = base
        k = 1
        while s in used:
            s = f"{base}_{k}"
            k += 1
        used.add(s)
        names[v] = s

    for p in g.params:
        name(p.value, p.name)
    for n in g.nodes:
        if node_class(n) == "host" and n.op != "const":
            for v in n.outputs:
                hint = v.name or (f"{n.op}_{n.attrs['size']}" if n.op == "dim" else n.op)
                name(v, hint)
    for grp in groups:
        for v in grp.outputs:
            name(v, v.name or f"{grp.name}_out")
    return names


def fuse(g: Graph, ctx: PassContext | None = None, alone: frozenset = frozenset()) -> FusedGraph:
    """``alone``: nodes that must not join their consumers' group (passes/plan.py sets them
    when a group as formed could not be lowered)."""
    import networkx as nx
    order = {n: i for i, n in enumerate(g.nodes)}
    while True:
        part = Partitioner(g, ctx, alone)
        members = part.run()
        # execution order: a topological order of the groups (a group may store values that
        # groups ending earlier in the graph read), ties broken by the graph's own order
        gdag = nx.DiGraph()
        gdag.add_nodes_from(range(len(members)))
        for a, b in part.dag.edges:
            ga, gb = part.group_of[a], part.group_of[b]
            if ga != gb:
                gdag.add_edge(ga, gb)
        last = {i: max(order[n] for n in members[i]) for i in range(len(members))}
        try:
            gids = list(nx.lexicographical_topological_sort(gdag, key=lambda i: last[i]))
            break
        except nx.NetworkXUnfeasible:
            # groups that feed each other (a join the cycle check let through): split one
            cycle = nx.find_cycle(gdag)
            alone = alone | {last_joined(next(members[a] for a, _ in cycle if len(members[a]) > 1), order)}
    graph_out = set(g.outputs)
    # results reached only through glue (a view of a computed value) are copied from a stored
    # value: the compute values behind them must be stored
    owned_out = {v for ms in members for n in ms for v in n.outputs}
    needed_by_copies = {x for x, _ in part.compute_sources(v for v in g.outputs if v not in owned_out)}
    groups = []
    for k, gid in enumerate(gids):
        nodes = tuple(sorted(members[gid], key=order.get))
        inside = set(nodes)
        stored = []
        for n in nodes:
            for v in n.outputs:
                if v in graph_out or v in needed_by_copies or _used_outside(part, v, inside):
                    stored.append(v)
        root = nodes[-1]
        kind = part.kind[gid]
        dom = part.dom[gid]
        domain, axes = dom if dom is not None else ((), ())
        label = "_".join(dict.fromkeys(n.op for n in nodes if n.op in MATMULS)) if kind == "matmul" else root.op
        extra = {}
        if kind == "moe" and axes:
            # the sum over the k choices becomes a scatter-add into a zeroed output
            extra["zeroed"] = tuple(n.out for n in nodes if n.op == "sum")
        if kind == "scatter":
            extra["zeroed"] = tuple(n.out for n in nodes)
        groups.append(Group(f"k{k}_{label}", kind, nodes, tuple(stored), tuple(domain), tuple(axes), extra))
    # a result slot whose value no group stores as itself (a parameter, a view, a repeat)
    # gets a copy group with a buffer of its own
    names = _name_values(g, groups)
    owned = {v for grp in groups for v in grp.outputs}
    used: set[Value] = set()
    results = []
    for i, v in enumerate(g.outputs):
        if v in owned and v not in used:
            used.add(v)
            results.append(names[v])
            continue
        buf = _unique(f"out{i}", set(names.values()) | set(results))
        groups.append(Group(f"k{len(groups)}_copy", "copy", (), (v,), tuple(v.type.shape), (), {"buffer": buf}))
        results.append(buf)
    host = tuple(n for n in g.nodes if node_class(n) == "host")
    return FusedGraph(g, tuple(groups), host, names, tuple(results), part.recompute)


def last_joined(members, order) -> Node:
    """The member of a group that joined it last: groups grow from their root towards their
    producers, so it is the member earliest in the graph (the root excepted)."""
    root = members[0]
    return min((n for n in members if n is not root), key=order.get)


def _unique(base: str, taken: set[str]) -> str:
    s, k = base, 1
    while s in taken:
        s, k = f"{base}_{k}", k + 1
    return s


def _used_outside(part: Partitioner, v: Value, inside: set) -> bool:
    stack = [v]
    while stack:
        x = stack.pop()
        for u in part.users.get(x, []):
            cls = part.cls(u)
            if cls == "glue":
                stack.extend(u.outputs)
            elif cls == "compute" and u not in inside:
                return True
    return False


# -- printing (opforge show --stage fused) ------------------------------------------------------
def print_fused(fg: FusedGraph) -> str:
    from ..ir.printer import Namer, format_attrs
    name = Namer()
    for p in fg.graph.params:
        name(p.value)
    lines = [f"fused {fg.graph.name}: {len(fg.groups)} kernel(s)"]
    if fg.host:
        lines.append("  host scalars:")
        for n in fg.host:
            outs = ", ".join(f"{name(v)}: {v.type}" for v in n.outputs)
            lines.append(f"    {outs} = {n.op}({', '.join(name(v) for v in n.inputs)}){format_attrs(n.attrs)}")
    for grp in fg.groups:
        head = f"  group {grp.name} [{grp.kind}]"
        if grp.kind in ("row", "copy"):
            head += f" domain {format_shape(grp.domain)}"
            if grp.axes:
                head += f" reduce axes {list(grp.axes)}"
        lines.append(head)
        for n in grp.nodes:
            outs = ", ".join(f"{name(v)}: {v.type}" for v in n.outputs)
            lines.append(f"    {outs} = {n.op}({', '.join(name(v) for v in n.inputs)}){format_attrs(n.attrs)}")
        lines.append(f"    stores {', '.join(f'{name(v)} -> {fg.buffer(grp, v)}' for v in grp.outputs)}")
        if grp.nodes:
            lines.append(f"    on chip: {resources(list(grp.nodes), fg.graph.producers(), fg.recompute)}")
    return "\n".join(lines)

