"""The one way a merge runs: plan it, then hand it to the procedure its method declares.

This is the one function every merge goes through (api.merge, and through it the CLI): it sits
at the top of procedures/, above the streaming engine it drives.

`Method.runs` says which procedure a method needs; `PROCEDURES` maps each kind to the function
that runs it. Nothing here (or in the faces, cli.py and api.py, which call this module) tests a
method's name: a new method that streams needs no change here, and a new kind of procedure is one
entry in the two tables below.

- streaming    the streaming executor over every selected tensor (engine/executor.py), after a
               data pass for data-aware methods (calibration.py)
- composed     model folders split into language model and modality parts; the language models
               streamed with the method's kernel, encoders and projectors kept (mmer.py)
- sequential   models applied one at a time, state kept in the output (continual.py)
- whole_model  one model loaded whole and run on calibration data (moe.py)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..checkpoint.sources import TensorSource
from ..engine.embedding_views import (align_slice_vocabularies, align_vocabularies, chat_template_vocabulary,
                                      check_tokenizer_fields)
from ..engine.executor import Executor, Report
from ..engine.plan import DEFAULT_CHUNK_ELEMS, Plan, build_plan, open_models
from ..engine.recipe import Recipe
from ..engine import modules
from ..engine.sinks import DictSink, FolderSink, plan_inputs
from ..engine.slices import open_slices
from ..errors import MergeError
from ..methods.registry import get_method
from . import calibration, continual, mmer, moe


@dataclass(frozen=True)
class RunOptions:
    """How a planned merge is run and written (the same for every procedure)."""

    device: str = "cpu"
    overwrite: bool = False
    allow_pickle: bool = False
    exact_stats: bool = False
    progress: bool = False
    max_shard_bytes: int | None = None
    tool_version: str = "?"
    copy_tokenizer: bool = True      # the reference model's tokenizer files go into the output
    write_model_card: bool = True    # README.md with the recipe


def plan_merge(recipe: Recipe, *, allow_pickle: bool = False, chunk_elems: int = DEFAULT_CHUNK_ELEMS,
               trust_recipe_code: bool = False, trust_remote_code: bool = False,
               preloaded: dict[str, TensorSource] | None = None) -> Plan:
    """Open the models and check the recipe: the plan of a folder merge, or of an in-memory one
    (`preloaded` sources), whose composed methods stream as usual (no folders to split)."""
    method = get_method(recipe.method)
    wants_tokenizer = bool(recipe.tokenizer_source or recipe.tokenizer or recipe.chat_template)
    check_tokenizer_fields(recipe, method.runs, method.name)  # before opening anything
    # a gradient on a model with modules runs over each module's layers, as in mergekit (engine/modules.py)
    recipe = modules.per_module(recipe, allow_pickle=allow_pickle, preloaded=preloaded)
    if recipe.modules:  # a VLM's text decoder, vision tower, ... each merged its own way (engine/modules.py)
        plan = modules.plan_modules(recipe, allow_pickle=allow_pickle, chunk_elems=chunk_elems, preloaded=preloaded,
                                    trust_recipe_code=trust_recipe_code, trust_remote_code=trust_remote_code)
    elif recipe.slices:  # layer stacking: the models are views of the slices' layers (engine/slices.py)
        recipe, base, models = open_slices(recipe, allow_pickle=allow_pickle, preloaded=preloaded)
        base, models, vocabulary = align_slice_vocabularies(recipe, base, models, trust_remote_code)
        plan = build_plan(recipe, base, models, chunk_elems, trust_recipe_code=trust_recipe_code,
                          trust_remote_code=trust_remote_code)
        plan.vocabulary = vocabulary
    elif method.runs == "composed" and not preloaded:
        plan = mmer.plan_composed(recipe, allow_pickle=allow_pickle, chunk_elems=chunk_elems)
        plan.vocabulary = chat_template_vocabulary(recipe, ([plan.base] if plan.base else []) + plan.models,
                                                   plan.aux_folder, trust_remote_code)
    else:
        base, models = open_models(recipe, allow_pickle=allow_pickle, preloaded=preloaded)
        # tokenizer settings: every model's vocabulary tensors seen in the output vocabulary
        base, models, vocabulary = align_vocabularies(recipe, base, models, trust_remote_code)
        plan = build_plan(recipe, base, models, chunk_elems, trust_recipe_code=trust_recipe_code,
                          trust_remote_code=trust_remote_code)
        plan.vocabulary = vocabulary
    if plan.vocabulary is None and wants_tokenizer:  # check_tokenizer_fields names what is refused
        where = "to a `modules:` recipe yet" if plan.modules else f"by method {method.name}"
        raise MergeError(f"`tokenizer_source`, `tokenizer` and `chat_template` are not applied {where}; remove them")
    for checked in [plan, *(module_plan for _, module_plan in plan.modules)]:
        calibration.check_data_fields(checked)
        calibration.check_trust(checked)  # before any work: code the merge would run needs the user's consent
    return plan


def run_merge(plan: Plan, output: str | Path, options: RunOptions = RunOptions(),
              spread: Callable[[Plan, str | Path, RunOptions], Report] | None = None) -> Report:
    """Run a planned merge into the folder `output` (written atomically) with its method's procedure,
    or with `spread` in its place: a streaming merge spread over processes (ray_merge.OnRay)."""
    start = time.perf_counter()
    if plan.method.runs != "streaming" and not (options.copy_tokenizer and options.write_model_card):
        raise MergeError(f"method {plan.method.name} writes its output folder its own way, always with the "
                         "tokenizer and a model card; leave out copy_tokenizer=False / write_model_card=False "
                         "(--no-copy-tokenizer / --no-write-model-card)")
    if plan.vocabulary is not None and not plan.vocabulary.remaps and not options.copy_tokenizer:
        raise MergeError("`chat_template` is written into the output's tokenizer, which --no-copy-tokenizer leaves "
                         "out; drop one of them")
    report = (spread or PROCEDURES[plan.method.runs])(plan, output, options)
    report.procedure = plan.method.runs
    report.seconds.setdefault("total", time.perf_counter() - start)
    return report


def merge_in_memory(plan: Plan, device: str = "cpu", exact_stats: bool = False,
                    data: dict[str, list[TensorSource]] | None = None) -> DictSink:
    """Run a planned merge of in-memory sources into a DictSink (the streaming executor; `data`:
    a data-aware method's per-model statistics, which cannot be computed from state dicts)."""
    if plan.method.runs in ("sequential", "whole_model"):
        what = {"sequential": "applies its models one at a time and keeps its state in an output folder",
                "whole_model": "loads and runs a whole model folder on calibration data"}[plan.method.runs]
        raise MergeError(f"method {plan.method.name} {what}, which state dicts cannot give: use "
                         "modalmerge.merge(recipe, output) with model folders")
    sink = DictSink(plan)
    # the data pass's own checks say what state dicts lack (e.g. calibration data)
    def executor(one: Plan) -> Executor:
        return Executor(one, device=device, exact_stats=exact_stats, progress=False, data=data,
                        gather=calibration.gather)
    if plan.modules:
        modules.run_modules(plan, sink, executor)
    else:
        executor(plan).run(sink)
    return sink


def describe(plan: Plan) -> dict[str, Any]:
    """What --dry-run prints: the procedure's own summary of the plan."""
    return DESCRIPTIONS[plan.method.runs](plan)


def _stream(plan: Plan, output, o: RunOptions) -> Report:
    sink = FolderSink(plan, output, overwrite=o.overwrite, max_shard_bytes=o.max_shard_bytes,
                      tool_version=o.tool_version, copy_tokenizer=o.copy_tokenizer,
                      write_model_card=o.write_model_card,
                      inputs=[x for _, module_plan in plan.modules for x in plan_inputs(module_plan)])

    def executor(one: Plan) -> Executor:
        return Executor(one, device=o.device, exact_stats=o.exact_stats, progress=o.progress,
                        allow_pickle=o.allow_pickle, gather=calibration.gather)
    return modules.run_modules(plan, sink, executor) if plan.modules else executor(plan).run(sink)


def _compose(plan: Plan, output, o: RunOptions) -> Report:
    report, storage = mmer.compose(plan, output, device=o.device, overwrite=o.overwrite, exact_stats=o.exact_stats,
                                   progress=o.progress, max_shard_bytes=o.max_shard_bytes,
                                   tool_version=o.tool_version)
    report.statistics["storage"] = storage
    return report


def _sequential(plan: Plan, output, o: RunOptions) -> Report:
    start = time.perf_counter()
    continual.run_sequential(plan, output, overwrite=o.overwrite, progress=o.progress, tool_version=o.tool_version)
    merged = plan.merged
    return Report(seconds={"total": time.perf_counter() - start}, merged_tensors=len(merged),
                  copied_tensors=len(plan.tensors) - len(merged), merged_parameters=sum(t.meta.numel for t in merged))


def _whole_model(plan: Plan, output, o: RunOptions) -> Report:
    start = time.perf_counter()
    report = moe.run(plan, output, overwrite=o.overwrite, tool_version=o.tool_version)
    experts = report["expert_parameters"]
    return Report(seconds={"total": time.perf_counter() - start}, merged_tensors=2 * len(report["layers"]),
                  copied_tensors=0, merged_parameters=experts["before"], statistics={"experts": report})


def _streaming_summary(plan: Plan) -> dict[str, Any]:
    if plan.modules:
        return modules.summary(plan)
    summary = plan.summary()
    if plan.method.data(plan.params):
        summary["data"] = calibration.estimate(plan)
    return summary


PROCEDURES = {"streaming": _stream, "composed": _compose, "sequential": _sequential, "whole_model": _whole_model}
DESCRIPTIONS = {"streaming": _streaming_summary, "composed": _streaming_summary, "sequential": _streaming_summary,
                "whole_model": moe.summary}
