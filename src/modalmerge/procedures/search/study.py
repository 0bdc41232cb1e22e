"""The study loop: Optuna asks for parameters, a runner runs the trials, Optuna is told each result.

`run_search` keeps `runner.capacity` trials in flight (ask/tell), tells each result as it arrives,
and stops once `trials` trials have finished (completed, pruned or failed), counting those a
journal already holds. The journal is Optuna's JournalStorage on a file: a search interrupted at
any point is resumed by running it again with the same journal; finished trials are kept, the
trials that were in flight are run again with the same parameters, and a journal written for
another recipe, space, evaluation or sampler is refused rather than mixed in.

Samplers: TPE (seeded; with two objectives TPE's multi-objective form), random, and grid (an
all-choice space only; Optuna runs its points in a seeded shuffled order). The chosen trial is the
first best in grid order (the first parameter varying slowest, as nested loops over the grid
would run) for the grid sampler, else in trial order: a later trial must beat the best so far by
more than `tolerance`, so ties go to the earlier setting, whatever order the trials ran in. Pruning: with one objective, a
trial is stopped after an evaluation step where its objective is worse than the median of the
finished trials' at that step (MedianPruner's rule, sent with the trial as a PruneRule so that
remote workers apply it), once PRUNE_STARTUP trials have finished.

`run_study` is the loop itself, for any runner; `run_search` runs it for `modalmerge search` (a
SearchSpec), tune.py for an in-process objective (the benchmarks' validation rows).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ...errors import MergeError, one_line
from .runners import SEARCH_EXTRA, Runner
from .space import SearchSpace
from .trial import Objective, PruneRule, SearchSpec, TrialResult

STUDY_NAME = "modalmerge-search"
SAMPLERS = ("tpe", "random", "grid")
PRUNE_STARTUP = 3  # finished trials before any is pruned
RECORD = "record"  # the user attribute holding a trial's record (trials.json's entry)


@dataclass
class SearchResult:
    """Every trial of the study (this run's and a resumed journal's), and the best."""

    objectives: tuple[Objective, ...]
    trials: list[dict[str, Any]]               # trials.json's entries, by number
    best: dict[str, Any] | None                # the chosen trial (the first objective's best on the front)
    pareto: list[int] = field(default_factory=list)  # the front's trial numbers (two objectives)
    resumed: int = 0                           # trials the journal already held
    sampler: str = "tpe"
    seed: int = 0
    order: list[int] = field(default_factory=list)   # trial numbers in choice order (grid order for a grid)

    def ordered(self) -> list[dict[str, Any]]:
        """The trials in choice order: the grid's order for the grid sampler, else by number."""
        by_number = {t["number"]: t for t in self.trials}
        return [by_number[n] for n in self.order if n in by_number]

    def best_by(self, metric: str, direction: str = "maximize", tolerance: float = 0.0,
                prefer: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any] | None:
        """The completed trial best in one recorded metric (e.g. one task's validation accuracy when
        each task chooses its own setting), by the study's rule: see `choose`."""
        return choose(self.ordered(), metric, direction == "minimize", tolerance, prefer)


def choose(trials: list[dict[str, Any]], metric: str, minimize: bool = False, tolerance: float = 0.0,
           prefer: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any] | None:
    """The first best completed trial in the given order: a later one replaces the best so far only
    when its `metric` is better by more than `tolerance`, or (with `prefer`, a key of the params)
    when it is as good within the tolerance and prefer(params) is larger."""
    sign = -1.0 if minimize else 1.0
    best, best_value = None, 0.0
    for t in trials:
        value = t["metrics"].get(metric) if t["status"] == "ok" else None
        if value is None:
            continue
        value = sign * float(value)
        if best is None or value > best_value + tolerance or (
                prefer is not None and value >= best_value - tolerance and prefer(t["params"]) > prefer(best["params"])):
            best, best_value = t, value
    return best


def optuna_module():
    try:
        import optuna
    except ModuleNotFoundError:
        raise MergeError(f"search needs Optuna, which is not installed: {SEARCH_EXTRA}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def fingerprint(spec: SearchSpec, space: SearchSpace, sampler: str, seed: int) -> str:
    """What a journal must match to be resumed."""
    return json.dumps({"space": space.fingerprint(), "evals": list(spec.evals),
                       "objectives": [str(o) for o in spec.objectives], "sampler": sampler, "seed": seed})


def open_study(space: SearchSpace, objectives: tuple[Objective, ...], mark: str, journal: Path | None = None,
               sampler: str = "tpe", seed: int = 0):
    """The journal's study: a new one, or the one a previous run left (same fingerprint `mark` only);
    without a journal, a study in memory."""
    optuna = optuna_module()
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if sampler not in SAMPLERS:
        raise MergeError(f"--sampler {sampler}: use one of {', '.join(SAMPLERS)}")
    if sampler == "grid":
        chosen = grid_sampler(optuna, space.grid(), seed)
    elif sampler == "random":
        chosen = optuna.samplers.RandomSampler(seed=seed)
    else:
        chosen = optuna.samplers.TPESampler(seed=seed, n_startup_trials=5)
    storage = JournalStorage(JournalFileBackend(str(journal))) if journal is not None else None
    existing = [s.study_name for s in optuna.get_all_study_summaries(storage)] if storage is not None else []
    if STUDY_NAME in existing:
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage, sampler=chosen)
        if study.user_attrs.get("fingerprint") != mark:
            raise MergeError(f"{journal} is the journal of another search (a different recipe, space, --eval, "
                             "--objective, --sampler or --seed); run that search again to resume it, or choose "
                             "another output folder (--overwrite starts over)")
        return study
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, sampler=chosen,
                                directions=[o.direction for o in objectives])
    study.set_user_attr("fingerprint", mark)
    return study


def grid_sampler(optuna, grid: dict[str, list], seed: int):
    """Optuna's GridSampler, asked and told: it stops the study itself once the grid is done, which
    Optuna allows only inside study.optimize; here the loop stops at the grid's size instead."""
    class AskTellGridSampler(optuna.samplers.GridSampler):
        def after_trial(self, study, trial, state, values) -> None:
            pass

    return AskTellGridSampler(grid, seed=seed)


def run_search(spec: SearchSpec, space: SearchSpace, runner: Runner, trials: int, seed: int = 0,
               sampler: str = "tpe", journal: Path | str = "journal.log", prune: bool = True,
               progress: bool = False) -> SearchResult:
    """Run the search until `trials` trials have finished (resuming the journal's); the runner must
    be started. Returns every trial and the best."""
    return run_study(space, spec.objectives, runner, trials, mark=fingerprint(spec, space, sampler, seed), seed=seed,
                     sampler=sampler, journal=Path(journal), prune=prune, progress=progress)


def run_study(space: SearchSpace, objectives: tuple[Objective, ...], runner: Runner, trials: int, *, mark: str,
              seed: int = 0, sampler: str = "tpe", journal: Path | None = None, prune: bool = True,
              progress: bool = False, tolerance: float = 0.0) -> SearchResult:
    """The study loop: ask, run on the runner, tell, until `trials` trials have finished (a journal's
    finished trials count; its trials left in flight run again). `mark` is what a journal must
    match to be resumed; `tolerance` is the choice's (see `choose`)."""
    optuna = optuna_module()
    TrialState = optuna.trial.TrialState
    if trials < 1:
        raise MergeError(f"--trials {trials}: give 1 or more")
    study = open_study(space, objectives, mark, journal, sampler, seed)
    # trials a killed run left in flight: closed as failed (not counted) and asked again
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        if t.state == TrialState.RUNNING:
            study.tell(t.number, state=TrialState.FAIL)
            if sampler != "grid":  # the grid sampler gives an unfinished grid point again itself
                study.enqueue_trial(t.params, user_attrs={"rerun_of": t.number})
    finished = _finished(study, TrialState)
    resumed = len(finished)
    target = min(trials, space.grid_size()) if sampler == "grid" else trials
    in_flight: dict[int, Any] = {}
    pruning = prune and len(objectives) == 1
    bar = _progress(progress, target, resumed)
    try:
        while len(finished) + len(in_flight) < target or in_flight:
            while len(in_flight) < runner.capacity and len(finished) + len(in_flight) < target:
                trial = study.ask()
                params = space.suggest(trial)
                rule = _prune_rule(study, objectives[0], TrialState) if pruning else None
                runner.submit(trial.number, params, rule)
                in_flight[trial.number] = trial
            number, result = runner.wait_any()
            _tell(study, in_flight.pop(number), result, objectives, TrialState)
            finished = _finished(study, TrialState)
            if bar is not None:
                bar.update(1)
                best = _best_value(study, objectives, TrialState)
                if best is not None:
                    bar.set_postfix_str(f"best {objectives[0].metric} {best:.4g}")
    finally:
        if bar is not None:
            bar.close()
    return result_of(study, space, objectives, resumed, sampler, seed, tolerance)


def result_of(study, space: SearchSpace, objectives: tuple[Objective, ...], resumed: int, sampler: str,
              seed: int, tolerance: float = 0.0) -> SearchResult:
    import optuna

    TrialState = optuna.trial.TrialState
    records = [record_of(t, space) for t in _finished(study, TrialState)]
    if sampler == "grid":  # grid order, whatever order the trials ran in (a resumed journal's)
        order = [r["number"] for r in sorted(records, key=lambda r: space.grid_index(r["params"]))]
    else:
        order = sorted(r["number"] for r in records)
    result = SearchResult(objectives, records, None, [], resumed, sampler, seed, order)
    if len(objectives) == 1:
        first = objectives[0]
        result.best = result.best_by(first.metric, first.direction, tolerance)
    elif any(r["status"] == "ok" for r in records):
        front = study.best_trials
        result.pareto = sorted(t.number for t in front)
        on_front = [r for r in result.ordered() if r["number"] in result.pareto]
        result.best = choose(on_front, objectives[0].metric, objectives[0].minimize, tolerance)
    return result


def record_of(trial, space: SearchSpace) -> dict[str, Any]:
    """A finished trial as trials.json lists it."""
    saved = dict(trial.user_attrs.get(RECORD) or {})
    # the values as Optuna keeps them, decoded: exactly what the trial merged with
    return {"number": trial.number, "params": space.decode(trial.params),
            "metrics": saved.get("metrics", {}), "seconds": saved.get("seconds"),
            "status": saved.get("status", "failed"), "error": saved.get("error"),
            "node": saved.get("node", ""), "worker": saved.get("worker", "")}


def _tell(study, trial, result: TrialResult, objectives, TrialState) -> None:
    status, error = result.status, result.error
    values = None
    if status == "ok":
        values = [result.metrics.get(o.metric) for o in objectives]
        if any(v is None or not math.isfinite(v) for v in values):
            status, error = "failed", "the objective is missing or not a finite number"
    record = {"metrics": result.metrics, "seconds": round(result.seconds, 3), "status": status,
              "error": one_line(error, 500) if error else None, "node": result.node, "worker": result.worker}
    trial.set_user_attr(RECORD, json.loads(json.dumps(record, default=str)))
    if len(objectives) == 1 and status in ("ok", "pruned"):  # Optuna keeps steps for one objective only
        for step, value in sorted(result.intermediate.items()):
            trial.report(value, step)
    if status == "ok":
        study.tell(trial, values)
    elif status == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, state=TrialState.FAIL)


def _finished(study, TrialState) -> list:
    """Completed and pruned trials, and failed ones that ran (not those a killed run left)."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        if t.state != TrialState.FAIL or RECORD in t.user_attrs:
            out.append(t)
    return out


def _prune_rule(study, objective: Objective, TrialState) -> PruneRule | None:
    """The median of the completed trials' intermediate objective at each step."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < PRUNE_STARTUP:
        return None
    by_step: dict[int, list[float]] = {}
    for t in complete:
        for step, value in t.intermediate_values.items():
            by_step.setdefault(step, []).append(value)
    thresholds = {s: statistics.median(v) for s, v in by_step.items() if len(v) >= PRUNE_STARTUP}
    return PruneRule(objective.metric, thresholds, objective.minimize) if thresholds else None


def _best_value(study, objectives, TrialState) -> float | None:
    values = [t.values[0] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not values:
        return None
    return min(values) if objectives[0].minimize else max(values)


def _progress(progress: bool, total: int, done: int):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc="search", unit="trial")
