"""The on-disk kernel cache: content-addressed, atomic, shared safely between processes.

An entry is a directory named by the SHA-256 of its key text (the level-2 kernel text, the
device's name and compute capability, and the Triton, PyTorch and opforge versions). It holds
the generated Triton source and a ``meta.json`` with the source's own hash, plus files the
autotuner adds (``tuned.json``). Entries are written to a temporary directory and renamed into
place under a file lock, so a reader never sees half an entry; an entry whose files are missing
or whose hash does not match is discarded and rebuilt, never trusted.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from filelock import FileLock
from platformdirs import user_cache_dir

SOURCE = "kernel.py"
META = "meta.json"


def cache_dir() -> Path:
    d = os.environ.get("OPFORGE_CACHE_DIR")
    path = Path(d) if d else Path(user_cache_dir("opforge"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class KernelCache:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else cache_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        self.rebuilt = 0   # entries found corrupt and rebuilt, for tests and reports

    def entry(self, key: str) -> Path:
        return self.root / key[:2] / key

    def lock(self, key: str) -> FileLock:
        (self.root / "locks").mkdir(exist_ok=True)
        return FileLock(str(self.root / "locks" / f"{key}.lock"))

    def valid(self, path: Path) -> bool:
        try:
            meta = json.loads((path / META).read_text())
            src = (path / SOURCE).read_text()
        except (OSError, ValueError):
            return False
        return meta.get("sha256") == digest(src)

    def get_or_create(self, key_text: str, make_source: Callable[[], str]) -> Path:
        """The entry's directory, creating (or repairing) it once across processes."""
        key = digest(key_text)
        path = self.entry(key)
        if self.valid(path):
            return path
        with self.lock(key):
            if self.valid(path):          # another process made it while we waited
                return path
            if path.exists():
                self.rebuilt += 1
                shutil.rmtree(path, ignore_errors=True)
            source = make_source()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key[:8]}-", dir=path.parent))
            (tmp / SOURCE).write_text(source)
            meta = {"sha256": digest(source), "created": time.time(), "key": key_text.splitlines()[:1]}
            (tmp / META).write_text(json.dumps(meta))
            os.replace(tmp, path)
            return path

    def read_json(self, path: Path, name: str) -> dict:
        try:
            return json.loads((path / name).read_text())
        except (OSError, ValueError):
            return {}

    def write_json(self, path: Path, name: str, data: dict) -> None:
        """Atomically replace a JSON file of an entry (autotuning results)."""
        key = path.name
        with self.lock(key):
            fd, tmp = tempfile.mkstemp(dir=path, prefix=f".{name}-")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path / name)
