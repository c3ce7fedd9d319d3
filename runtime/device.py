"""Where kernels run: natively on a CUDA GPU, or through Triton's interpreter on the CPU.

The interpreter is chosen when no GPU is present (or OPFORGE_INTERPRET=1). It must be chosen
before a generated module is imported, because triton.jit reads TRITON_INTERPRET when it
decorates a function. Choosing it also installs opforge's bf16 corrections to the
interpreter (runtime/interpreter_patches.py).
"""
from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=1)
def interpreting() -> bool:
    forced = os.environ.get("OPFORGE_INTERPRET")
    if forced is not None and forced != "":
        on = forced != "0"
    else:
        on = not torch.cuda.is_available()
    if on:
        os.environ["TRITON_INTERPRET"] = "1"
        from . import interpreter_patches
        interpreter_patches.apply()
    return on


def kernel_device() -> torch.device:
    return torch.device("cpu") if interpreting() else torch.device("cuda")


@functools.lru_cache(maxsize=1)
def device_key() -> str:
    """What a cache key must know of the machine: the GPU and its compute capability, or the
    interpreter; and the versions of Triton, PyTorch and opforge."""
    import triton
    from .. import __version__
    if interpreting():
        dev = "triton-interpreter"
    else:
        cap = torch.cuda.get_device_capability()
        dev = f"{torch.cuda.get_device_name()} sm_{cap[0]}{cap[1]}"
    return f"device={dev} triton={triton.__version__} torch={torch.__version__} opforge={__version__}"


def describe() -> str:
    if interpreting():
        return "Triton interpreter on the CPU (no GPU found)" if not torch.cuda.is_available() \
            else "Triton interpreter on the CPU (OPFORGE_INTERPRET=1)"
    return f"Triton on {torch.cuda.get_device_name()}"
