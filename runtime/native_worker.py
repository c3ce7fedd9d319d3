"""Compiling one kernel for a GPU target with Triton, where no GPU need be present.

This is the half of runtime/native.py that touches Triton's compiler. It must run in a process
whose Triton was imported without TRITON_INTERPRET: under the interpreter, triton.language's own
@jit helpers (tl.zeros, tl.cdiv, ...) are interpreted functions and cannot be compiled. So on a
machine without a GPU (where opforge runs kernels through the interpreter) runtime/native.py
starts this module as worker processes with a clean environment:

    python -m opforge.runtime.native_worker      (one JSON job per line in, one result per line out)

On a GPU machine the same ``compile_job`` runs in-process.

The argument specialisation is Triton's own: the launcher's binder (create_function_from_signature
over the kernel's parameters, with the target's backend) sees stand-ins for the launch's arguments
(pointers 16-byte aligned, as CUDA allocations are; the integers the launch passes), so integers
equal to 1 become constexprs and divisibility by 16 is marked exactly as a launch would mark it.
Triton 3.6 and 3.9 share that binder, ``_pack_args`` and ``ASTSource(fn, signature, constexprs,
attrs)``; ``_launch_kwargs`` adds the options each version's ``run`` adds.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_modules: dict[str, object] = {}


class _Pointer:
    """What the binder needs of a tensor argument: its dtype and an address (16-byte aligned,
    as CUDA allocations are, unless the launch's tensor was not)."""

    def __init__(self, dtype, aligned: bool = True):
        self.dtype = dtype
        self.address = (1 << 20) + (0 if aligned else 2)

    def data_ptr(self) -> int:
        return self.address


def _load(source: str):
    mod = _modules.get(source)
    if mod is None:
        name = f"opforge_native_{abs(hash(source)):x}"
        spec = importlib.util.spec_from_file_location(name, source)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        _modules[source] = mod
    return mod


def _arg(spec):
    import torch
    kind, value = spec[:2]
    if kind == "ptr":
        return _Pointer(getattr(torch, value), spec[2] if len(spec) > 2 else True)
    if kind == "float":
        return float(value)
    if kind == "bool":
        return bool(value)
    return int(value)


def _launch_kwargs(job) -> dict:
    """The keyword arguments JITFunction.run passes to the binder (options differ by version)."""
    from triton import knobs
    kw = dict(job["constexprs"])
    kw.update(num_warps=job["num_warps"], num_stages=job["num_stages"], debug=bool(knobs.runtime.debug))
    if job.get("maxnreg") is not None:
        kw["maxnreg"] = job["maxnreg"]
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, name):
            kw[name] = getattr(knobs.compilation, name)
    return kw


def bin_dir() -> Path:
    import triton
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def sass_of(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(bin_dir() / "cuobjdump"), "-sass", f.name], check=True,
                              capture_output=True, text=True).stdout


def compile_job(job: dict) -> dict:
    """{ok, error, shared, ptxas_log, asm: {ttgir, ptx, sass}, seconds} for one kernel."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    t0 = time.perf_counter()
    try:
        fn = getattr(_load(job["source"]), job["kernel"])
        target = GPUTarget("cuda", job["capability"], 32)
        backend = make_backend(target)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        kwargs = _launch_kwargs(job)
        bound, specialization, options = binder(*[_arg(a) for a in job["args"]], **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        log = io.StringIO()
        with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True
            knobs.compilation.always_compile = True     # the ptxas log prints only when ptxas runs
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                    options=options.__dict__)
        asm = {"ttgir": kernel.asm["ttgir"], "ptx": kernel.asm["ptx"], "sass": sass_of(kernel.asm["cubin"])}
        meta = kernel.metadata
        return {"ok": True, "error": "", "shared": int(meta.shared), "ptxas_log": log.getvalue(), "asm": asm,
                "signature": {k: str(v) for k, v in signature.items()},
                "seconds": time.perf_counter() - t0}
    except Exception as e:       # a kernel that fails to compile is a result, not a crash
        msg = str(e)
        return {"ok": False, "error": f"{type(e).__name__}: {msg}", "shared": 0, "ptxas_log": "", "asm": {},
                "seconds": time.perf_counter() - t0}


def main() -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    out = sys.stdout
    sys.stdout = sys.stderr          # stray prints of Triton must not corrupt the protocol
    for line in sys.stdin:
        if not line.strip():
            continue
        result = compile_job(json.loads(line))
        out.write(json.dumps(result) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
