"""Compiled plans on disk: a warm ``opforge.compile`` skips parsing, the passes and lowering.

The kernel cache (cache.py) keeps each kernel's generated source; this keeps, per compile, what
came before it: every op's prepared graph, its fusion groups and its level-2 plan, pickled into
``plans/<key>.pkl`` in the same cache directory. Each op's fusion groups and plan are pickled
on their own inside it (:class:`Deferred`): a warm compile unpickles the graphs, which register
the ops, and an op's plan at its first use, so a file of six ops called once costs one plan. A
binding of a dtype-generic op, compiled at its first call, is stored in a file of its own
(:func:`binding_key`). The key is everything the result depends on:
the spec text and its name, the namespace, ``dtype``, the ops asked for, what the lowering reads
of the machine (fp8 dots native or emulated), and opforge's own code (the size and modification
time of every source file of the package, so an edited checkout never reuses a stale plan).
Files are written to a temporary name and renamed into place (a reader never sees half a file);
one that cannot be read back (truncated, from another Python, not ours) is compiled again and
replaced; a directory that cannot be written only loses the saving. OPFORGE_PLAN_CACHE=0 turns it
off (the test suite does, so its patches of the passes are never bypassed; its own tests turn it
on).
"""
from __future__ import annotations

import functools
import gc
import hashlib
import os
import pickle
import tempfile
from pathlib import Path

FORMAT = 2
DIRECTORY = "plans"


def enabled() -> bool:
    return os.environ.get("OPFORGE_PLAN_CACHE", "1") != "0"


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """opforge's own code: the path, size and modification time of each of its source files."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for folder in ("", "ir", "frontend", "passes", "codegen", "runtime"):
        d = root / folder
        with os.scandir(d) as it:
            for e in sorted(it, key=lambda e: e.name):
                if e.name.endswith((".py", ".lark")) and e.is_file():
                    st = e.stat()
                    h.update(f"{folder}/{e.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def key(text: str, name: str, namespace: str | None, dtype, ops) -> str:
    from ..ir.fp8 import _detected
    from .. import __version__
    parts = (FORMAT, __version__, text, name, namespace, str(dtype), tuple(ops) if ops else None,
             _detected(), code_digest())
    return hashlib.sha256(repr(parts).encode()).hexdigest()


class _NoCollection:
    """Unpickling a plan makes many small objects: collections cost 10x the load."""

    def __enter__(self):
        self.enabled = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc):
        if self.enabled:
            gc.enable()


class Deferred:
    """One op's prepared graph, fusion groups and plan, pickled on their own inside a stored
    compile; ``load()`` gives ``(graph, fused, plan)`` (runtime/module.CompiledOp._load)."""
    __slots__ = ("blob",)

    def __init__(self, blob: bytes):
        self.blob = blob

    def __getstate__(self):
        return self.blob

    def __setstate__(self, blob):
        self.blob = blob

    def load(self):
        with _NoCollection():
            return pickle.loads(self.blob)


def _deferred(ops):
    """``(name, graph, fused, plan)`` with the fused graph and plan pickled apart (scan ops,
    whose fused is None and plan their pieces, are kept whole)."""
    return [(name, g, fused, plan) if fused is None or isinstance(fused, Deferred)
            else (name, g, Deferred(pickle.dumps((g, fused, plan), protocol=pickle.HIGHEST_PROTOCOL)), None)
            for name, g, fused, plan in ops]


def binding_key(k: str, name: str) -> str:
    """The key of one binding of a dtype-generic op, compiled at its first call (after the
    compile's own plans were stored) and stored on its own."""
    return hashlib.sha256(f"{k}:{name}".encode()).hexdigest()


def load(root: Path, k: str):
    """The stored compile for key ``k``, or None (missing or unreadable)."""
    path = root / DIRECTORY / f"{k}.pkl"
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    try:
        with _NoCollection():
            data = pickle.loads(raw)
    except Exception:   # truncated, another version's classes, not a pickle at all
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("key") != k:
        return None
    return data


def store(root: Path, k: str, data: dict) -> None:
    """Write atomically; a failure only loses the saving."""
    d = root / DIRECTORY
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{k}-")
        with os.fdopen(fd, "wb") as f:
            pickle.dump({**data, "ops": _deferred(data["ops"]), "format": FORMAT, "key": k}, f,
                        protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, d / f"{k}.pkl")
    except (OSError, pickle.PicklingError, TypeError, AttributeError):
        try:
            os.unlink(tmp)  # noqa: F821  (bound when mkstemp succeeded)
        except (OSError, NameError, UnboundLocalError):
            pass
