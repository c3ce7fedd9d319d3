"""The command line's output and start (issue 13, item 9): the demo's summary counts what it
skipped, an unknown ``--shape`` symbol is an error with the closest name, tables keep whole names
when piped, ``explain()`` returns its text instead of printing it too, ``--help`` without torch."""
from __future__ import annotations

import io
import subprocess
import sys

import pytest
from click.testing import CliRunner

from opforge.cli import main
from opforge.runtime.console import UNLIMITED, make_console
from opforge.runtime.runner import demo_summary

from .conftest import EXAMPLES
from .kernel_helpers import compile_spec

LONG = "a_rather_long_op_name_that_a_table_of_eighty_columns_would_have_to_cut_somewhere_in_the_middle"
TWO_OPS = f"""# shapes: M=3, N=4
op {LONG}(x: f32[M, N]) -> f32[M, N] {{ return x * 2 }}
op needs_k(x: f32[M, K]) -> f32[M, K] {{ return x + 1 }}
"""


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# -- demo ---------------------------------------------------------------------------------------
def test_demo_summary_claims_a_full_match_only_when_every_op_ran():
    assert demo_summary(["a", "b"], [], []) == "all 2 ops match the reference"
    line = demo_summary(["a"], [], ["b"])
    assert "all" not in line and "1 of 2 ops match the reference" in line and "1 skipped (not run): b" in line
    line = demo_summary(["a"], ["c"], ["b"])
    assert "1 of 3 ops do not match the reference: c" in line and "1 skipped (not run): b" in line


def test_demo_counts_the_skipped_ops(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")          # rich's width for a pipe, before: names were cut
    spec = tmp_path / "two.opf"
    spec.write_text(TWO_OPS)
    r = invoke("demo", spec, "--reference")
    assert r.exit_code == 0, r.output
    assert "all ops match" not in r.stdout and "all 2 ops" not in r.stdout
    assert "1 of 2 ops match the reference; 1 skipped (not run): needs_k" in r.stdout
    # piped (not a terminal): no width limit, the long name is whole on one line
    assert LONG in r.stdout and "…" not in r.stdout


# -- run --shape ----------------------------------------------------------------------------------
@pytest.mark.parametrize("given, near", [("Q=3", "B"), ("d=3", "D"), ("SS=3", "S"), ("S=3,Dd=5", "D")])
def test_an_unknown_shape_symbol_is_an_error_naming_the_closest(given, near):
    r = invoke("run", EXAMPLES / "llama.opf", "--op", "rms_norm", "--reference", "--shape", given)
    assert r.exit_code == 1 and "Traceback" not in r.output
    bad = [p for p in given.split(",") if p.split("=")[0] not in ("B", "S", "D")][0]
    assert f"rms_norm: --shape {bad}: the op has no size '{bad.split('=')[0]}'; did you mean '{near}'? " \
           f"(its sizes: B, S, D)" in r.stderr


def test_the_file_shapes_of_other_ops_are_not_unknown_symbols():
    # llama.opf's '# shapes:' line also names H and F, which rms_norm does not have
    r = invoke("run", EXAMPLES / "llama.opf", "--op", "rms_norm", "--reference", "--shape", "S=5")
    assert r.exit_code == 0, r.output


# -- widths ---------------------------------------------------------------------------------------
def test_a_console_that_is_not_a_terminal_has_no_width_limit(monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    assert make_console(file=io.StringIO()).width == UNLIMITED


def test_a_terminal_console_uses_the_terminal_width_and_folds_long_names(monkeypatch):
    from rich.table import Table
    monkeypatch.setenv("COLUMNS", "60")
    out = io.StringIO()
    con = make_console(file=out, force_terminal=True, color_system=None)
    assert con.width == 60
    table = Table()
    table.add_column("op", overflow="fold")          # as the run and demo tables do
    table.add_column("status", overflow="fold")
    table.add_row(LONG, "ok")
    con.print(table)
    lines = out.getvalue().splitlines()
    assert "…" not in out.getvalue() and max(len(line) for line in lines) <= 60
    first_column = "".join(line.split("│")[1].strip() for line in lines if line.count("│") == 3)
    assert first_column == LONG                      # folded over lines, not cut


# -- explain --------------------------------------------------------------------------------------
def test_explain_returns_its_text_and_prints_nothing(capsys):
    mod = compile_spec("op f(x: f32[M, N]) -> f32[M, N] { return exp(x) * 2 }\nop g(x: f32[N]) -> f32[N] { return -x }\n",
                       "explain")
    text = mod.f.explain()
    assert capsys.readouterr().out == ""
    assert isinstance(text, str) and "== graph ==" in text and "@triton.jit" in text
    assert repr(text) == str(text)                # a REPL shows the text itself, once
    sys.displayhook(text)
    assert capsys.readouterr().out == str(text) + "\n"
    whole = mod.explain()
    assert capsys.readouterr().out == "" and "::f on" in whole and "::g on" in whole
    f = io.StringIO()
    assert mod.f.explain(file=f) == text and f.getvalue() == str(text) + "\n"


# -- --help ---------------------------------------------------------------------------------------
def test_help_does_not_import_torch():
    code = ("import sys\nimport opforge.cli\ntry:\n    opforge.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch')\n"
            "from opforge import SpecError, CallError\nprint(SpecError.__name__, CallError.__name__)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Usage:" in r.stdout and "no torch" in r.stdout and "SpecError CallError" in r.stdout


def test_demo_says_how_it_counts_a_generic_op(tmp_path):
    spec = tmp_path / "generic.opf"
    spec.write_text("# shapes: M=3, D=5\nop scale<T: f16 | f32>(x: T[M, D]) -> T[M, D] { return x * 2.0 }\n")
    r = invoke("demo", spec, "--reference")
    assert r.exit_code == 0, r.output
    assert "all 2 ops match the reference" in r.stdout
    assert "(each binding of a dtype-generic op is counted as an op: scale has 2)" in r.stdout
