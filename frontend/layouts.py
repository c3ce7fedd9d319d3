"""Checking weight-layout annotations (DSL.md, "Layouts of weight parameters") and putting them
in canonical form: ``@quant(int4)`` becomes ``@quant(int4, group=128)`` and so on.

Only the annotation is checked here; whether the compiler implements a layout is decided at
compile time (passes/layouts.py), where an unimplemented one is a clear error.
"""
from __future__ import annotations

from ..ir.graph import Attrs, Layout
from ..ir.types import TensorType
from . import ast as A
from .diagnostics import SpecError, did_you_mean

KINDS = ("quant", "sparse", "lowrank", "auto")
QUANT_DTYPES = ("int8", "int4", "fp8")
ACT_DTYPES = ("int8", "fp8")          # @quant(q, act=q): both operands of the dot quantized
DEFAULT_INT4_GROUP = 128


def check_layout(decl: A.LayoutDecl, ptype, pname: str) -> Layout:
    kind = decl.kind.text
    if kind not in KINDS:
        raise SpecError(f"unknown layout '@{kind}'", decl.kind.span,
                        did_you_mean(kind, KINDS) or f"layouts are {', '.join('@' + k for k in KINDS)}")
    if not isinstance(ptype, TensorType):
        raise SpecError(f"a layout annotation on the scalar parameter '{pname}'", decl.span,
                        "layouts describe how a weight tensor is stored; scalars have none")
    if ptype.rank != 2:
        raise SpecError(f"layout @{kind} on '{pname}' of rank {ptype.rank}", decl.span,
                        "layouts apply to 2-D weights w: [N, K] used as x @ w.T")
    if not ptype.dtype.is_float:
        raise SpecError(f"layout @{kind} on '{pname}' of dtype {ptype.dtype}", decl.span,
                        "the spec describes the dense floating-point weight; the layout stores it compressed")
    pos = [a for a in decl.args if a.name is None]
    kw = {}
    for a in decl.args:
        if a.name is not None:
            if a.name.text in kw:
                raise SpecError(f"@{kind} gives '{a.name.text}' twice", a.span)
            kw[a.name.text] = a
    return CHECKS[kind](decl, pos, kw, ptype)


def _unknown_kw(decl, kw, allowed):
    for k, a in kw.items():
        if k not in allowed:
            raise SpecError(f"@{decl.kind.text} has no argument '{k}'", a.name.span,
                            did_you_mean(k, allowed) or f"its arguments are {', '.join(allowed) or 'none'}")


def _positive_int(a: A.LayoutArg, what: str) -> int:
    if not isinstance(a.value, int) or isinstance(a.value, bool) or a.value <= 0:
        raise SpecError(f"{what} must be a positive integer, got {_show(a.value)}", a.span)
    return a.value


def _fraction(a: A.LayoutArg, what: str) -> float:
    v = a.value
    if not isinstance(v, (int, float)) or isinstance(v, tuple) or not 0 < v < 1:
        raise SpecError(f"{what} must be a number between 0 and 1, got {_show(v)}", a.span,
                        "a relative error such as 0.01")
    return float(v)


def _show(v) -> str:
    return f"{v[0]}:{v[1]}" if isinstance(v, tuple) else str(v)


def _quant(decl, pos, kw, ptype) -> Layout:
    _unknown_kw(decl, kw, ("group", "act"))
    if len(pos) != 1:
        raise SpecError("@quant takes one storage type: int8, int4 or fp8", decl.span,
                        "for example @quant(int4, group=128)")
    q = pos[0].value
    if q not in QUANT_DTYPES:
        raise SpecError(f"@quant cannot store {_show(q)}", pos[0].span,
                        did_you_mean(str(q), QUANT_DTYPES) or "choose int8, int4 or fp8")
    out: dict = {}
    if "group" in kw:
        if q != "int4":
            raise SpecError(f"group= applies to @quant(int4), not {q}", kw["group"].span,
                            f"{q} keeps one scale per output row")
        out["group"] = _positive_int(kw["group"], "group")
    elif q == "int4":
        out["group"] = DEFAULT_INT4_GROUP
    if "act" in kw:
        act = kw["act"].value
        if q not in ACT_DTYPES or act != q:
            raise SpecError(f"@quant({_show(q)}, act={_show(act)}) is not supported", kw["act"].span,
                            "activations are quantized as the weight is: @quant(int8, act=int8) or "
                            "@quant(fp8, act=fp8)")
        out["act"] = act
    k = ptype.shape[1]
    if q == "int4" and isinstance(k, int):
        if k % 2:
            raise SpecError(f"@quant(int4) packs two values per byte along K, but K = {k} is odd",
                            decl.span, "pad the weight to an even K")
        if k % out["group"]:
            raise SpecError(f"@quant(int4, group={out['group']}) needs K = {k} to be a multiple of the group",
                            decl.span, f"choose a group that divides {k}")
    return Layout("quant", (q,), Attrs(out), decl.span)


def _sparse(decl, pos, kw, ptype) -> Layout:
    _unknown_kw(decl, kw, ("block",))
    if pos and "block" in kw or len(pos) > 1 or not pos and "block" not in kw:
        raise SpecError("@sparse takes either N:M (such as 2:4) or block=B", decl.span)
    if pos:
        r = pos[0].value
        if not isinstance(r, tuple):
            raise SpecError(f"@sparse expects a ratio N:M such as 2:4, got {_show(r)}", pos[0].span)
        n, m = r
        if (n, m) != (2, 4):
            raise SpecError(f"@sparse({n}:{m}) is not supported; only 2:4", pos[0].span,
                            "2:4 is the structured pattern GPUs accelerate")
        k = ptype.shape[1]
        if isinstance(k, int) and k % 4:
            raise SpecError(f"@sparse(2:4) needs K to be a multiple of 4, but K = {k}", decl.span)
        return Layout("sparse", ((2, 4),), Attrs(), decl.span)
    b = _positive_int(kw["block"], "block")
    if b & (b - 1) or b < 16:
        raise SpecError(f"@sparse(block={b}): the block must be a power of two of at least 16", kw["block"].span)
    return Layout("sparse", (), Attrs({"block": b}), decl.span)


def _lowrank(decl, pos, kw, ptype) -> Layout:
    _unknown_kw(decl, kw, ("rank", "tol"))
    if "rank" in kw and "tol" in kw:
        second = max(kw["rank"], kw["tol"], key=lambda a: (a.span.line, a.span.col))
        raise SpecError("@lowrank takes rank=R or tol=T, not both", second.span,
                        "for example @lowrank(rank=64) or @lowrank(tol=0.05)")
    if pos or len(kw) != 1:
        raise SpecError("@lowrank takes exactly one of rank=R or tol=T", pos[0].span if pos else decl.span,
                        "for example @lowrank(rank=64) or @lowrank(tol=0.05)")
    if "rank" in kw:
        r = _positive_int(kw["rank"], "rank")
        n, k = ptype.shape
        limit = min(d for d in (n, k) if isinstance(d, int)) if any(isinstance(d, int) for d in (n, k)) else None
        if limit is not None and r > limit:
            raise SpecError(f"@lowrank(rank={r}) is above min(N, K) = {limit}", kw["rank"].span)
        return Layout("lowrank", (), Attrs({"rank": r}), decl.span)
    return Layout("lowrank", (), Attrs({"tol": _fraction(kw["tol"], "tol")}), decl.span)


def _auto(decl, pos, kw, ptype) -> Layout:
    _unknown_kw(decl, kw, ("tol",))
    if pos or "tol" not in kw:
        raise SpecError("@auto takes tol=T, the relative output error allowed", decl.span,
                        "for example @auto(tol=0.01)")
    return Layout("auto", (), Attrs({"tol": _fraction(kw["tol"], "tol")}), decl.span)


CHECKS = {"quant": _quant, "sparse": _sparse, "lowrank": _lowrank, "auto": _auto}
