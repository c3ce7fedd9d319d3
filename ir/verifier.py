"""The level-1 verifier: SSA discipline, operand counts, and every node's recorded output types
re-derived from its primitive's rule. Runs after every pass when checks are on (always in tests:
``OPFORGE_CHECKS=1`` or ``PassContext(verify=True)``)."""
from __future__ import annotations

from .graph import Graph
from .registry import REGISTRY, Kind, RuleError, get


class VerifyError(AssertionError):
    pass


def verify(g: Graph) -> Graph:
    defined = set(p.value for p in g.params)
    if len(defined) != len(g.params):
        raise VerifyError(f"{g.name}: a parameter value is shared")
    for i, n in enumerate(g.nodes):
        where = f"{g.name}: node {i} ({n.op})"
        if n.op not in REGISTRY:
            get(n.op)  # loads the registry on first use
        prim = REGISTRY.get(n.op)
        if prim is None:
            raise VerifyError(f"{where}: unknown primitive")
        for v in n.inputs:
            if v not in defined:
                raise VerifyError(f"{where}: operand {v} is used before it is defined")
        for v in n.outputs:
            if v in defined:
                raise VerifyError(f"{where}: {v} is defined twice")
            defined.add(v)
        if prim.kind is Kind.RECURRENCE:
            verify(n.attrs["body"])
        if len(n.outputs) != prim.n_outputs and prim.kind not in (Kind.CALL, Kind.RECURRENCE):
            raise VerifyError(f"{where}: {len(n.outputs)} outputs, the primitive has {prim.n_outputs}")
        if prim.kind is Kind.CALL:
            continue
        operand_args = [a for a in prim.args if a.is_operand]
        if operand_args and not any(a.kind == "tensors" for a in operand_args) \
                and len(n.inputs) != len(operand_args):
            raise VerifyError(f"{where}: {len(n.inputs)} operands, expected {len(operand_args)}")
        try:
            types, attrs = prim.run_infer([v.type for v in n.inputs], dict(n.attrs))
        except RuleError as e:
            raise VerifyError(f"{where}: rule fails: {e.message}") from None
        got = [v.type for v in n.outputs]
        if types != got:
            raise VerifyError(f"{where}: outputs typed {[str(t) for t in got]}, rule gives {[str(t) for t in types]}")
    for v in g.outputs:
        if v not in defined:
            raise VerifyError(f"{g.name}: result {v} is never defined")
    if [v.type for v in g.outputs] != list(g.result_types):
        raise VerifyError(f"{g.name}: results typed {[str(v.type) for v in g.outputs]}, "
                          f"declared {[str(t) for t in g.result_types]}")
    return g
