"""Exported programs that load in a new process.

``torch.export.save`` writes an opforge op as a call of ``torch.ops.<namespace>.<op>``; a new
process has no such op until the spec is compiled again, so a plain ``torch.export.load`` fails
there ("We ran into an error when deserializing the saved file"). ``save(ep, path)`` writes the
program with, in its extra files, the spec text and compile options of every opforge namespace
it calls; ``load(path)`` compiles those specs (kernels come from the cache when it is warm) and
then loads the program.

What cannot be restored is refused by name at ``save``: the packed variant of a bound layer
(``bind()``), whose kernels depend on the packed weights' shapes and layouts chosen at bind time
(bind the layer again in the new process, then ``torch.export.load``), and ops compiled with
registration modes other than the default under a spec that is no longer known.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch

from .binding import CallError

EXTRA = "opforge.json"
_ORIGINS: dict[str, dict] = {}      # namespace -> how its spec was compiled (compile_module)


def remember(namespace: str, source_text: str, source_name: str, dtype, ops, registration) -> None:
    """Called by compile_module: what ``save`` writes for this namespace."""
    entry = _ORIGINS.setdefault(namespace, {"source": source_text, "name": source_name,
                                            "dtype": None if dtype is None else str(dtype),
                                            "ops": [], "registration": registration})
    if entry["source"] != source_text:          # the spec compiled again, changed
        entry.update(source=source_text, ops=[], dtype=None if dtype is None else str(dtype))
    entry["ops"] = sorted(set(entry["ops"]) | set(ops))


def _called_ops(ep) -> set[tuple[str, str]]:
    out = set()
    for _, mod in ep.graph_module.named_modules():      # the root module first
        for node in getattr(getattr(mod, "graph", None), "nodes", ()):
            target = node.target
            if isinstance(target, torch._ops.OpOverload):
                ns, _, rest = target.name().partition("::")
                out.add((ns, rest.split(".")[0]))
    return out


def save(ep, path) -> None:
    """``torch.export.save`` with the specs of the opforge ops ``ep`` calls."""
    from .library import _IMPLS
    specs = {}
    for ns, name in sorted(_called_ops(ep)):
        qual = f"{ns}::{name}"
        if qual not in _IMPLS:
            continue                             # not an opforge op
        op = _IMPLS[qual]
        if ns not in _ORIGINS:
            raise CallError(f"opforge.save_exported: {qual} was not compiled by opforge.compile in this process")
        if op.variant_of is not None:
            raise CallError(f"opforge.save_exported: {qual} is a bound layer's packed variant; its kernels depend "
                            f"on the packed weights, so it cannot be restored from the spec: export the dense op, "
                            f"or bind the layer again in the loading process before torch.export.load")
        specs[ns] = _ORIGINS[ns]
    torch.export.save(ep, path, extra_files={EXTRA: json.dumps(specs)})


def _extra(path) -> dict:
    with zipfile.ZipFile(path) as z:
        for member in z.namelist():
            if member.endswith(f"extra/{EXTRA}"):
                return json.loads(z.read(member).decode())
    raise CallError(f"opforge.load_exported: {path} holds no opforge specs; save it with "
                    f"opforge.save_exported(ep, path), or compile its specs before torch.export.load")


def load(path):
    """Compile the specs ``save`` stored with the program (same namespaces and options), then
    ``torch.export.load`` it. Returns the ExportedProgram."""
    from .module import compile_module
    for ns, spec in _extra(path).items():
        compile_module(spec["source"], ns, dtype=spec["dtype"], registration=spec["registration"])
    return torch.export.load(path)
