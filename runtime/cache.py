"""The on-disk kernel cache: content-addressed, atomic, shared safely between processes.

An entry is a directory named by the SHA-256 of its key text (the level-2 kernel text, the
device's name and compute capability, and the Triton, PyTorch and opforge versions). It holds
the generated Triton source and a ``meta.json`` with the source's own hash, plus files the
autotuner adds (``tuned.json``). Entries are written to a temporary directory and renamed into
place under a file lock, so a reader never sees half an entry; an entry whose files are missing
or whose hash does not match is discarded and rebuilt, never trusted.

Faults are repaired, not reported on every compile: whatever stands where the cache expects a
directory (an entry, its shard ``xx/``, ``locks/``) or a file (a lock, ``meta.json``) and is not
one is removed and made again; a ``meta.json`` or ``tuned.json`` that is not a JSON object is
ignored like a corrupt one; the temporary directories of a writer killed mid-write are removed
by the next writer of that entry (it holds the entry's lock, so they are stale). A cache
directory that cannot be used at all (OPFORGE_CACHE_DIR names a file or a path under one, or a
directory this process cannot write) is not the user's to repair: the process then uses a
temporary directory, removed at exit, and says so once with a :class:`CacheWarning`.
"""
from __future__ import annotations

import atexit
import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from platformdirs import user_cache_dir

if TYPE_CHECKING:
    from filelock import FileLock

SOURCE = "kernel.py"
META = "meta.json"


class CacheWarning(UserWarning):
    """The kernel cache directory cannot be used; a temporary one stands in for it."""


class CacheError(RuntimeError):
    """No kernel cache can be used at all, not even a temporary one."""


def cache_dir() -> Path:
    """OPFORGE_CACHE_DIR, else the user's cache directory (not created here)."""
    d = os.environ.get("OPFORGE_CACHE_DIR")
    return Path(d) if d else Path(user_cache_dir("opforge"))


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _reason(e: OSError) -> str:
    if isinstance(e, (FileExistsError, NotADirectoryError)) or e.errno in (errno.EEXIST, errno.ENOTDIR):
        return "a file stands where a directory must be"
    if isinstance(e, PermissionError) or e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "it is not writable"
    return e.strerror or str(e)


def unusable(root: Path) -> str | None:
    """Why ``root`` cannot hold a cache (None if it can): it is made if missing, and a file is
    written and removed in it."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=root, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return _reason(e)
    return None


_fallback: Path | None = None
_warned: set[str] = set()


def fallback_root() -> Path:
    """This process's temporary cache (one per process, removed at exit)."""
    global _fallback
    if _fallback is None or unusable(_fallback):
        try:
            _fallback = Path(tempfile.mkdtemp(prefix="opforge-cache-"))
        except OSError as e:
            raise CacheError(f"opforge: no kernel cache can be used: the temporary directory "
                             f"{tempfile.gettempdir()} fails too ({_reason(e)}); set OPFORGE_CACHE_DIR "
                             f"to a writable directory") from None
        atexit.register(shutil.rmtree, str(_fallback), True)
    return _fallback


def _remove(path: Path) -> None:
    """Whatever is at ``path`` (a directory, a file, a link), gone; missing is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        shutil.rmtree(path, ignore_errors=True)


def _directory(path: Path) -> Path:
    """``path`` as a directory of the cache, replacing anything else that stands there."""
    if not path.is_dir() or path.is_symlink():
        if path.exists() or path.is_symlink():
            _remove(path)
        path.mkdir(parents=True, exist_ok=True)
    return path


class KernelCache:
    def __init__(self, root: Path | None = None):
        self.requested = Path(root) if root is not None else cache_dir()
        self.root = self.requested
        self.rebuilt = 0   # entries found corrupt and rebuilt, for tests and reports
        self.fallback_reason: str | None = None
        why = unusable(self.root)
        if why:
            self._fall_back(why)

    def _fall_back(self, why: str) -> None:
        """Use this process's temporary cache from now on; say so once per directory."""
        self.fallback_reason = why
        self.root = fallback_root()
        if str(self.requested) not in _warned:
            _warned.add(str(self.requested))
            warnings.warn(f"opforge: the kernel cache directory {self.requested} cannot be used ({why}); "
                          f"this process caches its kernels in {self.root} instead, removed at exit. Set "
                          f"OPFORGE_CACHE_DIR to a writable directory to keep them.", CacheWarning, stacklevel=3)

    def entry(self, key: str) -> Path:
        return self.root / key[:2] / key

    def lock(self, key: str) -> FileLock:
        path = _directory(self.root / "locks") / f"{key}.lock"
        if path.is_dir() and not path.is_symlink():
            _remove(path)
        # OPFORGE_CACHE_LOCK=soft: lock files by existence, for a cache on a network filesystem
        # whose flock is missing or unreliable (a cluster's shared storage)
        soft = os.environ.get("OPFORGE_CACHE_LOCK", "") == "soft"
        from filelock import FileLock, SoftFileLock     # here: a warm compile takes no lock (11 ms to import)
        return (SoftFileLock if soft else FileLock)(str(path))

    def valid(self, path: Path) -> bool:
        try:
            meta = json.loads((path / META).read_text())
            src = (path / SOURCE).read_text()
        except (OSError, ValueError):
            return False
        return isinstance(meta, dict) and meta.get("sha256") == digest(src)

    def get_or_create(self, key_text: str, make_source: Callable[[], str]) -> Path:
        """The entry's directory, creating (or repairing) it once across processes. A cache
        that fails while the entry is written (made read-only since, a full disk) hands over to
        the temporary cache, once."""
        try:
            return self._get_or_create(key_text, make_source)
        except OSError as e:
            if self.root == _fallback:
                raise CacheError(f"opforge: the kernel cache {self.root} failed: {_reason(e)}") from None
            self._fall_back(_reason(e))
            return self._get_or_create(key_text, make_source)

    def _get_or_create(self, key_text: str, make_source: Callable[[], str]) -> Path:
        key = digest(key_text)
        path = self.entry(key)
        if self.valid(path):
            return path
        with self.lock(key):
            if self.valid(path):          # another process made it while we waited
                return path
            shard = _directory(path.parent)
            if path.exists() or path.is_symlink():
                self.rebuilt += 1
                _remove(path)
            for stale in shard.glob(f".{key}-*"):   # a writer of this entry killed mid-write
                _remove(stale)
            source = make_source()
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=shard))
            (tmp / SOURCE).write_text(source)
            meta = {"sha256": digest(source), "created": time.time(), "key": key_text.splitlines()[:1]}
            (tmp / META).write_text(json.dumps(meta))
            os.replace(tmp, path)
            return path

    def read_json(self, path: Path, name: str) -> dict:
        """A JSON object stored in an entry; {} if it is missing, unreadable, or not an object."""
        try:
            data = json.loads((path / name).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_json(self, path: Path, name: str, data: dict) -> None:
        """Atomically replace a JSON file of an entry (autotuning results). A failure to write
        loses only the persisted result (reported once as a CacheWarning), never the call."""
        key = path.name
        try:
            with self.lock(key):
                for stale in path.glob(f".{name}-*"):
                    _remove(stale)
                target = path / name
                if target.is_dir() and not target.is_symlink():
                    _remove(target)
                fd, tmp = tempfile.mkstemp(dir=path, prefix=f".{name}-")
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                os.replace(tmp, target)
        except OSError as e:
            if f"write {path}" not in _warned:
                _warned.add(f"write {path}")
                warnings.warn(f"opforge: could not store {name} in the kernel cache entry {path} "
                              f"({_reason(e)}); the result is kept for this process only", CacheWarning,
                              stacklevel=3)
