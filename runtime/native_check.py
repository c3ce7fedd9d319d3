"""``opforge check --target``: the sweep (runtime/sweep.py) compiled natively (runtime/native.py)
with a progress bar, the configurations that spill at ptxas's own register choice compiled again
at a register budget (runtime/register_budget.py, as the runtime launches them), then the
verdicts (runtime/check_report.py)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .cache import KernelCache
from .check_report import Problem, Row, notes_of, problems_of, rows_of
from .native import NativeCompiler, NativeResult
from .register_budget import spill_free
from .sweep import Case, SweepError, sweep
from .targets import Target


@dataclass
class CheckResult:
    cases: list[Case]
    results: list[NativeResult]
    rows: list[Row]
    problems: list[Problem]
    notes: list[str]
    errors: list[SweepError] = field(default_factory=list)
    compiled: int = 0          # compiles run (the rest came from the disk cache)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.errors


def native_check(files, targets: list[Target], *, dtypes=("f16",), which="all", shapes=None, ops=None,
                 cache: KernelCache | None = None, progress: bool = False, workers: int | None = None) -> CheckResult:
    cache = cache or KernelCache()
    cases, errors = sweep(files, targets, dtypes=dtypes, shapes=shapes, which=which, cache=cache, ops=ops)
    compiler = NativeCompiler(cache, workers)
    counted = {"compiled": 0}

    def count(r: NativeResult):
        counted["compiled"] += 0 if r.cached else 1

    if progress and cases:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        with Progress(TextColumn("compiling for " + ", ".join(t.name for t in targets)), BarColumn(),
                      MofNCompleteColumn(), TimeElapsedColumn(), transient=True) as bar:
            task = bar.add_task("native", total=len(cases))

            def tick(r: NativeResult):
                count(r)
                bar.advance(task)
            results = compiler.compile([c.job for c in cases], tick)
    else:
        results = compiler.compile([c.job for c in cases], count)
    # a configuration that spills at ptxas's own register choice is checked at the budget the
    # runtime would launch it with (runtime/register_budget.py)
    jobs, results = spill_free(lambda js: compiler.compile(js, count), [c.job for c in cases], results,
                               shrink=[c.role == "heuristic" for c in cases])
    cases = [c if j is c.job else dataclasses.replace(c, config=j.config, job=j) for c, j in zip(cases, jobs)]
    rows = rows_of(cases, results)
    return CheckResult(cases, results, rows, problems_of(cases, results), notes_of(rows), errors,
                       counted["compiled"])
