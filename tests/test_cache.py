"""The on-disk kernel cache: content-addressed entries shared by processes, written atomically,
and never trusted when damaged (a truncated kernel.py or meta.json is discarded and rebuilt).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import opforge
from opforge.runtime.cache import META, SOURCE, KernelCache

from .kernel_helpers import compile_spec, run_case

EXAMPLES = Path(opforge.__file__).resolve().parent / "examples"
LLAMA = EXAMPLES / "llama.opf"
# the directory that holds the package opforge (the repository root is the package itself)
PACKAGE_PARENT = str(Path(opforge.__file__).resolve().parent.parent)

SPEC = """
op norm(x: f32[M, D], w: f32[D]) -> f32[M, D] {
    return x * rsqrt(mean(x * x, axis=-1, keepdim=true) + 1e-5) * w
}
op act(x: f32[M, D], b: f32[D]) -> f32[M, D] { return silu(x + b) * 2 }
"""


def entries(root: Path) -> dict[str, Path]:
    """Cache entries: root/xx/<sha256>/ directories."""
    out = {}
    for d in root.glob("??/*"):
        if d.is_dir() and len(d.name) == 64 and not d.name.startswith("."):
            out[d.name] = d
    return out


def leftovers(root: Path) -> list[Path]:
    """Temporary directories of unfinished writes."""
    return [d for d in root.glob("??/.*") if d.is_dir()]


def expected_keys(src, root: Path) -> set[str]:
    """The entries compiling src makes in an empty cache directory of this process."""
    assert not root.exists() or not any(root.iterdir())
    mod = compile_spec(src, "cache_keys", cache_dir=root)
    n_kernels = len({k.name for op in mod.ops.values() for k in op.plan.kernels})
    got = set(entries(root))
    assert len(got) == n_kernels
    return got


def child_env(cache: Path) -> dict:
    """The environment of a child process: this one's (poisoning on), the given cache, and the
    package importable."""
    return dict(os.environ, OPFORGE_CACHE_DIR=str(cache),
                PYTHONPATH=PACKAGE_PARENT + os.pathsep + os.environ.get("PYTHONPATH", ""))


# A worker: import, wait at a barrier (files in a shared directory) so that the processes
# compile at the same moment, compile the llama file, check one op against the reference,
# print how many entries it found corrupt.
WORKER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import opforge
    from opforge.runtime.inputs import random_inputs
    from opforge.runtime.reference import run_graph
    from opforge.runtime.tolerances import assert_close, tolerance_for
    me, n, barrier = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    (barrier / f"ready{me}").touch()
    t0 = time.time()
    while len(list(barrier.glob("ready*"))) < n and time.time() - t0 < 120:
        time.sleep(0.005)
    mod = opforge.compile(sys.argv[4], namespace=f"race{me}")
    op = mod.rms_norm
    b = {"B": 2, "S": 3, "D": 16}
    ins = random_inputs(op.graph, b, seed=me)
    out = op(*[ins[p.name] for p in op.graph.params])
    assert_close(out, run_graph(op.graph, ins, b, check=True)[0], tolerance_for(op.graph))
    print("OK", op.runner.cache.rebuilt)
""")


def test_processes_compiling_the_same_spec_at_once_share_one_entry_per_kernel(tmp_path):
    cache = tmp_path / "cache"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    n = 3
    env = child_env(cache)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(i), str(n), str(barrier), str(LLAMA)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(n)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
        assert out.startswith("OK"), out
    # the same kernels, compiled here into another cache
    want = expected_keys(LLAMA.read_text(), tmp_path / "reference")
    got = entries(cache)
    assert set(got) == want
    assert not leftovers(cache)
    kc = KernelCache(cache)
    for path in got.values():
        assert kc.valid(path)
        assert sorted(p.name for p in path.iterdir()) == [SOURCE, META]
    assert {out.split()[1] for out, _ in results} == {"0"}   # no process found a corrupt entry


def test_the_same_kernels_under_another_namespace_reuse_the_entries(tmp_path):
    root = tmp_path / "shared"
    compile_spec(SPEC, "cache_a", cache_dir=root)
    before = {k: (p / SOURCE).stat().st_mtime_ns for k, p in entries(root).items()}
    keys_a = expected_keys(SPEC, tmp_path / "a")
    assert set(before) == keys_a
    b = compile_spec(SPEC, "cache_b", cache_dir=root)
    after = {k: (p / SOURCE).stat().st_mtime_ns for k, p in entries(root).items()}
    assert after == before
    assert b.norm.runner.cache.rebuilt == 0
    # a changed spec adds entries for its new kernels only
    changed = SPEC.replace("* 2", "* 3")
    compile_spec(changed, "cache_c", cache_dir=root)
    keys_c = expected_keys(changed, tmp_path / "c")
    assert set(entries(root)) == keys_a | keys_c
    assert len(keys_c - keys_a) == 1


def _damage(path: Path, how: str) -> None:
    src, meta = path / SOURCE, path / META
    if how == "truncated source":
        text = src.read_text()
        src.write_text(text[: len(text) // 2])
    elif how == "empty source":
        src.write_text("")
    elif how == "missing source":
        src.unlink()
    elif how == "truncated meta":
        text = meta.read_text()
        meta.write_text(text[: len(text) // 2])
    elif how == "missing meta":
        meta.unlink()
    elif how == "edited source":      # valid Python, but not what the hash says
        src.write_text(src.read_text().replace("tl.sigmoid(", "tl.exp("))
    elif how == "wrong hash":
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "sha256": "0" * 64}))
    else:
        raise ValueError(how)


DAMAGES = ["truncated source", "empty source", "missing source", "truncated meta", "missing meta",
           "edited source", "wrong hash"]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_entry_is_detected_and_rebuilt(tmp_path, how):
    mod = compile_spec(SPEC, "cache_dmg", cache_dir=tmp_path)
    originals = {k: (p / SOURCE).read_text() for k, p in entries(tmp_path).items()}
    # damage the entry of the pointwise kernel (the only one with a sigmoid)
    (key,) = [k for k, text in originals.items() if "tl.sigmoid(" in text]
    _damage(entries(tmp_path)[key], how)
    cache = KernelCache(tmp_path)
    assert not cache.valid(entries(tmp_path)[key])
    mod2 = compile_spec(SPEC, "cache_dmg2", cache_dir=tmp_path)
    cache2 = mod2.act.runner.cache
    assert cache2.rebuilt == 1
    assert {k: (p / SOURCE).read_text() for k, p in entries(tmp_path).items()} == originals
    assert all(cache.valid(p) for p in entries(tmp_path).values())
    assert not leftovers(tmp_path)
    run_case(mod2.act, {"M": 7, "D": 33})
    run_case(mod.norm, {"M": 7, "D": 33})


CORRUPT_THEN_RUN = textwrap.dedent("""
    import sys
    import opforge
    from opforge.runtime.inputs import random_inputs
    from opforge.runtime.reference import run_graph
    from opforge.runtime.tolerances import assert_close, tolerance_for
    mod = opforge.compile(sys.argv[1], namespace="fresh")
    for name in ("norm", "act"):
        op = getattr(mod, name)
        b = {"M": 5, "D": 33}
        ins = random_inputs(op.graph, b, seed=1)
        out = op(*[ins[p.name] for p in op.graph.params])
        assert_close(out, run_graph(op.graph, ins, b, check=True)[0], tolerance_for(op.graph))
    print("OK", mod.act.runner.cache.rebuilt)
""")


def test_a_fresh_process_rebuilds_and_loads_a_damaged_entry(tmp_path):
    """The process that finds the damage loads the rebuilt source (no module of it is in
    memory yet), and gets correct results."""
    compile_spec(SPEC, "cache_fresh", cache_dir=tmp_path)
    for k, p in entries(tmp_path).items():
        _damage(p, "truncated source" if "tl.sigmoid(" in (p / SOURCE).read_text() else "truncated meta")
    res = subprocess.run([sys.executable, "-c", CORRUPT_THEN_RUN, SPEC], capture_output=True, text=True,
                         timeout=240, env=child_env(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["OK", str(len(entries(tmp_path)))]
    assert all(KernelCache(tmp_path).valid(p) for p in entries(tmp_path).values())


def test_cache_dir_comes_from_the_environment():
    root = Path(os.environ["OPFORGE_CACHE_DIR"])
    assert KernelCache().root == root
    assert "opforge-test-cache-" in root.name     # a per-session directory, not the user's cache
