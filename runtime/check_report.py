"""The native check's verdicts and tables: per kernel (of an op, at a shape, dtype and target)
its heuristic config's resources and a summary of the autotuner's candidates, and the list of
problems (a kernel that does not compile, spills, or needs more shared memory than the target
has). Rich for the terminal, markdown for committed before/after records.

Beside the problems, notes that do not fail the check: a dot kernel at a prefill shape that does
not use wgmma on sm_90a (it then runs on mma.sync at a fraction of Hopper's rate), and ptxas
warnings (C7511 and others).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .native import NativeResult
from .sweep import Case
from .targets import TARGETS


@dataclass
class Row:
    file: str
    op: str
    dtype: str
    shape: str
    kernel: str
    target: str
    heuristic: NativeResult | None = None
    heuristic_case: Case | None = None
    candidates: list = field(default_factory=list)     # (Case, NativeResult)
    has_dot: bool = False

    def all(self):
        out = [(self.heuristic_case, self.heuristic)] if self.heuristic is not None else []
        return out + self.candidates


@dataclass
class Problem:
    case: Case
    result: NativeResult
    what: str

    def __str__(self) -> str:
        c = self.case
        return (f"{c.kernel.name} [{c.op}, {c.shape}, {c.dtype}, {self.result.target}] at {c.config}: {self.what}")


def rows_of(cases: list[Case], results: list[NativeResult]) -> list[Row]:
    rows: dict[tuple, Row] = {}
    for c, r in zip(cases, results):
        key = (c.file, c.op, c.dtype, c.shape, c.kernel.name, r.target)
        row = rows.setdefault(key, Row(*key, has_dot=c.has_dot))
        if c.role == "heuristic":
            row.heuristic, row.heuristic_case = r, c
        else:
            row.candidates.append((c, r))
    return list(rows.values())


def problems_of(cases: list[Case], results: list[NativeResult]) -> list[Problem]:
    out = []
    for c, r in zip(cases, results):
        for what in r.problems(TARGETS[r.target]):
            out.append(Problem(c, r, what))
    return out


def notes_of(rows: list[Row]) -> list[str]:
    out = []
    for row in rows:
        if row.target == "sm_90a" and row.has_dot and row.shape == "prefill":
            for c, r in row.all():
                if r.ok and not r.resources.wgmma:
                    out.append(f"{row.kernel} [{row.op}, prefill, {row.dtype}] at {c.config}: no wgmma on sm_90a "
                               f"({r.resources.tensor_core_text()})")
        for c, r in row.all():
            if r.ok:
                for w in r.resources.warnings:
                    out.append(f"{row.kernel} [{row.op}, {row.shape}, {row.dtype}, {row.target}] at {c.config}: {w}")
    return out


def _res_cells(r: NativeResult | None) -> list[str]:
    if r is None:
        return ["", "", "", "", ""]
    if not r.ok:
        return ["fails", "", "", "", ""]
    x = r.resources
    spills = f"{x.spill_stores}/{x.spill_loads}" if x.spills else "0"
    return [str(x.registers), spills, f"{x.shared // 1024}K" if x.shared >= 1024 else str(x.shared),
            x.tensor_core_text(), ",".join(x.loads) or "-"]


def _cfg_text(case: Case | None) -> str:
    if case is None:
        return ""
    v = case.config.as_dict()
    blocks = "x".join(str(v[n]) for n in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if n in v)
    budget = f" r{case.config.maxnreg}" if case.config.maxnreg is not None else ""
    return f"{blocks or '-'} w{case.config.num_warps} s{case.config.num_stages}{budget}"


def _cand_summary(row: Row) -> str:
    ok = [r for _, r in row.candidates if r.ok]
    if not row.candidates:
        return "-"
    bad = sum(1 for _, r in row.candidates if r.problems(TARGETS[r.target]))
    smem = max((r.resources.shared for r in ok), default=0)
    regs = max((r.resources.registers for r in ok), default=0)
    text = f"{len(row.candidates)}: <= {regs} regs, <= {smem // 1024}K"
    if row.has_dot and row.target == "sm_90a":
        text += f", wgmma {sum(1 for r in ok if r.resources.wgmma)}/{len(ok)}"
    return text + (f", {bad} bad" if bad else "")


HEADERS = ("op", "shape", "dtype", "target", "kernel", "heuristic config", "regs", "spills", "smem",
           "tensor cores", "async loads", "candidates", "status")


def _cells(row: Row) -> list[str]:
    bad = any(r.problems(TARGETS[r.target]) for _, r in row.all())
    return [row.op, row.shape, row.dtype, row.target, row.kernel, _cfg_text(row.heuristic_case),
            *_res_cells(row.heuristic), _cand_summary(row), "FAIL" if bad else "ok"]


def rich_table(rows: list[Row]):
    from rich.table import Table
    t = Table(title_justify="left")
    for h in HEADERS:
        t.add_column(h, overflow="fold")
    for row in rows:
        cells = _cells(row)
        cells[-1] = "[red]FAIL[/]" if cells[-1] == "FAIL" else "[green]ok[/]"
        t.add_row(*cells)
    return t


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + " --- |" * len(HEADERS)]
    for row in rows:
        lines.append("| " + " | ".join(c.replace("|", "/") for c in _cells(row)) + " |")
    return "\n".join(lines) + "\n"


def plain_table(rows: list[Row], headers=HEADERS, keep_all: bool = False) -> str:
    """The table as aligned plain text (explain(), a piped opforge check)."""
    cells = [list(headers)] + [_cells(r) for r in rows]
    keep = [i for i, h in enumerate(headers) if keep_all or h not in ("op", "target")]
    widths = [max(len(c[i]) for c in cells) for i in keep]
    return "\n".join("  ".join(c[i].ljust(w) for i, w in zip(keep, widths)).rstrip() for c in cells)
