"""The native check over the examples (issue 10), behind the ``native`` marker: ``make
test-native`` (and CI) runs it, ``make test`` does not.

Every kernel the runtime would launch for every example op, at the files' decode and prefill
shapes (their ``# decode:`` / ``# prefill:`` lines), in f16 and bf16, is compiled for sm_90a and
sm_80 at its heuristic config and the autotuner's first candidate. It must compile, not spill,
and fit the target's shared memory; every dot kernel at prefill must use wgmma on sm_90a at its
heuristic config; and the static shared-memory estimate the autotuner prunes with must bound
the compiled figure from above for every config compiled. Compiled results are cached on disk
(OPFORGE_NATIVE_CACHE_DIR, else the user cache dir), so a rerun reads them back.

The golden figures (tests/golden/resources_sm90a.txt) pin a few key kernels: registers within
a tolerance, spills, shared memory and tensor-core instructions exactly. Regenerate with
``OPFORGE_UPDATE_GOLDEN=1 make test-native`` and read the diff.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from opforge.runtime.cache import KernelCache
from opforge.runtime.check_report import rows_of
from opforge.runtime.estimate import shared_memory
from opforge.runtime.native import NativeCompiler
from opforge.runtime.native_check import native_check
from opforge.runtime.sweep import op_cases
from opforge.runtime.targets import TARGETS

from .conftest import EXAMPLE_FILES, EXAMPLES, GOLDEN

pytestmark = pytest.mark.native

UPDATE = os.environ.get("OPFORGE_UPDATE_GOLDEN", "0") not in ("", "0")
REGISTER_TOLERANCE = 0.15


@pytest.fixture(scope="module")
def native_cache(tmp_path_factory):
    """Compiled results persist across sessions (the kernel cache of the suite does not)."""
    if not os.environ.get("OPFORGE_NATIVE_CACHE_DIR"):
        from platformdirs import user_cache_dir
        os.environ["OPFORGE_NATIVE_CACHE_DIR"] = str(Path(user_cache_dir("opforge")) / "native")
    return KernelCache()


@pytest.fixture(scope="module")
def sweep(native_cache):
    res = native_check(EXAMPLE_FILES, [TARGETS["sm_90a"], TARGETS["sm_80"]], dtypes=("f16", "bf16"),
                       which="first", cache=native_cache)
    return res


KNOWN = GOLDEN / "native_known_problems.txt"


def known_problems() -> dict[str, list[str]]:
    """The known problems by Triton version: sections headed ``# Triton X.Y.Z: ...``."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in KNOWN.read_text().splitlines():
        if line.startswith("# Triton "):
            current = sections.setdefault(line.split()[2].rstrip(":"), [])
        elif line.strip() and current is not None:
            current.append(line)
    return sections


def write_known_problems(version: str, lines: list[str]) -> None:
    sections = known_problems()
    sections[version] = lines
    text = []
    for v in sorted(sections, reverse=True):
        text.append(f"# Triton {v}: problems of tests/test_native_sweep.py not fixed yet (see its docstring)")
        text += sorted(sections[v])
    KNOWN.write_text("\n".join(text) + "\n")


def test_every_example_kernel_compiles_without_spills_within_shared_memory(sweep):
    """No problem beyond the known ones of this Triton (tests/golden/native_known_problems.txt,
    a section per version; both the 3.9 and the 3.6 sections are empty since the register
    budgets, runtime/register_budget.py, and the mma.sync tile rules): a new problem fails, and
    so does a known one that went away (delete its line, or regenerate with
    OPFORGE_UPDATE_GOLDEN=1). A config is checked as the runtime launches it: at its register
    budget where ptxas spills by choice. A Triton without a section is held to spills of at most
    64 B and no compile failure."""
    assert not sweep.errors, sweep.errors
    assert len(sweep.cases) > 300 and {c.op for c in sweep.cases} >= {"llama_block", "moe_ffn", "linear_q4"}
    import triton
    found = {str(p).split(": spills")[0] for p in sweep.problems}
    if UPDATE:
        write_known_problems(triton.__version__, sorted(found))
    sections = known_problems()
    if triton.__version__ not in sections:
        assert all(": spills" in str(p) and p.result.resources.spill_stores <= 64 for p in sweep.problems), \
            "\n".join(str(p) for p in sweep.problems)
        return
    known = set(sections[triton.__version__])
    new = [str(p) for p in sweep.problems if str(p).split(": spills")[0] not in known]
    assert not new, "\n".join(new)
    if known - found:
        pytest.fail("fixed, remove from the known problems:\n" + "\n".join(sorted(known - found)))


def test_dot_kernels_at_prefill_use_wgmma_on_sm90a(sweep):
    """Every dot kernel at prefill whose heuristic tile has the 64 rows a warpgroup MMA needs
    (an op with one query row, decode_kv, is a decode at any shape: mma.sync is its right
    choice)."""
    rows = [r for r in sweep.rows if r.target == "sm_90a" and r.shape == "prefill" and r.has_dot
            and r.heuristic_case.config.as_dict().get("BLOCK_M", 64) >= 64]
    assert len(rows) > 20
    missing = [f"{r.kernel} [{r.op}, {r.dtype}] at {r.heuristic_case.config}: {r.heuristic.resources.tensor_core_text()}"
               for r in rows if not r.heuristic.resources.wgmma]
    assert not missing, "\n".join(missing)


def test_the_shared_memory_estimate_bounds_the_compiler_from_above(sweep):
    under = [f"{c.kernel.name} at {c.config} on {r.target}: estimate {shared_memory(c.kernel, c.config)} B < "
             f"compiled {r.resources.shared} B" for c, r in zip(sweep.cases, sweep.results)
             if r.ok and shared_memory(c.kernel, c.config) < r.resources.shared]
    assert not under, "\n".join(under)


# -- golden figures of key kernels ---------------------------------------------------------------
GOLDEN_FILE = GOLDEN / "resources_sm90a.txt"
# (file, op, sizes): the Llama block's GEMMs and attention at prefill and decode, the int4
# decode GEMM
KEY = [
    ("llama.opf", "llama_block", dict(B=1, S=2048, D=4096, H=32, E=128, F=11008)),
    ("llama.opf", "llama_block", dict(B=1, S=1, D=4096, H=32, E=128, F=11008)),
    ("quant_linear.opf", "linear_q4", dict(M=1, K=4096, N=4096)),
]


def golden_lines(native_cache) -> list[str]:
    import triton
    from opforge.runtime.module import compile_module
    lines = [f"# resources on sm_90a, heuristic configs (Triton {triton.__version__}); "
             f"registers compared within {REGISTER_TOLERANCE:.0%}, the rest exactly"]
    for file, name, sizes in KEY:
        op = compile_module(EXAMPLES / file, ops=[name], cache_dir=native_cache.root).ops[name]
        cases = [c for c in op_cases(op, sizes, [TARGETS["sm_90a"]], which="heuristic", cache=native_cache)
                 if c.has_dot]
        results = NativeCompiler(native_cache).compile([c.job for c in cases])
        at = ",".join(f"{k}={v}" for k, v in sizes.items())
        for c, r in zip(cases, results):
            x = r.resources
            lines.append(f"{name} {at} {c.kernel.name} [{c.config}]: registers={x.registers} "
                         f"spills={x.spill_stores}/{x.spill_loads} shared={x.shared} tensor_cores={x.tensor_core_text()}")
    return lines


def parse(line: str):
    head, _, figures = line.rpartition("]: ")
    vals = dict(f.split("=", 1) for f in figures.split())
    return head, vals


def test_golden_resources_of_key_kernels(native_cache):
    import triton
    got = golden_lines(native_cache)
    if UPDATE:
        GOLDEN_FILE.write_text("\n".join(got) + "\n")
    want = GOLDEN_FILE.read_text().splitlines()
    if f"(Triton {triton.__version__})" not in want[0]:
        pytest.skip(f"the golden figures are for another Triton ({want[0]})")
    assert [parse(l)[0] for l in got[1:]] == [parse(l)[0] for l in want[1:]], \
        "the key kernels or their configs changed; regenerate with OPFORGE_UPDATE_GOLDEN=1"
    for g, w in zip(got[1:], want[1:]):
        (head, gv), (_, wv) = parse(g), parse(w)
        for key in ("spills", "shared", "tensor_cores"):
            assert gv[key] == wv[key], f"{head}: {key} {wv[key]} -> {gv[key]}"
        assert abs(int(gv["registers"]) - int(wv["registers"])) <= REGISTER_TOLERANCE * int(wv["registers"]), \
            f"{head}: registers {wv['registers']} -> {gv['registers']}"
