"""The front-end benchmark script runs, and the spec it generates is valid (no timing asserted)."""
from __future__ import annotations

import re
from collections import Counter

from opforge.benchmarks import frontend_bench
from opforge.frontend import load_program
from opforge.passes.context import PassContext
from opforge.passes.pipeline import canonical_graph


def test_generated_spec_is_valid_and_mixed():
    text = frontend_bench.generate(50)
    program = load_program(text)
    assert list(program.graphs) == ["norm", "block"]
    block = program["block"]
    body = text[text.index("op block"):]
    assert len(re.findall(r"^    (?:t\d+ =|return )", body, re.M)) == 50
    ops = Counter(n.op for n in block.nodes)
    for op in ("matmul", "transpose", "cast", "mean", "max", "sum", "slice", "concat", "reshape",
               "permute", "where", "softmax", "call"):
        assert ops[op] > 0, op
    assert any(n.op == "mean" and n.attrs["keepdim"] for n in block.nodes)
    graph = canonical_graph(program, "block", PassContext(program=program, verify=True))
    assert not any(n.op == "call" for n in graph.nodes)   # the helper op was inlined
    assert str(graph.result_types[0]) == "f16[M, D]"


def test_generate_sizes():
    for n in (1, 2, 7, 13, 29):
        text = frontend_bench.generate(n)
        load_program(text)
        assert text.count("\n    t") == n - 1


def test_script_prints_the_table(capsys):
    assert frontend_bench.main(["--statements", "50", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    for label in ("parse", "check + build", "canonicalise", "parse + check + build", "total"):
        assert re.search(rf"^  {re.escape(label)} +\d+\.\d$", out, re.M), (label, out)
    assert "50 statements" in out


def test_run_reports_each_phase():
    r = frontend_bench.run(20, repeat=1)
    assert r["statements"] == 20
    assert r["nodes"] > 20 and r["canonical_nodes"] > 0
    for key in ("parse", "build", "canonicalize"):
        assert r[key] > 0
    assert abs(r["total"] - (r["parse"] + r["build"] + r["canonicalize"])) < 1e-9


def test_chain_option_prints_each_size(capsys):
    assert frontend_bench.main(["--chain", "3", "12", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^ +3 +\d+\.\d +\d+\.\d +\d+$", out, re.M), out
    assert re.search(r"^ +12 +\d+\.\d +\d+\.\d +\d+$", out, re.M), out
    r = frontend_bench.run_chain(20, repeat=1)
    assert r["ops"] == 20 and r["nodes"] > 20
