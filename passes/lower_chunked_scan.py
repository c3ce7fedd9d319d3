"""Lowering a gated outer-product recurrence in chunks: GLA, simple GLA, linear attention.

Pipeline position: a second form of passes/lower_recurrence.py's kernel (group kind
``recurrence``), for scans of this form only (``outer_product_form``):

    h_next = a * h + k ⊗ v          h: [..., E, F]; a: [..., E or 1, 1]; k: [..., E, 1]; v: [..., 1, F]
    out    = f(sum(q * h_next, axis=E))     q: [..., E, 1]; f: pointwise work on the sum

with ``a`` written as ``exp(x)`` or ``sigmoid(x)`` (so that ``log a`` is exact: ``x``, or
``-softplus(-x)``), and ``a``, ``k``, ``v``, ``q`` free of the carry. The kernel runs C steps at
a time (C = BLOCK_C, a tunable), a program per leading index and tile of F columns, the state
``[E, BLOCK_F]`` on chip in f32 across chunks. Per chunk, with ``G`` the cumulative sum of
``log a`` over the chunk's steps (G <= 0 where every a <= 1):

    inter   = (q * exp(G)) @ S                                   [C, BLOCK_F]
    A[i, j] = sum_e q[i, e] k[j, e] exp(G[i, e] - G[j, e])       j <= i, else 0
    out     = inter + A @ v
    S       = exp(G_last) * S + (k * exp(G_last - G))^T @ v

Every exponent is a difference of cumulative log-gates taken in the order of the steps, so no
factor exceeds 1 whatever the gates' magnitude (log-gates of -20 per step included); the
intra-chunk term is the [C, C, BLOCK_EI] product over sub-blocks of E (the exponents cannot be
split into a product of a row and a column factor without overflowing). The per-step state is
never stored; the final state is. Steps past the end (the last chunk) read as zero (log a = 0,
k = v = 0), which leaves the state as it is.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir import registry
from ..ir.emit import Emitter
from ..ir.graph import Graph, Value
from ..ir.tile import Alternative, GridDim, TExpr, Tunable
from ..ir.tile_builder import TileBuilder
from ..ir.types import DType, TensorType
from .groups import FusedGraph, Group
from .lower_eval import Ctx, Evaluator, address, unflatten
from .lower_matmul import f32_precision

VIEWS = ("reshape", "expand", "cast")
# a step's log-decay below this counts as this (a factor of 9e-14, zero next to any update): it
# keeps -inf (a reset) from making -inf - -inf = NaN, and the cumulative sums within a chunk
# small enough that the small log-decays after a large one keep their digits
LOG_DECAY_MIN = -30.0
# (BLOCK_C, BLOCK_EI, BLOCK_F, num_warps, num_stages) the autotuner times
CHUNKED_PRESETS = ((16, 8, 16, 4, 1), (16, 8, 32, 4, 1), (16, 16, 32, 8, 1), (32, 8, 32, 8, 1), (16, 8, 64, 8, 1),
                   (32, 16, 64, 8, 1), (16, 8, 32, 4, 2), (32, 8, 32, 8, 2))


@dataclass(frozen=True)
class OuterProductForm:
    carry: Value
    log_a: Value          # a new body value: log of the decay, shape of a
    k: Value
    v: Value
    q: Value
    readout: Value        # sum(q * h_next, axis=E): [..., F]
    out: Value            # the step output (f(readout))
    body: Graph           # the body with the nodes of log_a added


def outer_product_form(node) -> OuterProductForm | str:
    """The form above, or the reason this scan does not have it."""
    a = node.attrs
    body: Graph = a["body"]
    if a["carries"] != 1:
        return "more than one carry"
    first = 1 if a["uses_index"] else 0
    h = body.params[first].value
    R = h.type.rank
    if R < 3:
        return "the carry has fewer than 3 axes ([..., E, F])"
    shape = tuple(h.type.shape)
    E, F = shape[-2], shape[-1]
    prod = body.producers()
    nxt = body.outputs[0]
    if len(body.outputs) != 2:
        return "not exactly one step output"
    depends = _dependents(body, h)

    def factors(v, op):
        n = prod.get(v)
        return tuple(n.inputs) if n is not None and n.op == op and len(n.inputs) == 2 else None
    terms = factors(nxt, "add")
    if terms is None:
        return "the next state is not a sum of two terms"
    decay = upd = None
    for t1, t2 in (terms, terms[::-1]):
        f = factors(t1, "mul")
        if f is not None and h in f:
            decay, upd = (f[1] if f[0] is h else f[0]), t2
    if decay is None:
        return "the next state is not a * h + b"
    if decay in depends or not _shaped(decay, R, (None, 1)) or decay.type.shape[-2] not in (1, E):
        return "the decay is not free of the state and constant along F"
    kv = factors(upd, "mul")
    if kv is None or upd in depends:
        return "the update is not a product k * v"
    k, v = kv
    if not _shaped(k, R, (E, 1)):
        k, v = v, k
    if not (_shaped(k, R, (E, 1)) and _shaped(v, R, (1, F))) or k in depends or v in depends:
        return "the update is not an outer product k[..., :, None] * v[..., None, :]"
    out = body.outputs[1]
    readout = _readout(body, prod, out, nxt, R)
    if readout is None:
        return "the step output is not f(sum(q * h_next, axis=E))"
    r, q = readout
    if q in depends:
        return "the readout's q depends on the state"
    # f: from the readout to the output, nothing else may read the state
    if out in _dependents(body, h, cut=r):
        return "the step output reads the state other than through the readout"
    emit = Emitter()
    la = _log_of(decay, prod, emit)
    if la is None:
        return "the decay is not written as exp(...) or sigmoid(...) (its log must be exact)"
    return OuterProductForm(h, la, k, v, q, r, out, body.replace(nodes=body.nodes + tuple(emit.nodes)))


def _dependents(body: Graph, h: Value, cut: Value | None = None) -> set:
    """The body values that depend on h (not through ``cut``)."""
    dep = {h}
    for n in body.nodes:
        if any(v in dep for v in n.inputs):
            dep.update(o for o in n.outputs if o is not cut)
    return dep


def _shaped(v: Value, R: int, last: tuple) -> bool:
    t = v.type
    return isinstance(t, TensorType) and t.rank == R and all(want is None or d == want
                                                            for d, want in zip(t.shape[-2:], last))


def _readout(body, prod, out, nxt, R):
    """(sum(q * h_next, axis=R-2), q) at the root of the output's pointwise chain."""
    todo, seen = [out], set()
    while todo:
        x = todo.pop()
        if x in seen:
            continue
        seen.add(x)
        n = prod.get(x)
        if n is None:
            continue
        if n.op == "sum" and tuple(n.attrs["axis"]) == (R - 2,) and not n.attrs["keepdim"]:
            m = prod.get(n.inputs[0])
            if m is not None and m.op == "mul" and nxt in m.inputs:
                q = m.inputs[1] if m.inputs[0] is nxt else m.inputs[0]
                if _shaped(q, R, (None, 1)):
                    return n.out, q
            return None
        if registry.get(n.op).kind is registry.Kind.POINTWISE or n.op in VIEWS:
            todo += [v for v in n.inputs if isinstance(v.type, TensorType)]
    return None


def _log_of(v: Value, prod, emit: Emitter) -> Value | None:
    """A value equal to log(v), built from v's producers: log(exp(x)) = x, log(sigmoid(x)) =
    -softplus(-x), through views and casts to f32."""
    n = prod.get(v)
    if n is None:
        return None
    if n.op == "exp":
        return emit("cast", [n.inputs[0]], {"dtype": DType.f32}, name="log_cast")
    if n.op == "sigmoid":
        x = emit("cast", [n.inputs[0]], {"dtype": DType.f32}, name="log_cast")
        return emit("neg", [emit("softplus", [emit("neg", [x], name="log_neg")], name="log_softplus")], name="log_neg")
    if n.op in ("reshape", "expand") or n.op == "cast" and n.out.type.dtype.is_float:
        inner = _log_of(n.inputs[0], prod, emit)
        if inner is None:
            return None
        return emit(n.op, [inner], dict(n.attrs) if n.op != "cast" else {"dtype": DType.f32}, name=f"log_{n.op}")
    return None


class ChunkedScan:
    """The kernel of one scan node in the form above (see the module's docstring)."""

    def __init__(self, fg: FusedGraph, group: Group, node, form: OuterProductForm, name: str):
        from ..ir.prims_scan import scan_layout
        self.fg, self.group, self.node, self.form = fg, group, node, form
        a = node.attrs
        carried, _, _ = scan_layout(a)
        self.init = node.inputs[0] if carried else None
        self.shape = tuple(form.carry.type.shape)
        self.b = TileBuilder(name)

    def kernel(self):
        b, a, form = self.b, self.node.attrs, self.form
        R = len(self.shape)
        lead, E, F = self.shape[:-2], self.shape[-2], self.shape[-1]
        tC = Tunable("BLOCK_C", (16, 32, 64), cpu=16)
        tE = Tunable("BLOCK_E", covers=E, lo=16, hi=256)
        tEI = Tunable("BLOCK_EI", (8, 16, 32), cpu=8)
        tF = Tunable("BLOCK_F", (16, 32, 64), cpu=16)
        for t in (tC, tE, tEI, tF):
            b.tunable(t)
        n_lead: object = 1
        for d in lead:
            n_lead = n_lead * d
        b.comment("program ids -> the leading index (heads, batch) and the state's column tile")
        pid = b.let(b.cast(b.program_id(0), DType.i64), "pid_lead")
        lidx = unflatten(b, pid, list(lead), "l")
        pid_f = b.let(b.program_id(1), "pid_f")
        cols = b.let(b.cast(b.add(b.mul(pid_f, b.tunable(tF)), b.expand_dims(b.arange(tF.name), 0)), DType.i64), "cols")
        col_ok = b.let(b.lt(cols, b.size(F)), "col_ok")
        e_cols = b.let(b.expand_dims(b.arange(tE.name), 0), "e_cols")          # [1, BLOCK_E]
        e_rows = b.let(b.expand_dims(b.arange(tE.name), 1), "e_rows")          # [BLOCK_E, 1]
        e_ok = b.let(b.lt(e_cols, b.size(E)), "e_ok")
        state_mask = b.let(b.and_(b.lt(e_rows, b.size(E)), col_ok), "state_mask")

        b.comment("the state [E, BLOCK_F] in f32, on chip across the chunks")
        state_idx = list(lidx) + [e_rows, cols]
        if self.init is not None:
            init = b.load(address(b, self.fg.names[self.init], self.init.type.dtype, state_idx, self.init.type.shape),
                          state_mask)
        else:
            init = b.full((tE.name, tF.name), a["fills"][0], DType.f32)
        S = b.declare(b.cast(b.broadcast_to(init, (tE.name, tF.name)), DType.f32), "state")

        length = a["length"]
        ar_c = b.let(b.expand_dims(b.arange(tC.name), 1), "chunk_rows")          # [BLOCK_C, 1]
        causal = b.let(b.binop("le", b.expand_dims(b.arange(tC.name), 0), ar_c), "causal")   # j <= i
        causal3 = b.let(b.expand_dims(causal, 2), "causal3")
        out_v = self.node.outputs[0]
        prec = f32_precision() if not self._narrow() else None
        with b.loop("c0", 0, b.size(length), b.tunable(tC)) as c0:
            rows = b.let(b.add(c0, ar_c), "rows")
            step_ok = b.let(b.lt(rows, b.size(length)), "step_ok")
            steps = b.sub(b.sub(b.size(length), 1), rows) if a["reverse"] else rows
            steps = b.let(b.cast(b.where(step_ok, steps, 0), DType.i64), "t")
            ev = self._evaluator(steps)
            ctx_e = Ctx(tuple(lidx) + (e_cols, None), b.and_(step_ok, e_ok))
            ctx_f = Ctx(tuple(lidx) + (None, cols), b.and_(step_ok, col_ok))
            m_e, m_f = ctx_e.mask, ctx_f.mask
            b.comment("within the chunk: A[i, j] = sum_e q[i, e] k[j, e] exp(G[i, e] - G[j, e]), j <= i, "
                      "over sub-blocks of E (first, so that the chunk's full tiles are not live across it)")
            A = b.declare(b.full((tC.name, tC.name, 1), 0.0, DType.f32), "A")
            with b.loop("e0", 0, b.size(E), b.tunable(tEI)) as e0:
                sub = b.let(b.add(e0, b.expand_dims(b.arange(tEI.name), 0)), "e_sub")
                ctx_s = Ctx(tuple(lidx) + (sub, None), b.and_(step_ok, b.lt(sub, b.size(E))))
                shp = (tC.name, tEI.name)
                Gs = b.let(b.cumsum(self._tile(ev, form.log_a, ctx_s, ctx_s.mask, shp), 0), "G_sub")
                qs = self._tile(ev, form.q, ctx_s, ctx_s.mask, shp)
                ks = self._tile(ev, form.k, ctx_s, ctx_s.mask, shp)
                diff = b.sub(b.expand_dims(Gs, 1), b.expand_dims(Gs, 0))        # [C, C, EI]
                decay = b.unary("exp", b.where(causal3, diff, float("-inf")))
                prod = b.mul(b.mul(b.expand_dims(qs, 1), b.expand_dims(ks, 0)), decay)
                b.assign(A, b.add(A, b.reduce(prod, 2, "sum")))
            A2 = b.let(b.reshape(A, (tC.name, tC.name)), "A2")
            b.comment("the chunk's values; its gates as G, the cumulative log-gates; the state before the "
                      "chunk read at each step's decay")
            v = b.let(self._tile(ev, form.v, ctx_f, m_f, (tC.name, tF.name)), "v")
            la = b.let(self._tile(ev, form.log_a, ctx_e, m_e, (tC.name, tE.name)), "log_a")
            G = b.let(b.cumsum(la, 0), "G")
            q = b.let(self._tile(ev, form.q, ctx_e, m_e, (tC.name, tE.name)), "q")
            inter = b.let(b.dot(self._op(b.mul(q, b.unary("exp", G)), state=True), self._op(S, state=True),
                                b.full((tC.name, tF.name), 0.0, DType.f32), prec), "inter")
            o = b.let(b.dot(self._op(A2), self._op(v), inter, prec), "o")
            b.comment("the step outputs: the readout's consumers on the chunk's rows")
            ctx_o = Ctx(tuple(lidx) + (cols,), ctx_f.mask)
            ev.bind(form.readout, ctx_o, o)
            if out_v in self.group.outputs:
                tile = ev(form.out, ctx_o)
                at = [steps] + list(lidx) + [cols]
                b.store(address(b, self.fg.buffer(self.group, out_v), out_v.type.dtype, at, out_v.type.shape),
                        tile, ctx_o.mask)
            b.comment("the state after the chunk")
            k = b.let(self._tile(ev, form.k, ctx_e, m_e, (tC.name, tE.name)), "k")
            g_last = b.let(b.reduce(la, 0, "sum"), "G_last")                    # [1, BLOCK_E]
            kd = b.mul(k, b.unary("exp", b.sub(g_last, G)))
            upd = b.dot(self._op(b.trans(kd)), self._op(v), b.full((tE.name, tF.name), 0.0, DType.f32), prec)
            b.assign(S, b.add(b.mul(S, b.trans(b.unary("exp", g_last))), upd))
        h_last = self.node.outputs[1]
        if h_last in self.group.outputs:
            b.comment("the final state")
            b.store(address(b, self.fg.buffer(self.group, h_last), h_last.type.dtype, state_idx, h_last.type.shape),
                    S, state_mask)
        return b.kernel([GridDim.of(n_lead), GridDim.of(F, tF.name)],
                        doc=f"{self.group.name} (scan, chunked): BLOCK_C steps at a time, the state [E, BLOCK_F] "
                            f"on chip, the decays' exponents taken within the chunk",
                        warps=(4, 8), stages=(1, 2), family="recurrence_chunked",
                        presets=tuple(((("BLOCK_C", c), ("BLOCK_EI", ei), ("BLOCK_F", f)), w, st)
                                      for c, ei, f, w, st in CHUNKED_PRESETS))

    def _op(self, t: TExpr, state: bool = False) -> TExpr:
        """A dot operand in the inputs' dtype where that is f16 or bf16 (tensor cores, f32
        accumulation, as flash-linear-attention's kernels do), else f32. The state's product
        is in bf16 for f16 inputs too: the state grows with the sequence (f16 tops at 65504)."""
        if not self._narrow():
            return t
        return self.b.cast(t, DType.bf16 if state else self.form.q.type.dtype)

    def _narrow(self) -> bool:
        return self.form.q.type.dtype in (DType.f16, DType.bf16)

    def _tile(self, ev, v: Value, ctx: Ctx, mask, shape) -> TExpr:
        b = self.b
        t = ev(v, ctx)
        t = b.broadcast_to(b.cast(t, DType.f32), shape)
        if v is self.form.log_a:
            t = b.maximum(t, LOG_DECAY_MIN)
        return b.where(mask, t, 0.0)

    def _evaluator(self, steps: TExpr) -> Evaluator:
        from .lower_recurrence import body_evaluator
        return body_evaluator(self.b, self.fg, self.group, self.node, self.form.body, steps,
                              "is read other than through the readout (the chunked form)")


def chunked_alternative(fg: FusedGraph, group: Group, node, name: str, guard) -> Alternative | None:
    """The chunked kernel as an alternative of the recurrence group, or None where the scan
    does not have the form."""
    form = outer_product_form(node)
    if isinstance(form, str):
        return None
    return Alternative((ChunkedScan(fg, group, node, form, name).kernel(),), guard)
