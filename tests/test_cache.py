"""The on-disk kernel cache: content-addressed entries shared by processes, written atomically,
and never trusted when damaged (a truncated kernel.py or meta.json is discarded and rebuilt).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

import opforge
from opforge.runtime import cache as cache_module
from opforge.runtime.cache import META, SOURCE, CacheWarning, KernelCache, fallback_root

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


# -- faults (issue 9): replaced entries, JSON that is not an object, unusable directories ----------
def _entry_with(root: Path, needle: str) -> Path:
    (path,) = [p for p in entries(root).values() if needle in (p / SOURCE).read_text()]
    return path


def _as_file(path: Path) -> None:
    """Replace a directory (or file) by a file."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    path.write_text("not what the cache put here")


def _as_dir(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "x").write_text("x")


FAULTS = {
    "entry is a file": lambda root, e: _as_file(e),
    "shard is a file": lambda root, e: _as_file(e.parent),
    "locks is a file": lambda root, e: _as_file(root / "locks"),
    "lock is a directory": lambda root, e: (_as_file(root / "locks" / f"{e.name}.lock"),
                                            _as_dir(root / "locks" / f"{e.name}.lock")),
    "kernel.py is a directory": lambda root, e: _as_dir(e / SOURCE),
    "meta.json is a directory": lambda root, e: _as_dir(e / META),
    "meta.json is a list": lambda root, e: (e / META).write_text("[1, 2]"),
    "meta.json is a string": lambda root, e: (e / META).write_text('"sha256"'),
    "meta.json is null": lambda root, e: (e / META).write_text("null"),
    "meta.json has a number for the hash": lambda root, e: (e / META).write_text('{"sha256": 5}'),
    "meta.json is binary": lambda root, e: (e / META).write_bytes(b"\xff\xfe\x00garbage"),
    "kernel.py is binary": lambda root, e: (e / SOURCE).write_bytes(b"\x00\xff" * 64),
    "entry is a dangling link": lambda root, e: (shutil.rmtree(e), e.symlink_to(root / "nowhere")),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_faulty_entry_is_repaired_and_the_next_compile_is_right(tmp_path, fault):
    """Every fault ends in a working compile with correct results, in this process and the
    next; before, an entry replaced by a file gave NotADirectoryError on every compile, a
    meta.json list AttributeError."""
    compile_spec(SPEC, "cache_fault", cache_dir=tmp_path)
    originals = {k: (p / SOURCE).read_text() for k, p in entries(tmp_path).items()}
    FAULTS[fault](tmp_path, _entry_with(tmp_path, "tl.sigmoid("))
    mod = compile_spec(SPEC, "cache_fault2", cache_dir=tmp_path)
    assert {k: (p / SOURCE).read_text() for k, p in entries(tmp_path).items()} == originals
    assert all(KernelCache(tmp_path).valid(p) for p in entries(tmp_path).values())
    assert not leftovers(tmp_path)
    run_case(mod.act, {"M": 5, "D": 33})
    run_case(mod.norm, {"M": 5, "D": 33})
    again = compile_spec(SPEC, "cache_fault3", cache_dir=tmp_path)
    assert again.act.runner.cache.rebuilt == 0


def test_valid_json_that_is_not_an_object_is_never_trusted(tmp_path):
    cache = KernelCache(tmp_path)
    path = cache.get_or_create("key text", lambda: "x = 1\n")
    for text in ("[1, 2]", "3", '"s"', "null", "true"):
        (path / META).write_text(text)
        assert not cache.valid(path)
        (path / "tuned.json").write_text(text)
        assert cache.read_json(path, "tuned.json") == {}
    assert cache.get_or_create("key text", lambda: "x = 1\n") == path
    assert cache.valid(path) and cache.rebuilt == 1


def _compile_warned(src, tag, cache_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mod = compile_spec(src, tag, cache_dir=cache_dir)
        again = compile_spec(src, tag + "_again", cache_dir=cache_dir)
    said = [w for w in caught if issubclass(w.category, CacheWarning)]
    return mod, again, said


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_a_cache_directory_that_is_a_file_falls_back_to_a_temporary_one(tmp_path, where):
    """Not the user's file to delete: the process caches in a temporary directory instead, and
    says so once (not at every compile)."""
    f = tmp_path / "settings.txt"
    f.write_text("the user's file")
    root = f if where == "a file" else f / "cache"
    mod, again, said = _compile_warned(SPEC, "cache_unusable", root)
    assert len(said) == 1, [str(w.message) for w in said]
    msg = str(said[0].message)
    assert f"the kernel cache directory {root} cannot be used (a file stands where a directory must be)" in msg
    assert "OPFORGE_CACHE_DIR" in msg
    assert f.read_text() == "the user's file"
    cache = mod.act.runner.cache
    assert cache.root == fallback_root() and cache.fallback_reason
    assert entries(cache.root)
    run_case(mod.act, {"M": 3, "D": 9})
    run_case(again.norm, {"M": 3, "D": 9})


def test_a_read_only_cache_directory_falls_back(tmp_path, monkeypatch):
    """An empty directory this process may not write (simulated when the tests run as root,
    whom permissions do not stop)."""
    root = tmp_path / "ro"
    root.mkdir()
    if os.geteuid() == 0:
        real = cache_module.tempfile.mkstemp

        def mkstemp(*a, dir=None, **k):
            if dir is not None and Path(dir) == root:
                raise PermissionError(13, "Permission denied", str(dir))
            return real(*a, dir=dir, **k)
        monkeypatch.setattr(cache_module.tempfile, "mkstemp", mkstemp)
    else:
        root.chmod(0o555)
    try:
        mod, _, said = _compile_warned(SPEC, "cache_ro", root)
    finally:
        root.chmod(0o755)
    assert len(said) == 1 and "(it is not writable)" in str(said[0].message)
    assert not any(root.iterdir())
    run_case(mod.act, {"M": 4, "D": 5})


def test_a_cache_that_fails_while_writing_hands_over_to_the_temporary_one(tmp_path, monkeypatch):
    """A full disk or a directory made read-only after the cache was opened: the entry is
    written to the temporary cache, once, with the warning."""
    cache = KernelCache(tmp_path / "c")
    real = cache_module.tempfile.mkdtemp

    def mkdtemp(*a, dir=None, **k):
        if dir is not None and str(dir).startswith(str(tmp_path / "c")):
            raise OSError(28, "No space left on device")
        return real(*a, dir=dir, **k)
    monkeypatch.setattr(cache_module.tempfile, "mkdtemp", mkdtemp)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = cache.get_or_create("a key", lambda: "y = 2\n")
    assert path.is_relative_to(fallback_root()) and cache.valid(path)
    assert [str(w.message) for w in caught if "No space left" in str(w.message)]


def test_a_garbage_tuned_json_loses_only_the_tuning(tmp_path):
    """(The autotuner's side is in test_autotune.py.) Reading it gives {}; writing replaces it."""
    cache = KernelCache(tmp_path)
    path = cache.get_or_create("k", lambda: "z = 3\n")
    (path / "tuned.json").write_bytes(b"\x00\x01 not json")
    assert cache.read_json(path, "tuned.json") == {}
    cache.write_json(path, "tuned.json", {"a": 1})
    assert cache.read_json(path, "tuned.json") == {"a": 1}
    (path / "tuned.json").unlink()
    (path / "tuned.json").mkdir()
    cache.write_json(path, "tuned.json", {"b": 2})
    assert cache.read_json(path, "tuned.json") == {"b": 2}


# -- kill -9 in the middle of writing an entry --------------------------------------------------
KILLED_WRITER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import opforge
    from opforge.runtime import cache
    real = cache.os.replace
    def stall(src, dst):
        if Path(src).name.startswith("."):           # an entry's temporary directory, written
            Path(sys.argv[2]).write_text(str(src))
            time.sleep(600)                          # killed here, holding the entry's lock
        return real(src, dst)
    cache.os.replace = stall
    opforge.compile(sys.argv[1], namespace="killed")
""")


def test_a_compile_killed_while_writing_leaves_nothing_that_stops_the_next(tmp_path):
    """kill -9 while the entry is half written and its lock held: the lock dies with the
    process, the next compile builds the entry and removes the dead writer's directory."""
    import signal
    import time
    root = tmp_path / "cache"
    flag = tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, SPEC, str(flag)], env=child_env(root),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not flag.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < 240
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    dead = Path(flag.read_text())
    assert dead.is_dir() and leftovers(root)
    t1 = time.time()
    mod = compile_spec(SPEC, "cache_after_kill", cache_dir=root)
    assert time.time() - t1 < 120                     # no wait on a lock nobody holds
    assert not dead.exists() and not leftovers(root)
    assert all(KernelCache(root).valid(p) for p in entries(root).values())
    run_case(mod.act, {"M": 2, "D": 17})
    run_case(mod.norm, {"M": 2, "D": 17})


# -- several processes meeting the same damaged entries -------------------------------------------
def test_processes_finding_the_same_damage_rebuild_each_entry_once(tmp_path):
    compile_spec(SPEC, "cache_multi", cache_dir=tmp_path)
    n_entries = len(entries(tmp_path))
    for p in entries(tmp_path).values():
        _as_file(p)
    procs = [subprocess.Popen([sys.executable, "-c", CORRUPT_THEN_RUN, SPEC], env=child_env(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    # each process counts the entries it rebuilt ('act''s cache is shared by both ops)
    assert sum(int(out.split()[1]) for out, _ in results) == n_entries
    assert all(KernelCache(tmp_path).valid(p) for p in entries(tmp_path).values())
    assert not leftovers(tmp_path)


# -- the fault campaign: random faults, then compile and check ------------------------------------
CAMPAIGN_SEEDS = range(300) if os.environ.get("OPFORGE_LONG_CAMPAIGNS") == "1" else range(40)
DAMAGE_FAULTS = {f"damage: {how}": (lambda how: lambda root, e: _damage(e, how))(how) for how in DAMAGES}


@pytest.mark.parametrize("seed", CAMPAIGN_SEEDS)
def test_fault_campaign(tmp_path, seed):
    """Seeded: one to three faults (replaced entries, corrupt or truncated files, JSON that is
    not an object) on distinct random entries, then a compile in a new namespace must give the same
    entries and correct results. OPFORGE_LONG_CAMPAIGNS=1 runs 300 seeds."""
    import random
    rng = random.Random(seed)
    faults = {**FAULTS, **DAMAGE_FAULTS}
    compile_spec(SPEC, f"cache_campaign{seed}", cache_dir=tmp_path)
    originals = {k: (p / SOURCE).read_text() for k, p in entries(tmp_path).items()}
    chosen = []
    for _ in range(rng.randint(1, 3)):
        current = sorted(k for k in entries(tmp_path) if k not in {key for key, _ in chosen})
        if not current:
            break
        key, name = rng.choice(current), rng.choice(sorted(faults))
        faults[name](tmp_path, entries(tmp_path)[key])
        chosen.append((key, name))
        if "lock" in name:        # locks/ is shared: one fault of it at a time
            faults = {k: f for k, f in faults.items() if "lock" not in k}
    chosen = [name for _, name in chosen]
    mod = compile_spec(SPEC, f"cache_campaign{seed}_after", cache_dir=tmp_path)
    assert {k: (p / SOURCE).read_text() for k, p in entries(tmp_path).items()} == originals, chosen
    assert not leftovers(tmp_path), chosen
    sizes = {"M": rng.choice([1, 3, 8]), "D": rng.choice([1, 7, 33])}
    run_case(mod.act, sizes, seed=seed, what=f" after {chosen}")
    run_case(mod.norm, sizes, seed=seed, what=f" after {chosen}")
