"""The random-spec campaign (tests/specgen.py) as tests: seeded random programs through the
compiled kernels, each checked against an oracle written independently of the reference
executor. A bounded run here (fixed seeds, chunked so xdist spreads them); a longer one with
``OPFORGE_CAMPAIGN=START:COUNT`` (``python -m opforge.tests.specgen START COUNT --save
tests/regressions`` shrinks and saves what it finds); every saved failure is checked below.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .specgen import campaign, check, from_json, generate, minimize, to_json, without_dead

CHUNK = 25
DEFAULT_SEEDS = (0, 300)
REGRESSIONS = Path(__file__).resolve().parent / "regressions"


def _seed_range() -> tuple[int, int]:
    spec = os.environ.get("OPFORGE_CAMPAIGN")
    if not spec:
        return DEFAULT_SEEDS
    start, _, count = spec.partition(":")
    return int(start), int(start) + int(count or 1000)


_lo, _hi = _seed_range()


@pytest.mark.parametrize("start", range(_lo, _hi, CHUNK))
def test_random_specs_match_the_oracle(start):
    res = campaign(range(start, min(start + CHUNK, _hi)), namespace=f"camp{start}", log=lambda *_: None)
    if res["failures"]:
        case, out = res["failures"][0]
        pytest.fail(f"{len(res['failures'])} failing spec(s) among seeds {start}..{start + CHUNK - 1}; "
                    f"the first, shrunk (seed {case.seed}, sizes {case.bindings}): {out.kind}: {out.message}\n"
                    f"{case.spec()}")


@pytest.mark.parametrize("path", sorted(REGRESSIONS.glob("*.json")), ids=lambda p: p.stem)
def test_saved_regressions(path):
    case = from_json(json.loads(path.read_text()))
    out = check(case, f"regr_{path.stem}")
    assert out.ok, f"{out.kind}: {out.message}\n{case.spec()}"


def test_the_generator_covers_the_language():
    """Over the bounded run's seeds, every construct the campaign promises appears."""
    text = "\n".join(generate(s).spec() for s in range(*DEFAULT_SEEDS))
    for construct in ("exp(", "log(", "sqrt(", "rsqrt(", "sin(", "cos(", "tanh(", "sigmoid(", "relu(", "silu(",
                      "gelu(", "softplus(", "abs(", "maximum(", "minimum(", "where(", " ** ", " / ",
                      "cast(", ", f16)", ", bf16)", ", i32)", ", bool)", "sum(", "mean(", "max(", "min(",
                      "keepdim=true", "softmax(", "log_softmax(", "cumsum(", " @ ", ".T", "permute(",
                      "transpose(", "reshape(", "None", "::2", "concat(", "topk(", "[p", "h1(", "cast(M, f32)",
                      ": f32)", "[B, M, N]"):
        assert construct in text, construct


def test_the_oracle_is_independent_of_the_reference_executor():
    from . import specgen as sg
    source = Path(sg.__file__).read_text()
    assert "runtime.reference" not in source and "run_graph" not in source


def test_the_oracle_catches_a_wrong_kernel(monkeypatch):
    """A campaign that cannot fail checks nothing: break one tile lowering and the campaign
    must report it, shrunk to a few statements."""
    from opforge.ir import registry
    prim = registry.get("exp")
    monkeypatch.setitem(prim.extra, "tile", lambda b, args, attrs: b.unary("exp", b.mul(args[0], 1.5)))
    # the first programs using exp whose results depend on it visibly (minimum(exp(v), v) or a
    # where that never selects it would hide any exp)
    seeds = [s for s in range(1000) if "exp(" in without_dead(generate(s)).spec()][:6]
    res = campaign(seeds, namespace="camp_wrong", log=lambda *_: None)
    assert res["counts"]["mismatch"] >= 1, res["counts"]
    case, out = res["failures"][0]
    assert "exp(" in case.spec() and len(case.stmts) <= 3, case.spec()


def test_cases_round_trip_through_json():
    for seed in range(20):
        case = without_dead(generate(seed))
        back = from_json(json.loads(json.dumps(to_json(case))))
        assert back.spec() == case.spec() and back.oracle_source() == case.oracle_source()


def test_minimize_keeps_the_failure():
    case = generate(3)
    target = case.outputs[0].name
    small = minimize(case, lambda c: any(v.name == target for v in c.outputs))
    assert [v.name for v in small.outputs] == [target]
    assert len(small.stmts) <= len(case.stmts)
