"""The front end grows linearly with the spec (issue 9, item 16): parsing, checking, building,
the search for call cycles and inlining. Held by counting Python function calls (cProfile's
total), which does not depend on the machine or its load: four times the spec must cost about
four times the calls (a quadratic step gave 12 times for a chain of ops calling ops). And the
cyclic garbage collector, whose full collections walk everything allocated so far, does not run
a full collection while a large spec is checked."""
from __future__ import annotations

import cProfile
import gc
import pstats

import pytest

import opforge
from opforge.benchmarks.frontend_bench import chain, generate
from opforge.frontend import load_program
from opforge.passes.context import PassContext
from opforge.passes.pipeline import canonical_graph

# linear: 4x the spec, about 4x the calls (less: fixed costs); quadratic gave ~12x at these sizes
SLACK = 6.0


def calls(fn) -> int:
    profile = cProfile.Profile()
    profile.enable()
    try:
        fn()
    finally:
        profile.disable()
    return pstats.Stats(profile).total_calls


def ratio(make, n: int) -> float:
    make(2)                       # the parser's tables are built once per process, not counted
    return calls(lambda: make(4 * n)) / calls(lambda: make(n))


def test_a_chain_of_ops_calling_ops_is_checked_and_inlined_in_linear_time():
    def check_and_inline(n):
        program = load_program(chain(n))
        graph = canonical_graph(program, f"f{n - 1}")
        assert sum(n.op == "add" for n in graph.nodes) == n - 1
    assert ratio(check_and_inline, 50) < SLACK


def test_a_large_op_is_parsed_checked_and_built_in_linear_time():
    def front_end(n):
        program = load_program(generate(n))
        canonical_graph(program, "block")
    assert ratio(front_end, 200) < SLACK


def test_compiling_every_op_of_a_chain_inlines_each_callee_once():
    """One context for all ops of a program: a callee's inlined template is made once, so
    preparing every op of a chain costs calls in proportion to the graphs it returns."""
    def all_ops(n):
        program = load_program(chain(n))
        ctx = PassContext(program=program)
        total = sum(len(canonical_graph(program, op, ctx).nodes) for op in program.graphs)
        assert total >= n * (n - 1) // 2
    # the result itself grows as n^2: 16x the nodes for 4x the ops
    assert ratio(all_ops, 30) < 16 * 1.5


def test_a_cycle_at_the_end_of_a_long_chain_is_found_at_its_call():
    n = 3000
    with pytest.raises(opforge.SpecError) as info:
        load_program(chain(n, cycle=True))
    e = info.value
    assert e.message.startswith("ops call each other in a cycle: f0 -> f2999 -> f2998 -> ")
    assert e.message.endswith(" -> f1 -> f0")
    assert (e.line, e.col) == (2, 37)      # f1 calls f0: the call that closes the cycle


def test_no_full_garbage_collection_runs_while_a_large_spec_is_checked():
    text = generate(2000)
    full = []

    def watch(phase, info):
        if phase == "start" and info["generation"] == 2:
            full.append(info)

    gc.collect()
    gc.callbacks.append(watch)
    try:
        program = load_program(text)
        canonical_graph(program, "block")
    finally:
        gc.callbacks.remove(watch)
    assert full == []
    assert gc.isenabled()
