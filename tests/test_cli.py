"""The command line (click's CliRunner on opforge.cli:main): check, show, run --reference, and
the error format (FILE:LINE:COL: error: with the source line and a caret, exit 1, no traceback)."""
from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from opforge.cli import main
from opforge.frontend import load_program
from opforge.ir.printer import print_graph
from opforge.passes.pipeline import canonical_graph

from .conftest import EXAMPLE_FILES, EXAMPLES


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_clean_exit(result, code: int):
    """Exit code as expected, and never a Python traceback."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    if result.exception is not None:
        assert isinstance(result.exception, SystemExit), repr(result.exception)


def squash(text: str) -> str:
    return " ".join(text.split())


# -- check --------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=[f.stem for f in EXAMPLE_FILES])
def test_check_examples(path):
    result = invoke("check", path)
    assert_clean_exit(result, 0)
    program = load_program(path)
    assert f"{len(program.op_names)} op(s)" in result.stdout and "no errors" in result.stdout
    for op in program.graphs:            # every graph listed: each binding of a generic op
        assert re.search(rf"^\s*{op}\(", result.stdout, re.MULTILINE), op
    assert result.stderr == ""


BAD = "op f(x: f16[M, D]) -> f16[M, D] {\n    return silu(x) + relux(x)\n}\n"


def test_check_bad_spec_reports_file_line_col_with_caret(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a short relative path (long lines are tested below)
    path = "bad.opf"
    (tmp_path / path).write_text(BAD)
    result = invoke("check", path)
    assert_clean_exit(result, 1)
    lines = result.stderr.splitlines()
    assert lines[0] == f"{path}:2:22: error: unknown function 'relux'"
    assert lines[1] == "    return silu(x) + relux(x)"
    assert lines[2] == " " * 21 + "^~~~~"
    assert lines[3] == "hint: did you mean 'relu'?"
    assert result.stdout == ""


@pytest.mark.parametrize("text,line,col,message", [
    ("op f(x: f16[M]) -> f16[M] {\n    return x +\n}\n", 2, None, None),  # syntax error
    ("op f(x: f16[M], w: f32[M]) -> f16[M] {\n    y = x * w\n    return y\n}\n", 2, 13, "different dtypes f16 and f32"),
    ("op f(x: f16[M]) -> f16[M] {\n    y = x\n    y = x + x\n    return y\n}\n", 3, 5, "'y' is already defined"),
    ("op f(x: f16[M]) -> f32[M] {\n    return x\n}\n", 2, 12, "the result is f16[M], but the op declares f32[M]"),
])
def test_check_errors_have_location_and_caret(tmp_path, monkeypatch, text, line, col, message):
    monkeypatch.chdir(tmp_path)
    path = "e.opf"
    (tmp_path / path).write_text(text)
    result = invoke("check", path)
    assert_clean_exit(result, 1)
    out = result.stderr.splitlines()
    m = re.match(rf"^{re.escape(str(path))}:(\d+):(\d+): error: (.+)$", out[0])
    assert m, out
    assert int(m.group(1)) == line
    if col is not None:
        assert int(m.group(2)) == col
    if message is not None:
        assert message in m.group(3)
    src_line = text.splitlines()[int(m.group(1)) - 1]
    assert out[1] == src_line
    caret = out[2]
    assert caret.lstrip(" ").startswith("^") and len(caret) - len(caret.lstrip(" ")) == int(m.group(2)) - 1


def test_check_error_on_a_long_line_is_not_wrapped(tmp_path):
    src = "    return x * cast(w, f32) + " + " + ".join(["x * x"] * 12) + " + w"
    path = tmp_path / "a_spec_file_in_a_directory_with_a_long_name.opf"
    path.write_text(f"op f(x: f16[M, D], w: f16[D]) -> f16[M, D] {{\n{src}\n}}\n")
    result = invoke("check", path)
    assert_clean_exit(result, 1)
    lines = result.stderr.splitlines()
    assert lines[0] == f"{path}:2:16: error: operands of '*' have different dtypes f16 and f32"
    assert lines[1] == src
    assert lines[2] == " " * 15 + "^~~~~~~~~~~~"


# -- show ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["rms_norm", "llama_block"])
def test_show_graph_prints_the_canonical_graph(op):
    path = EXAMPLES / "llama.opf"
    result = invoke("show", path, "--op", op, "--stage", "graph")
    assert_clean_exit(result, 0)
    want = print_graph(canonical_graph(load_program(path), op))
    assert squash(result.stdout) == squash(want)
    default = invoke("show", path, "--op", op)  # --stage graph is the default
    assert_clean_exit(default, 0)
    assert default.stdout == result.stdout


def test_show_graph_output_is_the_printer_text_verbatim():
    path = EXAMPLES / "lora.opf"
    result = invoke("show", path, "--op", "lora_linear", "--stage", "graph")
    assert_clean_exit(result, 0)
    assert result.stdout.rstrip("\n") == print_graph(canonical_graph(load_program(path), "lora_linear"))


def test_show_needs_op_and_a_known_stage():
    path = EXAMPLES / "llama.opf"
    assert invoke("show", path).exit_code == 2
    r = invoke("show", path, "--op", "rms_norm", "--stage", "llir")
    assert r.exit_code == 2 and "llir" in r.output and "ptx" in r.output     # ptx is a stage now


# -- run ----------------------------------------------------------------------------------------
def test_run_reference_with_file_shapes():
    result = invoke("run", EXAMPLES / "lora.opf", "--op", "lora_linear", "--reference")
    assert_clean_exit(result, 0)
    out = result.stdout
    assert "M=33, K=64, N=48, R=8" in out
    assert "[33, 48]" in out and "float16" in out
    assert "rel err" in out and re.search(r"\bok\b", out) and "MISMATCH" not in out


def test_run_reference_with_shape_option():
    result = invoke("run", EXAMPLES / "llama.opf", "--op", "split_heads", "--reference", "--shape", "S=5,D=12,heads=3")
    assert_clean_exit(result, 0)
    assert "B=2, S=5, D=12, heads=3" in result.stdout  # B from the file's '# shapes:' line
    assert "[2, 3, 5, 4]" in result.stdout
    assert re.search(r"\bok\b", result.stdout)


def test_run_reference_with_dtype():
    result = invoke("run", EXAMPLES / "moe.opf", "--op", "router", "--reference", "--dtype", "f32",
                    "--shape", "T=5")
    assert_clean_exit(result, 0)
    assert "T=5, D=64, E=8" in result.stdout and "float32" in result.stdout and "int32" in result.stdout


def test_run_errors(tmp_path):
    r = invoke("run", EXAMPLES / "lora.opf", "--op", "lora_linear", "--reference", "--shape", "M=x")
    assert_clean_exit(r, 1)
    assert "'M=x' is not NAME=INTEGER" in r.stderr
    spec = tmp_path / "noshapes.opf"
    spec.write_text("op f(x: f32[M, N]) -> f32[M, N] { return x }\n")
    r = invoke("run", spec, "--op", "f", "--reference")
    assert_clean_exit(r, 1)
    assert "give the sizes M, N with --shape M=...,N=..." in r.stderr
    r = invoke("run", spec, "--op", "f", "--reference", "--shape", "M=2,N=3")
    assert_clean_exit(r, 0)
    r = invoke("run", EXAMPLES / "llama.opf", "--op", "split_heads", "--reference", "--shape", "D=10")
    assert_clean_exit(r, 1)      # heads: its default, 4
    assert "D/heads" in r.stderr and "not a whole number" in r.stderr


@pytest.mark.parametrize("command", [["run", "--reference"], ["show"]])
def test_unknown_op_gives_did_you_mean(command):
    r = invoke(command[0], EXAMPLES / "lora.opf", "--op", "lora_lin", *command[1:])
    assert_clean_exit(r, 1)
    assert "has no op 'lora_lin'" in r.stderr
    assert "did you mean 'lora_linear'?" in r.stderr
    r = invoke(command[0], EXAMPLES / "lora.opf", "--op", "zzz", *command[1:])
    assert_clean_exit(r, 1)
    assert "its ops are lora_linear, lora_linear_gelu" in r.stderr


CRASH = """op f(x: f16[M, K], w: f16[N, K]) -> f16[M, N] {
    return x @ w.T
}
"""


def test_check_runs_the_pipeline_and_reports_a_compile_failure(tmp_path, monkeypatch):
    """Plain check lowers every op to kernels (nothing runs): a spec that parses but whose
    lowering fails is an error naming the op and the sizes, exit 1, no traceback."""
    path = tmp_path / "mm.opf"
    path.write_text(CRASH)
    ok = invoke("check", path, "--shape", "M=8,K=64,N=32")
    assert_clean_exit(ok, 0)
    assert re.search(r"1 op\(s\), no errors \(\d+ kernel\(s\) at the sizes of --shape\)", ok.stdout)
    from opforge.passes import plan

    def broken(fg, group):
        raise RuntimeError("no template for this group")
    monkeypatch.setitem(plan.LOWERINGS, "matmul", broken)
    bad = invoke("check", path, "--shape", "M=8,K=64,N=32")
    assert_clean_exit(bad, 1)
    assert f"{path}: f at M=8, K=64, N=32: does not compile to kernels: RuntimeError: no template for this group" \
        in squash(bad.stderr)
    assert "no errors" not in bad.stdout


def test_check_with_a_target_prints_the_resource_table(tmp_path):
    path = tmp_path / "mm.opf"
    path.write_text(CRASH)
    r = invoke("check", path, "--target", "sm_90a", "--configs", "heuristic", "--shape", "M=256,K=512,N=256")
    assert_clean_exit(r, 0)
    out = squash(r.stdout)
    assert "f_k0_matmul" in out and "HGMMA" in out and "cp.async" in out
    assert re.search(r"\d+ compile\(s\) of \d+ kernel\(s\) for sm_90a .*: no problems", out)


def test_missing_file_is_a_usage_error(tmp_path):
    r = invoke("check", tmp_path / "nope.opf")
    assert r.exit_code == 2 and "does not exist" in r.output
