"""One trial of a search: fill the recipe in, merge in memory, evaluate the merged model.

`SearchSpec` is everything a worker needs, small and picklable (Ray sends it to each worker once).
`TrialContext(spec)` is built once per worker: it opens the input models read-only (safetensors
read per tensor through the page cache, which every worker on a node shares; the same TensorSources
serve every trial, nothing is copied per trial), builds the
model skeleton and the tokenizer once, and loads the evaluators' data once. `ctx.run(params)`
then plans the filled-in recipe on those sources (procedures/run.plan_merge with `preloaded`),
merges it into a state dict (procedures/run.merge_in_memory: the one streaming engine every merge
goes through), loads it into the skeleton and evaluates. A merge or an evaluator that fails, or a
metric that is not a finite number, is a failed trial with a one-line error; the search goes on.
"""

from __future__ import annotations

import math
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...checkpoint.sources import TensorSource, open_source
from ...engine.recipe import Recipe, parse_recipe
from ...errors import MergeError, one_line
from ..run import merge_in_memory, plan_merge
from .evaluators import Evaluator, Pruned, load_model, parse_eval
from .space import SearchSpace, parse_space

STATUSES = ("ok", "failed", "pruned")


def failure_text(e: BaseException) -> str:
    """A failure as one line: a MergeError's own message, else the exception's type and message."""
    return str(e) if isinstance(e, MergeError) else f"{type(e).__name__}: {one_line(e, 300)}"


@dataclass(frozen=True)
class Objective:
    """A metric the search optimises, and which way."""

    metric: str
    direction: str  # "minimize" | "maximize"

    @property
    def minimize(self) -> bool:
        return self.direction == "minimize"

    def __str__(self) -> str:
        return f"{self.metric}:{'min' if self.minimize else 'max'}"


@dataclass(frozen=True)
class SearchSpec:
    """A search as every worker sees it (picklable: plain values only)."""

    recipe_text: str                       # the recipe with its search markers, as YAML text
    recipe_folder: str | None              # relative paths in the recipe are relative to this folder
    evals: tuple[str, ...]                 # --eval values: perplexity:FILE, accuracy:FILE, python:m:f, lm_eval:T
    objectives: tuple[Objective, ...]      # one, or two for a Pareto front
    device: str = "cpu"
    threads: int | None = None             # torch threads per worker (a worker process sets them)
    trust_recipe_code: bool = False
    trust_remote_code: bool = False
    allow_pickle: bool = False
    batch_size: int = 8
    max_length: int = 512
    # evaluators the caller registered: (--eval prefix, "module:factory"), imported in each worker
    extra_evals: tuple[tuple[str, str], ...] = ()

    def space(self) -> SearchSpace:
        return parse_space(self.recipe_text, "recipe")

    def recipe(self, concrete: dict[str, Any]) -> Recipe:
        """A filled-in recipe mapping as a Recipe, its relative paths resolved."""
        recipe = parse_recipe(concrete, "recipe")
        return recipe.resolve_paths(Path(self.recipe_folder)) if self.recipe_folder else recipe


@dataclass(frozen=True)
class PruneRule:
    """When a trial stops early: at step s, an objective worse than thresholds[s] (the median of the
    finished trials' values at that step, MedianPruner's rule, computed by the study loop so that a
    remote worker can apply it without asking back)."""

    metric: str
    thresholds: dict[int, float]
    minimize: bool

    def stops(self, metric: str, step: int, value: float) -> bool:
        limit = self.thresholds.get(step)
        if metric != self.metric or limit is None or not math.isfinite(value):
            return False
        return value > limit if self.minimize else value < limit


@dataclass
class TrialResult:
    """What a trial gives back (the same from every runner)."""

    metrics: dict[str, float]
    seconds: float
    status: str                        # "ok" | "failed" | "pruned"
    error: str | None = None
    node: str = ""
    worker: str = ""
    intermediate: dict[int, float] = field(default_factory=dict)  # the objective after each evaluation step


def checked(metrics: dict[str, Any], objectives: tuple[Objective, ...],
            fix: str = "fix --objective") -> tuple[str, dict[str, float], str | None]:
    """(status, metrics, error) of a trial whose evaluation gave `metrics`: failed when a metric is
    not a finite number or an objective is missing, else ok with the metrics as floats."""
    bad = [k for k, v in metrics.items() if not isinstance(v, (int, float)) or not math.isfinite(v)]
    if bad:
        return ("failed", {k: v for k, v in metrics.items() if k not in bad},
                f"metric {bad[0]!r} is {metrics[bad[0]]!r}, not a finite number")
    missing = [o.metric for o in objectives if o.metric not in metrics]
    if missing:
        return ("failed", metrics, f"the evaluators gave no metric {missing[0]!r} (they gave "
                                   f"{', '.join(metrics) or 'none'}); {fix}")
    return "ok", {k: float(v) for k, v in metrics.items()}, None


class Inputs:
    """The input models of a search's recipes, each opened once (read-only, read per tensor) and
    handed to every plan as `preloaded` sources."""

    def __init__(self, spec: SearchSpec):
        self.spec = spec
        self.sources: dict[str, TensorSource] = {}

    def plan(self, concrete: dict[str, Any]):
        """The plan of a filled-in recipe on the open sources (each opened on first use)."""
        recipe = self.spec.recipe(concrete)
        plan = plan_merge(recipe, allow_pickle=self.spec.allow_pickle, trust_recipe_code=self.spec.trust_recipe_code,
                          trust_remote_code=self.spec.trust_remote_code, preloaded=self.open(recipe))
        if plan.method.runs in ("sequential", "whole_model"):
            raise MergeError(f"method {plan.method.name} cannot be searched: it does not merge into memory "
                             f"({plan.method.runs} procedure); search another method")
        return plan

    def open(self, recipe: Recipe) -> dict[str, TensorSource]:
        if recipe.base is not None and recipe.base not in self.sources:
            self.sources[recipe.base] = open_source(recipe.base, label="base", allow_pickle=self.spec.allow_pickle)
        base = self.sources.get(recipe.base) if recipe.base is not None else None
        for m in recipe.models:
            if m.path not in self.sources:
                self.sources[m.path] = open_source(m.path, label=m.label, allow_pickle=self.spec.allow_pickle,
                                                   base=base)
        return dict(self.sources)


class TrialContext:
    """A worker's inputs, skeleton, tokenizer and evaluation data, made once; `run` per trial."""

    def __init__(self, spec: SearchSpec, worker: str = "local"):
        self.spec = spec
        self.worker = worker
        self.node = socket.gethostname()
        self.space = spec.space()
        self.inputs = Inputs(spec)
        self.evaluators: list[Evaluator] = [parse_eval(e, spec.trust_recipe_code, dict(spec.extra_evals))
                                            for e in spec.evals]
        # the probe plan names the reference folder (config, tokenizer) and the tensors a merge gives
        probe = self.plan(self.space.concrete(self.space.probes()[0]))
        self.folder = probe.aux_folder  # where config.json and the tokenizer are (the base, or copy_files_from)
        if self.folder is None:
            raise MergeError("the search evaluates Hugging Face model folders: the recipe's reference model has no "
                             "folder with a config.json")
        tasks = {ev.task for ev in self.evaluators if ev.task}
        if len(tasks) > 1:
            raise MergeError(f"--eval: {' and '.join(sorted(tasks))} evaluators need different model heads; "
                             "search with one kind at a time")
        self.model, self.tokenizer = load_model(self.folder, next(iter(tasks), None), device=spec.device,
                                                trust_remote_code=spec.trust_remote_code,
                                                merged_names=[t.name for t in probe.tensors])
        for ev in self.evaluators:
            ev.load(self.tokenizer, self.model.config, batch_size=spec.batch_size, max_length=spec.max_length)

    def plan(self, concrete: dict[str, Any]):
        return self.inputs.plan(concrete)

    def run(self, params: dict[str, Any], prune: PruneRule | None = None) -> TrialResult:
        """Merge with `params` filled in, evaluate; never raises for a bad trial (status failed)."""
        start = time.perf_counter()
        intermediate: dict[int, float] = {}

        def report(metric: str, step: int, value: float) -> None:
            if metric == self.spec.objectives[0].metric:  # kept for the medians later trials are pruned by
                intermediate[step] = float(value)
            if prune is not None and prune.stops(metric, step, value):
                raise Pruned(metric, step, value)

        def result(status: str, metrics: dict[str, float], error: str | None = None) -> TrialResult:
            return TrialResult(metrics, time.perf_counter() - start, status, error, self.node, self.worker,
                               intermediate)

        try:
            plan = self.plan(self.space.concrete(params))
            merged = merge_in_memory(plan, device=self.spec.device).tensors
            self.load_weights(merged)
            del merged
            metrics: dict[str, float] = {}
            for ev in self.evaluators:
                metrics.update(ev.evaluate(self.model, self.tokenizer, report))
        except Pruned as p:
            return result("pruned", {p.metric: p.value})
        except Exception as e:  # noqa: BLE001 - a failing trial is recorded; the search goes on
            return result("failed", {}, failure_text(e))
        return result(*checked(metrics, self.spec.objectives))

    def load_weights(self, merged: dict) -> None:
        """The merged tensors into the skeleton, in place (the skeleton's own dtype and device).
        An integer tensor the model class does not have is left out, as from_pretrained leaves
        it: an index buffer older checkpoints saved (BERT's `embeddings.position_ids`, which
        all-MiniLM-L6-v2's file holds and transformers 5 computes instead), not a weight."""
        missing, unexpected = self.model.load_state_dict(merged, strict=False)
        needed = {n for n, _ in self.model.named_parameters()}  # tied weights appear once
        missing = [k for k in missing if k in needed]
        unexpected = [k for k in unexpected if merged[k].is_floating_point()]
        if missing or unexpected:
            what = f"lacks {missing[0]!r}" if missing else f"has {unexpected[0]!r}, which the model does not"
            raise MergeError(f"the merged state dict {what}; the model class {type(self.model).__name__} does "
                             f"not match the merged tensors of {self.folder}")

