"""The Python API: merge model folders from a recipe, or state dicts in memory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .checkpoint.output import refuse_output_over_inputs
from .checkpoint.sources import StateDictSource
from .engine.executor import Report
from .engine.plan import DEFAULT_CHUNK_ELEMS, Plan
from .engine.recipe import Recipe, load_recipe, parse_recipe
from .errors import MergeError
from .procedures import run
from .procedures.continual import continual_add
from .version import __version__


def load(recipe: str | os.PathLike | dict | Recipe) -> Recipe:
    """A recipe from a YAML file (native or mergekit format), a mapping, or a Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, (str, os.PathLike)):
        return load_recipe(recipe)
    return parse_recipe(recipe)


def plan(recipe: str | os.PathLike | dict | Recipe, *, allow_pickle: bool = False,
         chunk_elems: int = DEFAULT_CHUNK_ELEMS, trust_recipe_code: bool = False,
         trust_remote_code: bool = False, seed: int | None = None) -> Plan:
    """Open the models and check the recipe without merging anything.

    `trust_recipe_code` allows calibration callables the recipe names to be imported and run;
    `trust_remote_code` allows model folders with custom modelling code (auto_map) to be loaded.
    Without them such a recipe is refused here (MergeError). `seed` replaces the recipe's."""
    r = load(recipe)
    if seed is not None:
        r = r.model_copy(update={"seed": seed})
    return run.plan_merge(r, allow_pickle=allow_pickle, chunk_elems=chunk_elems,
                          trust_recipe_code=trust_recipe_code, trust_remote_code=trust_remote_code)


def describe(planned: Plan) -> dict[str, Any]:
    """What `modalmerge merge --dry-run` prints, as data: tensors, passes, memory and output size."""
    return run.describe(planned)


def merge(recipe: str | os.PathLike | dict | Recipe | Plan, output: str | os.PathLike, *, device: str = "cpu",
          overwrite: bool = False, allow_pickle: bool = False, exact_stats: bool = False,
          progress: bool = False, max_shard_bytes: int | None = None,
          chunk_elems: int = DEFAULT_CHUNK_ELEMS, trust_recipe_code: bool = False,
          trust_remote_code: bool = False, copy_tokenizer: bool = True, write_model_card: bool = True,
          ray: bool = False, address: str | None = None, workers: int | None = None,
          threads: int | None = None) -> Report:
    """Merge the recipe's models (or a plan() of them) into a model folder at `output`, written
    atomically, by the procedure the method declares. The trust flags are plan()'s: without them,
    code the recipe or a model folder names is refused. `copy_tokenizer` and `write_model_card`
    (mergekit's options of those names) choose whether the reference model's tokenizer files and a
    README.md model card go into the output (streamed methods only).

    `ray`: the merge's tensor groups (one per output shard) run as Ray tasks, locally or on the
    cluster at `address` (default RAY_ADDRESS), `workers` at once with `threads` torch threads each;
    bit-identical to the merge without it (procedures/ray_merge.py).

    As a library call it changes no process-wide setting (the CLI alone tunes glibc's malloc)."""
    if isinstance(recipe, (str, os.PathLike)):  # the recipe file is an input too (the rest: in the sinks)
        refuse_output_over_inputs(output, [("recipe", recipe)])
    planned = recipe if isinstance(recipe, Plan) else plan(
        recipe, allow_pickle=allow_pickle, chunk_elems=chunk_elems, trust_recipe_code=trust_recipe_code,
        trust_remote_code=trust_remote_code)
    options = run.RunOptions(device=device, overwrite=overwrite, allow_pickle=allow_pickle, exact_stats=exact_stats,
                             progress=progress, max_shard_bytes=max_shard_bytes, tool_version=__version__,
                             copy_tokenizer=copy_tokenizer, write_model_card=write_model_card)
    spread = None
    if ray:
        from .procedures.ray_merge import OnRay
        spread = OnRay(address=address, workers=workers, threads=threads)
    elif address is not None or workers is not None or threads is not None:
        raise MergeError("address, workers and threads (--address, --workers) say how a merge runs on Ray: give "
                         "ray=True (--ray) with them")
    return run.run_merge(planned, output, options, spread=spread)


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
    procedures/calibration.py computes them from an nn.Module and batches).
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
    p = run.plan_merge(recipe, chunk_elems=chunk_elems, preloaded=preloaded)
    given = {kind: [StateDictSource(sd, f"{kind} of {n}") for n, sd in zip(named, per_model)]
             for kind, per_model in (data or {}).items()}
    sink = run.merge_in_memory(p, device=device, exact_stats=exact_stats, data=given)
    return (sink.tensors, sink) if return_decoupled else sink.tensors


def continual_merge(previous: str | os.PathLike, add: str | os.PathLike, output: str | os.PathLike, *,
                    name: str | None = None, overwrite: bool = False, allow_pickle: bool = False,
                    progress: bool = False, trust_recipe_code: bool = False,
                    trust_remote_code: bool = False) -> Path:
    """Add one model to a continual (OPCM) merge folder without the earlier models; returns `output`.
    A continual merge imports and runs no code; the trust flags are taken for a uniform API."""
    return continual_add(previous, str(add), output, name=name, overwrite=overwrite,
                         allow_pickle=allow_pickle, progress=progress, tool_version=__version__)


def extract_lora(model: str | os.PathLike, base: str | os.PathLike, output: str | os.PathLike, *, rank: int,
                 energy: float | None = None, embeddings: bool = False, dtype: str | None = None,
                 device: str = "cpu", overwrite: bool = False, allow_pickle: bool = False, progress: bool = False):
    """Write a PEFT LoRA adapter folder at `output` whose B·A approximates `model` − `base` per linear
    layer (truncated float32 SVD, rank ≤ `rank`; with `energy`, per tensor the smallest rank keeping
    that fraction of the squared Frobenius norm). `embeddings`: embeddings and output heads as LoRAs
    too, instead of modules_to_save. Returns a LoraReport (per-tensor ranks and relative errors)."""
    from .procedures.extract_lora import extract_lora as extract

    return extract(str(model), str(base), output, rank=rank, energy=energy, embeddings=embeddings, dtype=dtype,
                   device=device, overwrite=overwrite, allow_pickle=allow_pickle, progress=progress,
                   tool_version=__version__)


def search(recipe: str | os.PathLike | dict, evals: str | list[str], output: str | os.PathLike, *,
           trials: int = 20, workers: int = 1, address: str | None = None, seed: int = 0, sampler: str = "tpe",
           objectives: str | list[str] = (), threads: int | None = None, device: str = "cpu",
           trust_recipe_code: bool = False, trust_remote_code: bool = False, allow_pickle: bool = False,
           overwrite: bool = False, prune: bool = True, progress: bool = False, batch_size: int = 8, runner=None,
           extra_evals: dict[str, str] | None = None):
    """Search the values a recipe marks `{search: ...}` on validation data (`evals`: --eval values
    such as "perplexity:valid.txt"), then write the best trial's merge at `output`, with
    output/search/ holding trials.json, trials.md, search.png and the journal that lets the same
    call resume an interrupted search. `workers` > 1 or `address` run the trials on Ray; a
    `runner` (procedures/search/runners.Runner) replaces that choice. Returns a SearchOutcome
    (its `result`: every trial, the best, the Pareto front). `extra_evals`: more --eval prefixes,
    prefix -> "module:factory" (e.g. bench.text_eval.EVALUATORS). See docs/search.md."""
    from .procedures.search.procedure import search as run_search

    return run_search(recipe, [evals] if isinstance(evals, str) else list(evals), output, trials=trials,
                      workers=workers, address=address, seed=seed, sampler=sampler,
                      objectives=[objectives] if isinstance(objectives, str) else list(objectives), threads=threads,
                      device=device, trust_recipe_code=trust_recipe_code, trust_remote_code=trust_remote_code,
                      allow_pickle=allow_pickle, overwrite=overwrite, prune=prune, progress=progress,
                      batch_size=batch_size, tool_version=__version__, runner=runner, extra_evals=extra_evals)
