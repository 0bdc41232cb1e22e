"""`modalmerge search` from start to end: check, run the trials, report, write the best merge.

1. The recipe's space is parsed and every choice of its method planned once (space.check_space),
   the evaluators and objectives parsed, the output checked against every input.
2. The runner starts its workers; the study loop runs the trials, journaled in OUT/search/.
3. OUT/search/trials.json, trials.md and search.png are written.
4. The best trial's recipe is merged as `modalmerge merge` would (procedures/run.run_merge, the
   one entry point), its model card telling the search, and put in place at OUT.
A bad input is one MergeError line before any trial runs; an error after trials ran leaves the
journal, so the same command resumes.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from ...engine.recipe import read_recipe_text
from ...errors import MergeError
from ..run import RunOptions, plan_merge, run_merge
from . import output as search_output
from .evaluators import DIRECTIONS, parse_eval
from .report import TRIALS_MD, card_lines, write_report
from .runners import SEARCH_EXTRA, LocalRunner, Runner
from .space import check_space, parse_space
from .study import SearchResult, run_search
from .trial import Inputs, Objective, SearchSpec


@dataclass
class SearchOutcome:
    """What a search did: its trials and best, where it wrote, and notes for the user."""

    result: SearchResult
    output: Path
    search_folder: Path
    notes: list[str] = field(default_factory=list)


def parse_objectives(texts: Sequence[str], evaluators) -> tuple[Objective, ...]:
    """--objective NAME[:min|max] (one or two); none given: the first evaluator's own metric."""
    if not texts:
        first = next((ev for ev in evaluators if ev.objective), None)
        if first is None:
            raise MergeError("--eval python:... gives metrics of its own: name the objective, e.g. "
                             "--objective score:max")
        texts = [first.objective]
    if len(texts) > 2:
        raise MergeError(f"{len(texts)} objectives: give one, or two for a Pareto front")
    out = []
    for text in texts:
        name, _, way = text.rpartition(":") if text.endswith((":min", ":max")) else (text, "", "")
        if not name:
            raise MergeError(f"--objective {text}: write NAME[:min|max], e.g. perplexity or score:max")
        direction = {"min": "minimize", "max": "maximize"}.get(way) or _direction(name, evaluators)
        if direction is None:
            raise MergeError(f"--objective {text}: say which way is better: --objective {name}:min or {name}:max")
        out.append(Objective(name, direction))
    if len(out) == 2 and out[0].metric == out[1].metric:
        raise MergeError(f"--objective {out[0].metric} is given twice; give two different metrics")
    return tuple(out)


def _direction(metric: str, evaluators) -> str | None:
    if metric in DIRECTIONS:
        return DIRECTIONS[metric]
    if any(ev.objective == metric for ev in evaluators) and "/" in metric:  # lm_eval's TASK/acc
        return "maximize"
    return None


def search(recipe: str | os.PathLike | dict[str, Any], evals: Sequence[str], output: str | os.PathLike, *,
           trials: int = 20, workers: int = 1, address: str | None = None, seed: int = 0, sampler: str = "tpe",
           objectives: Sequence[str] = (), threads: int | None = None, device: str = "cpu",
           trust_recipe_code: bool = False, trust_remote_code: bool = False, allow_pickle: bool = False,
           overwrite: bool = False, prune: bool = True, progress: bool = False, batch_size: int = 8,
           tool_version: str = "?", runner: Runner | None = None,
           extra_evals: Mapping[str, str] | None = None) -> SearchOutcome:
    """Search the recipe's marked values on the evaluators, write OUT (see the module docstring).
    `extra_evals`: more --eval prefixes, prefix -> "module:factory" (evaluators.parse_eval)."""
    if isinstance(recipe, dict):
        text, folder, where = yaml.safe_dump(recipe, sort_keys=False), None, "recipe"
        recipe_inputs = []
    else:
        path = Path(recipe)
        text, folder, where = read_recipe_text(path), str(path.parent), f"recipe {path}"
        recipe_inputs = [("recipe", str(path))]
    if not evals:
        raise MergeError("search needs --eval, e.g. --eval perplexity:valid.txt")
    if trials < 1:
        raise MergeError(f"--trials {trials}: give 1 or more")
    space = parse_space(text, where)
    evaluators = [parse_eval(e, trust_recipe_code, extra_evals) for e in evals]
    spec = SearchSpec(recipe_text=text, recipe_folder=folder, evals=tuple(evals),
                      extra_evals=tuple(sorted((extra_evals or {}).items())),
                      objectives=parse_objectives(objectives, evaluators), device=device, threads=threads,
                      trust_recipe_code=trust_recipe_code, trust_remote_code=trust_remote_code,
                      allow_pickle=allow_pickle, batch_size=batch_size)
    if sampler == "grid":
        space.grid()  # an all-choice space, before anything starts
    inputs = Inputs(spec)
    check_space(space, inputs.plan)
    files = recipe_inputs + [(f"model {p}", p) for p in inputs.sources] + \
        [pair for ev in evaluators for pair in ev.files()]
    runner = runner or make_runner(workers, address, threads)
    target = search_output.prepare(output, files, overwrite=overwrite)
    notes: list[str] = []
    try:
        try:
            runner.start(spec)
            result = run_search(spec, space, runner, trials, seed=seed, sampler=sampler, journal=target.journal,
                                prune=prune, progress=progress)
        finally:
            runner.close()
        notes += write_report(target.search, result, space)
        if result.best is None:
            raise MergeError(f"no trial completed (see {target.search / TRIALS_MD}); fix what the errors there say "
                             "and run again with --overwrite (or with a larger --trials to add trials)")
        best_recipe = spec.recipe(space.concrete(result.best["params"]))

        def write_merge(path: Path) -> None:
            plan = plan_merge(best_recipe, allow_pickle=allow_pickle, trust_recipe_code=trust_recipe_code,
                              trust_remote_code=trust_remote_code)
            run_merge(plan, path, RunOptions(device=device, allow_pickle=allow_pickle, progress=progress,
                                             tool_version=tool_version))
            card = path / "README.md"
            if card.exists():
                card.write_text(card.read_text().rstrip("\n") + "\n\n" + "\n".join(card_lines(result, space)))

        out = search_output.place(target, write_merge)
    finally:
        target.release()
    return SearchOutcome(result, out, out / search_output.SEARCH_DIR, notes)


def make_runner(workers: int = 1, address: str | None = None, threads: int | None = None) -> Runner:
    """LocalRunner for one worker on this machine; otherwise Ray's (a local instance with `workers`
    workers, or the cluster at `address` or RAY_ADDRESS), imported only then."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if workers < 1:
        raise MergeError(f"--workers {workers}: give 1 or more")
    if workers == 1 and not address:
        return LocalRunner()
    if importlib.util.find_spec("ray") is None:
        raise MergeError(f"--workers/--address run trials on Ray, which is not installed: {SEARCH_EXTRA}")
    from .ray_runner import RayRunner

    return RayRunner(workers, address, threads)
