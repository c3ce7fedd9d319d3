"""opforge: compile model specs written in a small language (.opf) into fused Triton kernels,
registered as PyTorch operators.

    import opforge
    mod = opforge.compile("examples/llama.opf")
    y = mod.rms_norm(x, w)
"""
from __future__ import annotations

if __name__ != "opforge":
    # The repository root is the package; a test runner that imports it under the checkout's
    # folder name would load a second copy of every module (two registries, two SpecError
    # classes). Hand it the installed package instead.
    import importlib as _importlib
    import sys as _sys
    _sys.modules[__name__] = _importlib.import_module("opforge")
else:
    __version__ = "0.1.0"
    __all__ = ["compile", "load", "save_exported", "load_exported", "SpecError", "CallError", "CacheWarning", "CacheError", "__version__"]

    def __getattr__(name: str):
        """SpecError, CallError, CacheError and CacheWarning on first use: importing them loads the front end and torch,
        which ``import opforge`` (and so ``opforge --help``) does not need."""
        if name == "SpecError":
            from .frontend.diagnostics import SpecError
            return SpecError
        if name == "CallError":
            from .runtime.binding import CallError
            return CallError
        if name in ("CacheError", "CacheWarning"):
            from .runtime import cache
            return getattr(cache, name)
        raise AttributeError(f"module 'opforge' has no attribute '{name}'")

    def load(path_or_source, namespace: str | None = None):
        """Parse and check a spec: the level-1 Program (no kernels)."""
        from .frontend import load_program
        return load_program(path_or_source, namespace)

    def save_exported(ep, path) -> None:
        """torch.export.save with the specs of the opforge ops the program calls, so that
        load_exported(path) works in a new process (runtime/export.py)."""
        from .runtime.export import save
        save(ep, path)

    def load_exported(path):
        """Compile the specs stored by save_exported, then torch.export.load the program."""
        from .runtime.export import load
        return load(path)

    def compile(path_or_source, namespace: str | None = None, **options):
        """Compile a spec: a module whose attributes are the ops, each a registered torch op."""
        from .runtime.module import compile_module
        return compile_module(path_or_source, namespace, **options)
