"""The pass pipeline, in one visible list per level.

GRAPH_PASSES turn the front end's graphs into the canonical graph that layouts, fusion and
lowering work on. With checks on (tests, OPFORGE_CHECKS=1) the verifier runs after every pass.
"""
from __future__ import annotations

from ..ir.graph import Graph, Program, collector_paused
from ..ir.verifier import verify
from .canonicalize import canonicalize
from .context import PassContext
from .flash_attention import rewrite_flash_attention
from .inline import inline
from .layouts import check_layout_uses
from .moe_dispatch import rewrite_expert_dispatch, rewrite_router

GRAPH_PASSES = [inline, canonicalize, check_layout_uses]
# pattern rewrites that choose specialised kernels; after them the graph goes to fusion
REWRITE_PASSES = [rewrite_flash_attention, rewrite_router, rewrite_expert_dispatch]


def run_passes(g: Graph, passes, ctx: PassContext) -> Graph:
    with collector_paused():
        if ctx.verify:
            verify(g)
        for p in passes:
            g = p(g, ctx)
            if ctx.verify:
                try:
                    verify(g)
                except AssertionError as e:
                    raise AssertionError(f"after pass {p.__name__}: {e}") from None
        return g


def canonical_graph(program: Program, op: str, ctx: PassContext | None = None) -> Graph:
    """The op's graph after inlining and canonicalisation (of a dtype-generic op, its first
    binding's)."""
    op = program.graph_of(op)
    ctx = ctx or PassContext(program=program)
    if ctx.program is None:
        ctx = PassContext(program=program, verify=ctx.verify)
    return run_passes(program[op], GRAPH_PASSES, ctx)


def prepared_graph(program: Program, op: str, dtype=None, ctx: PassContext | None = None) -> Graph:
    """The canonical graph, its main float dtype changed to ``dtype`` if given (--dtype). One
    ``ctx`` for the ops of a program lets inlining reuse its callees' templates. A binding of a
    dtype-generic op (``rms_norm__f16``) keeps its dtypes: they are the binding (its op picks
    the binding of ``dtype`` instead, runtime/generic.py); the op's own name gives that
    binding."""
    from .retype import main_float_dtype, retype
    op = program.graph_of(op, dtype)
    g = canonical_graph(program, op, ctx)
    if dtype and program.op_of(op) == op:
        from ..ir.types import SPEC_DTYPES
        old = main_float_dtype(g)
        if old is not None:
            g = retype(g, old, SPEC_DTYPES[dtype] if isinstance(dtype, str) else dtype)
    return g


def kernel_graph(g: Graph, ctx: PassContext | None = None) -> Graph:
    """A canonical graph after the pattern rewrites: what fusion partitions."""
    return run_passes(g, REWRITE_PASSES, ctx or PassContext())
