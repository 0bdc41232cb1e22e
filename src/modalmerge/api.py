"""The Python API: merge model folders from a recipe, or state dicts in memory."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from .checkpoint.sources import StateDictSource
from .engine.executor import Executor, Report
from .engine.plan import DEFAULT_CHUNK_ELEMS, Plan, build_plan, open_models
from .engine.recipe import Recipe, load_recipe, parse_recipe
from .engine.sinks import DictSink, FolderSink
from .errors import MergeError


def _recipe(recipe: str | os.PathLike | dict | Recipe) -> Recipe:
    if isinstance(recipe, (str, os.PathLike)):
        return load_recipe(recipe)
    return parse_recipe(recipe)


def plan(recipe: str | os.PathLike | dict | Recipe, *, allow_pickle: bool = False,
         chunk_elems: int = DEFAULT_CHUNK_ELEMS, trust_recipe_code: bool = False,
         trust_remote_code: bool = False) -> Plan:
    """Open the models and check the recipe without merging anything.

    `trust_recipe_code` allows calibration callables the recipe names to be imported and run;
    `trust_remote_code` allows model folders with custom modelling code (auto_map) to be loaded.
    Without them such a recipe is refused here (MergeError)."""
    r = _recipe(recipe)
    base, models = open_models(r, allow_pickle=allow_pickle)
    return build_plan(r, base, models, chunk_elems, trust_recipe_code=trust_recipe_code,
                      trust_remote_code=trust_remote_code)


def merge(recipe: str | os.PathLike | dict | Recipe, output: str | os.PathLike, *, device: str = "cpu",
          overwrite: bool = False, allow_pickle: bool = False, exact_stats: bool = False,
          progress: bool = False, max_shard_bytes: int | None = None,
          chunk_elems: int = DEFAULT_CHUNK_ELEMS, trust_recipe_code: bool = False,
          trust_remote_code: bool = False) -> Report:
    """Merge the recipe's models into a model folder at `output` (written atomically).
    The trust flags are plan()'s: without them, code the recipe or a model folder names is refused."""
    from . import __version__

    r = _recipe(recipe)
    if isinstance(recipe, (str, os.PathLike)):  # the recipe file is an input too (the rest: in the sinks)
        from .checkpoint.output import refuse_output_over_inputs
        refuse_output_over_inputs(output, [("recipe", recipe)])
    if r.method == "mmer":
        # multimodal composition: LLMs merged and decoupled, encoders/projectors alongside
        from .engine.mmer import compose
        report, storage = compose(r, output, device=device, overwrite=overwrite, allow_pickle=allow_pickle,
                                  exact_stats=exact_stats, progress=progress, max_shard_bytes=max_shard_bytes,
                                  chunk_elems=chunk_elems, tool_version=__version__)
        report.statistics["storage"] = storage
        return report
    p = plan(r, allow_pickle=allow_pickle, chunk_elems=chunk_elems, trust_recipe_code=trust_recipe_code,
             trust_remote_code=trust_remote_code)
    if p.method.whole_model:  # M-SMoE: the one model loaded whole, run on calibration data
        from .engine.moe import run

        start = time.perf_counter()
        report = run(p, output, overwrite=overwrite, tool_version=__version__)
        ep = report["expert_parameters"]
        return Report(seconds={"total": time.perf_counter() - start}, merged_tensors=2 * len(report["layers"]),
                      copied_tensors=0, merged_parameters=ep["before"], statistics={"msmoe": report})
    if p.method.sequential:  # OPCM: models one at a time, state kept in output/continual/
        from .engine.continual import run_sequential
        run_sequential(p, output, overwrite=overwrite, progress=progress)
        return Report(merged_tensors=len(p.merged), copied_tensors=len(p.tensors) - len(p.merged),
                      merged_parameters=sum(t.meta.numel for t in p.merged))
    sink = FolderSink(p, output, overwrite=overwrite, max_shard_bytes=max_shard_bytes, tool_version=__version__)
    return Executor(p, device=device, exact_stats=exact_stats, progress=progress, allow_pickle=allow_pickle).run(sink)


def merge_state_dicts(method: str, models: list[dict[str, torch.Tensor]] | dict[str, dict[str, torch.Tensor]],
                      base: dict[str, torch.Tensor] | None = None, params: dict[str, Any] | None = None, *,
                      weights: list[float] | None = None, model_params: list[dict[str, Any]] | None = None,
                      include: list[str] | None = None, exclude: list[str] | None = None,
                      seed: int = 0, device: str = "cpu", exact_stats: bool = False,
                      chunk_elems: int = DEFAULT_CHUNK_ELEMS, return_decoupled: bool = False,
                      data: dict[str, list[dict[str, torch.Tensor]]] | None = None):
    """Merge in-memory state dicts; returns the merged state dict.

    `models` is a list (named model_0, model_1, …) or a {name: state_dict} mapping. With
    `return_decoupled=True`, returns (state_dict, DictSink) so the shared vector, masks and
    manifest of a task-conditional method can be read. Data-aware methods take their per-model
    statistics in `data`: {kind: [one {tensor name: statistic} per model]} (e.g. "fisher", "gram";
    engine/calibration.py computes them from an nn.Module and batches).
    """
    named = models if isinstance(models, dict) else {f"model_{i}": sd for i, sd in enumerate(models)}
    weights = weights or [1.0] * len(named)
    model_params = model_params or [{}] * len(named)
    preloaded = {f"<memory:{n}>": StateDictSource(sd, n) for n, sd in named.items()}
    if base is not None:
        preloaded["<memory:base>"] = StateDictSource(base, "base")
    recipe = parse_recipe({
        "method": method,
        "base": "<memory:base>" if base is not None else None,
        "models": [{"path": f"<memory:{n}>", "name": n, "weight": w, "params": mp}
                   for n, w, mp in zip(named, weights, model_params)],
        "params": params or {},
        "include": include or [],
        "exclude": exclude or [],
        "seed": seed,
    })
    base_src, model_srcs = open_models(recipe, preloaded=preloaded)
    p = build_plan(recipe, base_src, model_srcs, chunk_elems)
    if p.method.whole_model:
        raise MergeError(f"method {method} loads and runs a whole model folder on calibration data, which a state "
                         "dict cannot give: use modalmerge.merge(recipe, output) with the model's folder")
    for kind, per_model in (data or {}).items():
        p.data[kind] = [StateDictSource(sd, f"{kind} of {n}") for n, sd in zip(named, per_model)]
    sink = DictSink(p)
    Executor(p, device=device, exact_stats=exact_stats, progress=False).run(sink)
    return (sink.tensors, sink) if return_decoupled else sink.tensors


def continual_merge(previous: str | os.PathLike, add: str | os.PathLike, output: str | os.PathLike, *,
                    name: str | None = None, overwrite: bool = False, allow_pickle: bool = False,
                    progress: bool = False, trust_recipe_code: bool = False,
                    trust_remote_code: bool = False) -> Path:
    """Add one model to a continual (OPCM) merge folder without the earlier models; returns `output`.
    A continual merge imports and runs no code; the trust flags are taken for a uniform API."""
    from .engine.continual import continual_add

    return continual_add(previous, str(add), output, name=name, overwrite=overwrite,
                         allow_pickle=allow_pickle, progress=progress)
