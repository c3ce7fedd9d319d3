"""Dtype-generic ops (``op f<T: f16 | bf16 | f32>(...)``): their variables, the dtypes each
admits, the parameter each is read from, and the name of each binding's graph.
"""
from __future__ import annotations

import itertools

from ..ir.graph import Generic
from ..ir.types import SPEC_DTYPES, DType
from . import ast as A
from .diagnostics import SpecError
from .build_text import check_not_keyword, parse_dtype

MAX_INSTANCES = 16


FLOAT_DTYPES = (DType.f16, DType.bf16, DType.f32)    # <T> alone: every float dtype a spec computes in


def generic_of(decl: A.OpDecl) -> Generic:
    """A dtype-generic op's variables, the dtypes each admits, its instances (one graph per
    binding, named op__f16 or op__f16_f32) and, per variable, the parameter it is read from."""
    names: list[str] = []
    admitted = []
    for tp in decl.type_params:
        check_not_keyword(tp.name, "a dtype variable")
        if tp.name.text in SPEC_DTYPES:
            raise SpecError(f"'{tp.name.text}' is a dtype; a dtype variable needs another name", tp.name.span,
                            "for example T")
        if tp.name.text in names:
            raise SpecError(f"dtype variable '{tp.name.text}' is declared twice", tp.name.span)
        dts = tuple(parse_dtype(d) for d in tp.dtypes) if tp.dtypes else FLOAT_DTYPES
        if len(set(dts)) != len(dts):
            raise SpecError(f"'{tp.name.text}' lists a dtype twice", tp.span)
        names.append(tp.name.text)
        admitted.append(dts)
    typed = []
    for v, tp in zip(names, decl.type_params):
        ps = tuple(p.name.text for p in decl.params if p.type.dims is not None and p.type.dtype.text == v)
        if not ps:
            raise SpecError(f"dtype variable '{v}' is not the dtype of any tensor parameter", tp.name.span,
                            f"it is bound from the arguments: give a parameter the type {v}[...]")
        typed.append(ps)
    combos = list(itertools.product(*admitted))
    if len(combos) > MAX_INSTANCES:
        raise SpecError(f"op '{decl.name.text}' has {len(combos)} dtype bindings, more than {MAX_INSTANCES}",
                        decl.type_params[0].span, "admit fewer dtypes per variable")
    instances = {c: f"{decl.name.text}__{'_'.join(str(d) for d in c)}" for c in combos}
    return Generic(decl.name.text, tuple(names), tuple(admitted), tuple(ps[0] for ps in typed), instances,
                   tuple(typed))
