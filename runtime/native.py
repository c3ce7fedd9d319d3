"""Native compilation without a GPU: a level-2 kernel, at a config and bound sizes, compiled by
Triton for a target (runtime/targets.py) to TTGIR, PTX and a cubin, and what the compiler says
of it: registers, spills, stack and shared memory, the tensor-core and load instructions in the
SASS, and ptxas's warnings.

The kernel is the runtime's own generated module (its cache entry's ``kernel.py``, as
runtime/loader.py loads it) and the arguments are those runtime/executor.py would pass at these
sizes: every tensor contiguous and 16-byte aligned, sizes and strides their values, so Triton's
launcher specialises exactly as on the GPU (integers equal to 1 become constexprs, divisibility
by 16 is marked). Host scalars, whose values depend on the call, are passed as 0.5 / 7 / True:
floats are never specialised, and 7 is neither 1 nor a multiple of 16.

Compiling happens in runtime/native_worker.py: in worker processes with a clean environment
where this process runs kernels through the interpreter (Triton cannot compile once the
interpreter has built triton.language), in-process on a GPU. Results are cached on disk next to
the kernel cache (``<cache>/native/``), keyed by the source, the arguments, the config, the
target and the Triton version; a rerun of a sweep reads them back in milliseconds.
"""
from __future__ import annotations

import gzip
import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

from ..ir.dims import evaluate
from ..ir.tile import TileKernel
from ..ir.torch_dtypes import to_torch
from .cache import SOURCE, KernelCache, digest
from .config import Config
from .targets import Target, target as target_of

STAGES = ("ttgir", "ptx", "sass")
NATIVE_VERSION = "1"

# SASS opcodes of the tensor cores: mma.sync (HMMA/IMMA; fp8 mma.sync on sm_89 is QMMA), Hopper's
# warpgroup MMA (wgmma: HGMMA f16/bf16/tf32, IGMMA int8, QGMMA fp8) and Blackwell's tcgen05
TENSOR_CORE_OPS = ("HMMA", "IMMA", "QMMA", "HGMMA", "IGMMA", "QGMMA", "UTCHMMA", "UTCIMMA", "UTCQMMA", "UTCOMMA")
WGMMA_OPS = ("HGMMA", "IGMMA", "QGMMA")
# global loads that bypass registers: cp.async (LDGSTS) and the tensor memory accelerator (UTMALDG)
ASYNC_LOAD_OPS = {"LDGSTS": "cp.async", "UTMALDG": "TMA"}


@dataclass(frozen=True)
class Resources:
    registers: int
    spill_stores: int          # bytes
    spill_loads: int           # bytes
    stack: int                 # bytes of stack frame
    shared: int                # bytes: Triton's dynamic shared memory plus ptxas's static
    num_warps: int
    tensor_cores: tuple[str, ...] = ()   # SASS opcodes, in TENSOR_CORE_OPS order
    loads: tuple[str, ...] = ()          # "cp.async", "TMA"
    warnings: tuple[str, ...] = ()       # ptxas warnings, as printed

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    @property
    def wgmma(self) -> bool:
        return any(op in WGMMA_OPS for op in self.tensor_cores)

    def tensor_core_text(self) -> str:
        return "+".join(self.tensor_cores) or "-"


@dataclass
class NativeResult:
    kernel: str
    target: str
    config: Config
    ok: bool
    error: str = ""
    resources: Resources | None = None
    seconds: float = 0.0
    cached: bool = False
    entry: Path | None = None

    def stage(self, name: str) -> str:
        """The text of a stage (ttgir, ptx, sass), read from the disk cache."""
        if name not in STAGES:
            raise ValueError(f"unknown native stage {name!r}; the stages are {', '.join(STAGES)}")
        if self.entry is None:
            return ""
        with gzip.open(self.entry.with_suffix(".stages.gz"), "rt") as f:
            return json.load(f).get(name, "")

    def problems(self, tgt: Target) -> list[str]:
        """Why this kernel must not ship for the target: empty when it compiles, does not spill
        and fits the target's shared memory."""
        if not self.ok:
            return [f"does not compile: {self.error.splitlines()[0] if self.error else 'unknown error'}"]
        r = self.resources
        out = []
        if r.spills:
            out.append(f"spills {r.spill_stores} B stores / {r.spill_loads} B loads")
        if r.shared > tgt.shared_memory:
            out.append(f"needs {r.shared} B of shared memory, over the {tgt.shared_memory} B of {tgt.name} "
                       f"({tgt.product})")
        return out


# -- reading the compiler's output ----------------------------------------------------------------
PTXAS_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_REGS = re.compile(r"Used (\d+) registers")
PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
SASS_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_]*)")


def parse_ptxas(log: str) -> dict:
    """registers, spill stores/loads, stack and static shared memory, and the warnings, from
    ``ptxas -v`` output (one kernel)."""
    props = PTXAS_PROPS.search(log)
    regs = PTXAS_REGS.search(log)
    smem = PTXAS_SMEM.search(log)
    warnings = [line.strip() for line in log.splitlines() if "warning" in line.lower()]
    return {"registers": int(regs.group(1)) if regs else 0,
            "stack": int(props.group(1)) if props else 0,
            "spill_stores": int(props.group(2)) if props else 0,
            "spill_loads": int(props.group(3)) if props else 0,
            "static_shared": int(smem.group(1)) if smem else 0,
            "warnings": warnings}


def sass_opcodes(sass: str) -> Counter:
    """How many times each opcode (without its modifiers) appears in a SASS listing."""
    return Counter(m.group(1) for m in SASS_OP.finditer(sass))


def resources_of(result: dict, num_warps: int) -> Resources:
    p = parse_ptxas(result["ptxas_log"])
    ops = sass_opcodes(result["asm"].get("sass", ""))
    return Resources(registers=p["registers"], spill_stores=p["spill_stores"], spill_loads=p["spill_loads"],
                     stack=p["stack"], shared=result["shared"] + p["static_shared"], num_warps=num_warps,
                     tensor_cores=tuple(op for op in TENSOR_CORE_OPS if ops[op]),
                     loads=tuple(name for op, name in ASYNC_LOAD_OPS.items() if ops[op]),
                     warnings=tuple(p["warnings"]))


# -- jobs -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    kernel: TileKernel
    config: Config
    target: Target
    args: tuple                  # ((kind, value), ...) per kernel parameter
    source: Path                 # the kernel's generated module in the kernel cache

    def payload(self) -> dict:
        p = {"source": str(self.source), "kernel": self.kernel.name, "args": [list(a) for a in self.args],
             "constexprs": self.config.as_dict(), "num_warps": self.config.num_warps,
             "num_stages": self.config.num_stages, "capability": self.target.capability}
        if self.config.maxnreg is not None:       # absent otherwise: earlier keys stay valid
            p["maxnreg"] = self.config.maxnreg
        return p

    def key(self) -> str:
        import triton
        p = self.payload()
        p.pop("source")
        return digest(f"opforge native {NATIVE_VERSION} triton={triton.__version__}\n{json.dumps(p, sort_keys=True)}\n"
                      f"{self.source.read_text()}")


def contiguous_strides(shape: list[int]) -> list[int]:
    out, n = [], 1
    for d in reversed(shape):
        out.append(n)
        n *= max(int(d), 1)
    return out[::-1]


def launch_args(k: TileKernel, buffers: Mapping, bindings: Mapping[str, int]) -> tuple:
    """The arguments a launch passes, as the binder sees them: ("ptr", torch dtype name) for
    tensors, ("int", value) for sizes and strides, stand-in values for host scalars."""
    out = []
    for p in k.params:
        if p.kind == "ptr":
            out.append(("ptr", str(to_torch(buffers[p.buffer].dtype)).removeprefix("torch.")))
        elif p.kind == "stride":
            shape = [evaluate(d, bindings) for d in buffers[p.buffer].shape]
            out.append(("int", contiguous_strides(shape)[p.axis]))
        elif p.kind == "size":
            out.append(("int", int(evaluate(p.dim, bindings))))
        elif p.dtype.is_float:
            out.append(("float", 0.5))
        elif p.dtype.is_bool:
            out.append(("bool", True))
        else:
            out.append(("int", 7))
    return tuple(out)


def call_args(args) -> tuple:
    """The binder's view of a real launch's arguments (the autotuner on a GPU): tensors by dtype
    and whether their address is 16-byte aligned, numbers as they are."""
    out = []
    for a in args:
        if hasattr(a, "data_ptr"):
            out.append(("ptr", str(a.dtype).removeprefix("torch."), a.data_ptr() % 16 == 0))
        elif isinstance(a, bool):
            out.append(("bool", a))
        elif isinstance(a, float):
            out.append(("float", a))
        else:
            out.append(("int", int(a)))
    return tuple(out)


def call_job(k: TileKernel, cfg: Config, tgt: Target, args, entry: Path) -> Job:
    return Job(k, cfg, tgt, call_args(args), entry / SOURCE)


def make_job(k: TileKernel, cfg: Config, tgt: Target | str, buffers: Mapping, bindings: Mapping[str, int],
             cache: KernelCache) -> Job:
    from .loader import kernel_key, source_of
    tgt = target_of(tgt) if isinstance(tgt, str) else tgt
    source = source_of(k)
    entry = cache.get_or_create(kernel_key(k, source), lambda: source)
    return Job(k, cfg, tgt, launch_args(k, buffers, bindings), entry / SOURCE)


# -- compiling, cached ------------------------------------------------------------------------------
class NativeCompiler:
    """Compiles jobs (in parallel worker processes where this process interprets), caching
    every result on disk."""

    def __init__(self, cache: KernelCache, workers: int | None = None):
        self.cache = cache
        # OPFORGE_NATIVE_CACHE_DIR keeps compiled results across kernel caches (the test suite
        # makes a fresh kernel cache per session; the CI sweep reuses its compiles)
        forced = os.environ.get("OPFORGE_NATIVE_CACHE_DIR")
        self.root = Path(forced) if forced else cache.root / "native"
        self.workers = workers or int(os.environ.get("OPFORGE_NATIVE_WORKERS", "0") or 0) or (os.cpu_count() or 1)

    def _paths(self, key: str) -> tuple[Path, Path]:
        d = self.root / key[:2]
        return d / f"{key}.json", d / f"{key}.stages.gz"

    def cached(self, job: Job) -> NativeResult | None:
        record, stages = self._paths(job.key())
        try:
            data = json.loads(record.read_text())
        except (OSError, ValueError):
            return None
        if not stages.exists():
            return None
        res = Resources(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["resources"].items()}) \
            if data["resources"] else None
        return NativeResult(job.kernel.name, job.target.name, job.config, data["ok"], data["error"], res,
                            data["seconds"], True, record)

    def _store(self, job: Job, raw: dict) -> NativeResult:
        res = resources_of(raw, job.config.num_warps) if raw["ok"] else None
        record, stages = self._paths(job.key())
        record.parent.mkdir(parents=True, exist_ok=True)
        _atomic(stages, gzip.compress(json.dumps(raw.get("asm", {})).encode(), 6))
        data = {"ok": raw["ok"], "error": raw["error"], "seconds": raw["seconds"],
                "resources": asdict(res) if res else None, "ptxas_log": raw.get("ptxas_log", ""),
                "kernel": job.kernel.name, "target": job.target.name, "config": str(job.config)}
        _atomic(record, json.dumps(data, indent=1).encode())
        return NativeResult(job.kernel.name, job.target.name, job.config, raw["ok"], raw["error"], res,
                            raw["seconds"], False, record)

    def compile(self, jobs: Iterable[Job],
                progress: Callable[[NativeResult], None] | None = None) -> list[NativeResult]:
        jobs = list(jobs)
        results: list[NativeResult | None] = [None] * len(jobs)
        todo: dict[str, list[int]] = {}
        for i, job in enumerate(jobs):
            hit = self.cached(job)
            if hit is not None:
                results[i] = hit
                if progress:
                    progress(hit)
            else:
                todo.setdefault(job.key(), []).append(i)
        if todo:
            firsts = [idx[0] for idx in todo.values()]
            for i, raw in self._run([jobs[i] for i in firsts], firsts):
                res = self._store(jobs[i], raw)
                for j in todo[jobs[i].key()]:
                    results[j] = res
                    if progress:
                        progress(res)
        return results

    def _run(self, jobs: list[Job], ids: list[int]):
        """(id, raw result) as each job finishes."""
        from .device import interpreting
        if not interpreting():
            from .native_worker import compile_job
            for i, job in zip(ids, jobs):
                yield i, compile_job(job.payload())
            return
        work: queue.Queue = queue.Queue()
        for item in zip(ids, jobs):
            work.put(item)
        done: queue.Queue = queue.Queue()
        n = max(1, min(self.workers, len(jobs)))
        threads = [threading.Thread(target=_serve, args=(work, done), daemon=True) for _ in range(n)]
        for t in threads:
            t.start()
        for _ in jobs:
            item = done.get()
            if isinstance(item, BaseException):
                raise item
            yield item
        for t in threads:
            t.join()


def _worker_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OPFORGE_INTERPRET")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # Triton 3.9 warns when unset; 1 is its default
    return env


def _serve(work: queue.Queue, done: queue.Queue) -> None:
    """One worker process, fed jobs from the queue until it is empty."""
    with tempfile.TemporaryDirectory(prefix="opforge-triton-") as tmp:
        env = {**_worker_env(), "TRITON_CACHE_DIR": tmp}

        def start():
            return subprocess.Popen([sys.executable, "-m", "opforge.runtime.native_worker"], env=env, text=True,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        proc = start()
        try:
            while True:
                try:
                    i, job = work.get_nowait()
                except queue.Empty:
                    break
                try:
                    proc.stdin.write(json.dumps(job.payload()) + "\n")
                    proc.stdin.flush()
                    line = proc.stdout.readline()
                except OSError:
                    line = ""
                if line:
                    done.put((i, json.loads(line)))
                    continue
                # the compiler crashed the worker: a failure of this kernel; a new worker goes on
                done.put((i, {"ok": False, "error": f"the compiler crashed (exit {proc.wait()})", "shared": 0,
                              "ptxas_log": "", "asm": {}, "seconds": 0.0}))
                proc = start()
        except BaseException as e:      # the caller must not wait forever on this thread's jobs
            done.put(e)
        finally:
            if proc.stdin:
                proc.stdin.close()
            proc.wait()


def _atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
