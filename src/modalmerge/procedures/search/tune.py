"""The search's study loop for an objective that runs in this process: the library's tuning entry.

`modalmerge search` merges a recipe from model folders and evaluates it with an Evaluator; a caller
that already holds its models in memory (the benchmarks' "validation" rows) hands `tune` a space
and a function instead: values -> {metric: number}. The same study code runs it (study.run_study:
Optuna's samplers, the same trial records, the same choice of the best, optionally a journal to
resume from and the trials.json / trials.md / search.png report), so there is one tuning loop.

    result = tune({"lambda": {"search": [0.3, 0.5, 1.0]}}, score, ["val_avg:max"], sampler="grid")
    result.best["params"]                     # {"lambda": 0.5}: the first best in grid order
    result.best_by("val/sst2")                # one task's own best (a per-task choice, TALL's λ_t)

The space is a mapping (or YAML text) with `{search: ...}` markers, as in a recipe, or a
SearchSpace; the objective gets that mapping with a trial's values filled in. With the grid
sampler every point runs once and the best is the first best in grid order, the first marked
value varying slowest, as a loop over the grid would choose (`tolerance`: how much a later one
must be better by); `result.ordered()` lists the trials in that order.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ...errors import MergeError, one_line
from .space import SearchSpace, parse_space
from .study import SearchResult, run_study
from .trial import Objective, PruneRule, TrialResult, checked, failure_text

InProcessObjective = Callable[[dict[str, Any]], Mapping[str, float]]


class CallableRunner:
    """Trials one at a time in this process, each a call of `objective(filled-in space)`.

    An exception in the objective, or a metric that is not a finite number, is a failed trial (the
    study goes on), unless `stop_on_error`: then the exception goes to tune's caller as it was raised."""

    capacity = 1

    def __init__(self, space: SearchSpace, objective: InProcessObjective, objectives: tuple[Objective, ...],
                 stop_on_error: bool = False, worker: str = "in-process"):
        self.space, self.objective, self.objectives = space, objective, objectives
        self.stop_on_error = stop_on_error
        self.worker = worker
        self.queue: list[tuple[int, dict[str, Any]]] = []

    def start(self, spec=None) -> None:
        pass

    def submit(self, number: int, params: dict[str, Any], prune: PruneRule | None = None) -> None:
        self.queue.append((number, params))

    def wait_any(self) -> tuple[int, TrialResult]:
        number, params = self.queue.pop(0)
        start = time.perf_counter()
        try:
            metrics = self.objective(self.space.concrete(params))
            if not isinstance(metrics, Mapping) or not all(isinstance(k, str) for k in metrics):
                raise MergeError(f"the objective returned {type(metrics).__name__}, not a mapping "
                                 "{metric name: number}")
            status, metrics, error = checked(dict(metrics), self.objectives, "return it from the objective")
        except Exception as e:  # noqa: BLE001 - a failing trial is recorded; the study goes on
            if self.stop_on_error:
                raise
            status, metrics = "failed", {}
            error = failure_text(e)
        return number, TrialResult(metrics, time.perf_counter() - start, status, error, socket.gethostname(),
                                   self.worker)

    def close(self) -> None:
        self.queue.clear()


def parse_objective(text: str | Objective) -> Objective:
    """`NAME:max` or `NAME:min` (or an Objective) as an Objective."""
    if isinstance(text, Objective):
        return text
    name, _, way = str(text).rpartition(":")
    direction = {"min": "minimize", "max": "maximize"}.get(way)
    if not name or direction is None:
        raise MergeError(f"objective {one_line(text, 60)!r}: write NAME:max or NAME:min, e.g. val_avg:max")
    return Objective(name, direction)


def tune(space: SearchSpace | Mapping[str, Any] | str, objective: InProcessObjective,
         objectives: Sequence[str | Objective] = ("score:max",), *, trials: int | None = None,
         sampler: str = "grid", seed: int = 0, journal: str | Path | None = None, report: str | Path | None = None,
         progress: bool = False, tolerance: float = 0.0, stop_on_error: bool = False,
         name: str = "") -> SearchResult:
    """Run `objective` on the space's points through the study loop; returns every trial and the best.

    trials: how many (default: the whole grid for the grid sampler; required for tpe and random).
    journal: a file to resume from (None: the study lives in memory); `name` tells it apart from
    another tuning that would have the same space and objectives. report: a folder to write
    trials.json, trials.md and search.png into. stop_on_error: an exception in the objective stops
    the tuning (raised here) instead of failing the trial."""
    if not isinstance(space, SearchSpace):
        space = parse_space(dict(space) if isinstance(space, Mapping) else space, "search space")
    chosen = tuple(parse_objective(o) for o in objectives)
    if not 1 <= len(chosen) <= 2:
        raise MergeError(f"{len(chosen)} objectives: give one, or two for a Pareto front")
    if sampler == "grid":
        space.grid()  # an all-choice space, or one error line
    if trials is None:
        if sampler != "grid":
            raise MergeError(f"sampler {sampler}: say how many trials to run")
        trials = space.grid_size()
    mark = json.dumps({"space": space.fingerprint(), "objectives": [str(o) for o in chosen], "sampler": sampler,
                       "seed": seed, "name": name, "in_process": True})
    runner = CallableRunner(space, objective, chosen, stop_on_error)
    try:
        result = run_study(space, chosen, runner, trials, mark=mark, seed=seed, sampler=sampler,
                           journal=Path(journal) if journal is not None else None, prune=False, progress=progress,
                           tolerance=tolerance)
    finally:
        runner.close()
    if report is not None:
        from .report import write_report

        folder = Path(report)
        folder.mkdir(parents=True, exist_ok=True)
        write_report(folder, result, space)
    return result
