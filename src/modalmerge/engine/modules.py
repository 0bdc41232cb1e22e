"""Multi-module merges (mergekit's `modules:`): a VLM's text decoder, vision tower and projector,
each merged with its own models or slices, base and parameters, in one merge.

What a module is comes from the architecture's data (engine/architectures.py MODULE_LAYOUTS,
mergekit 0.1.5's `_data/architectures`): the tensor-name prefixes it owns, how its layers are
numbered, which of its other tensors follow the layers, and the config key of its layer count. Each
module is planned as an ordinary merge (engine/plan.py) of views that show only its tensors
(checkpoint/parts.PartView): its `models` as they are, its `slices` as layer stacks renumbered within
the module (engine/slices.py; `model.language_model.layers.N` in a text decoder). So a gradient runs
over the module's own layers, at t = i/(n−1) for layer i of its n (t = 0 for its other tensors), and a
filter list is matched against the tensor's full name, as mergekit resolves them per module.

The plan of the whole merge holds every module's tensors (for the output and --dry-run) and the
module plans, which run one after the other into one output (`run_modules`). As in mergekit, a module
given as `slices` sets its layer count in the output config (`text_config.num_hidden_layers`); one
given as `models` leaves it. mergekit writes no tensor of a module the recipe leaves out (its output
then lacks, say, the vision tower); here that is an error naming the module, and a tensor of no module
would be too.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from ..checkpoint.parts import PartView
from ..checkpoint.sources import TensorSource, open_source
from ..errors import MergeError, one_line
from ..methods import schedules
from ..methods.registry import get_method
from .architectures import MODULE_LAYOUTS, ModuleLayout
from .executor import Report
from .plan import DEFAULT_CHUNK_ELEMS, Plan, build_plan, open_models, read_model_type
from .recipe import ModuleEntry, Recipe
from .slices import layer_sources, open_slices

NO_LAYERS = r"(?!)(\d+)"  # a module without layers: matches no name


def module_of(name: str, layouts: tuple[ModuleLayout, ...]) -> str | None:
    """The module owning tensor `name`: the one with the longest prefix of it (None: no module)."""
    best, length = None, -1
    for layout in layouts:
        for prefix in layout.prefixes:
            if name.startswith(prefix) and len(prefix) > length:
                best, length = layout.name, len(prefix)
    return best


def pre_pattern(layout: ModuleLayout) -> str:
    """The module's non-layer tensors taken from its first slice: all but its post-layer ones."""
    return rf"^(?!(?:{layout.post}))" if layout.post else ""


def plan_modules(recipe: Recipe, *, allow_pickle: bool = False, chunk_elems: int = DEFAULT_CHUNK_ELEMS,
                 trust_recipe_code: bool = False, trust_remote_code: bool = False,
                 preloaded: dict[str, TensorSource] | None = None) -> Plan:
    """The plan of a `modules:` recipe: one plan per module over its own tensors, held by a plan of
    the whole output (its `modules`), checked before any work."""
    method = get_method(recipe.method)
    if method.runs != "streaming" or method.decoupled:
        raise MergeError(f"method {method.name} cannot merge per module (`modules`): it is not merged tensor by "
                         "tensor into one model; use `models`")
    if recipe.models or recipe.slices:
        raise MergeError("give either `modules` or `models`/`slices` at the top of the recipe, not both; move the "
                         "models into the modules")
    given = [k for k in ("tokenizer_source", "tokenizer", "chat_template") if getattr(recipe, k) is not None]
    if given:
        raise MergeError(f"`{given[0]}` is not supported with `modules` yet; remove it (the output's tokenizer is "
                         "copied from the base model, or the first model)")
    full = _first_source(recipe, allow_pickle, preloaded)
    model_type = read_model_type(full.folder)
    layouts = MODULE_LAYOUTS.get(model_type or "", ())
    if not layouts:
        known = ", ".join(sorted(MODULE_LAYOUTS))
        raise MergeError(f"model {full.label!r} (model type {model_type!r}) has no modules known here (modules are "
                         f"known for model types {known}); merge it with `models` or `slices`")
    names = [layout.name for layout in layouts]
    for name in recipe.modules:
        if name not in names:
            raise MergeError(f"`modules.{one_line(name, 60)}`: {model_type} models have no module of that name "
                             f"(their modules: {', '.join(names)}); rename it")
    owners = {n: module_of(n, layouts) for n in full.names()}
    stray = [n for n, owner in owners.items() if owner is None]
    if stray:
        raise MergeError(f"tensor {stray[0]!r} of model {full.label!r} belongs to no module of {model_type} "
                         f"({', '.join(names)}); merge this model with `models`")
    left_out = [n for n in names if n not in recipe.modules and n in owners.values()]
    if left_out:
        raise MergeError(f"`modules` has no entry for module {left_out[0]!r} of these {model_type} models, whose "
                         f"tensors would be left out of the output (mergekit writes none of them); add "
                         f"`{left_out[0]}: {{models: [...]}}` (the base model alone keeps its weights)")
    plans: list[tuple[str, Plan]] = []
    counts: dict[str, list[int]] = {}
    for name, entry in recipe.modules.items():
        layout = next(x for x in layouts if x.name == name)
        try:
            plans.append((name, _plan_module(recipe, entry, layout, layouts, allow_pickle, chunk_elems,
                                             trust_recipe_code, trust_remote_code, preloaded)))
        except MergeError as e:
            raise MergeError(f"modules.{one_line(name, 60)}: {e}") from None
        if entry.slices and layout.layer_count_key:
            counts[layout.layer_count_key] = layer_sources(entry.slices)
    first = plans[0][1]
    return replace(first, recipe=recipe, tensors=[t for _, p in plans for t in p.tensors], modules=plans,
                   layer_counts=counts, raw_params={}, raw_model_params=[], raw_weights={}, _by_key={})


def per_module(recipe: Recipe, *, allow_pickle: bool = False,
               preloaded: dict[str, TensorSource] | None = None) -> Recipe:
    """A `models:` recipe whose values vary by layer, on a model with modules, as mergekit plans it:
    each module merged with the recipe's models (plan.py normalize_config), so that a gradient runs
    over each module's own layers (a text decoder's, a vision tower's), not over one count for the
    whole model. Any other recipe is returned as it is (per tensor, it merges alike either way)."""
    by_layer = [*recipe.params.values(), *(v for m in recipe.models for v in (m.weight, *m.params.values()))]
    if recipe.modules or recipe.slices or not recipe.models or not any(map(_varies_by_layer, by_layer)):
        return recipe
    method = get_method(recipe.method)
    if method.runs != "streaming" or method.decoupled or recipe.tokenizer_source or recipe.tokenizer \
            or recipe.chat_template:
        return recipe
    try:
        if method.data(method.parse_params(schedules.first(recipe.params))):
            return recipe  # calibration data runs through whole models
    except (MergeError, ValueError):
        return recipe  # the plan says what is wrong with them
    source = _first_source(recipe, allow_pickle, preloaded)
    layouts = MODULE_LAYOUTS.get(read_model_type(source.folder) or "", ())
    owners = {module_of(n, layouts) for n in source.names()}
    if not layouts or None in owners:
        return recipe
    return recipe.model_copy(update={"models": [], "modules": {
        layout.name: ModuleEntry(models=recipe.models) for layout in layouts if layout.name in owners}})


def _varies_by_layer(value: Any) -> bool:
    """A schedule over the layers, alone or as a filter list's value (a malformed value is the plan's
    to report)."""
    return schedules.is_schedule(value) or (schedules.is_filters(value) and isinstance(value["filters"], list) and any(
        isinstance(e, dict) and schedules.is_schedule(e.get("value")) for e in value["filters"]))


def _first_source(recipe: Recipe, allow_pickle: bool, preloaded: dict[str, TensorSource] | None) -> TensorSource:
    """The model whose names and config say what the modules are: the base, else the first module's first model."""
    entry = next(iter(recipe.modules.values()), None) or ModuleEntry(models=recipe.models)
    path = recipe.base or entry.base or (entry.slices[0].sources[0].path if entry.slices else entry.models[0].path)
    if preloaded and path in preloaded:
        return preloaded[path]
    return open_source(path, label=Path(path).name or path, allow_pickle=allow_pickle)


def _module_recipe(recipe: Recipe, entry: ModuleEntry) -> Recipe:
    """The module as a recipe of its own: its models or slices and base, its parameters over the recipe's
    (a filter list of the module's that matches nothing at a tensor leaves the recipe's value)."""
    params = dict(recipe.params)
    for key, value in entry.params.items():
        params[key] = schedules.with_fallback(value, params[key]) if key in params else value
    return recipe.model_copy(update={"models": entry.models, "slices": entry.slices, "modules": {}, "params": params,
                                     "base": entry.base or (None if entry.slices else recipe.base)})


def _plan_module(recipe: Recipe, entry: ModuleEntry, layout: ModuleLayout, layouts: tuple[ModuleLayout, ...],
                 allow_pickle: bool, chunk_elems: int, trust_recipe_code: bool, trust_remote_code: bool,
                 preloaded: dict[str, TensorSource] | None) -> Plan:
    sub = _module_recipe(recipe, entry)

    def own(src: TensorSource) -> PartView:
        return PartView(src, {n: n for n in src.names() if module_of(n, layouts) == layout.name}, src.label)

    pattern = layout.layer_pattern or NO_LAYERS
    if entry.slices:
        paths = {x.path for s in entry.slices for x in [*s.sources, *([s.base] if s.base else [])]}
        views = {p: own((preloaded or {}).get(p) or open_source(p, label=Path(p).name or p, allow_pickle=allow_pickle))
                 for p in paths}
        sub, base, models = open_slices(sub, allow_pickle=allow_pickle, preloaded=views, layer_pattern=pattern,
                                        pre_pattern=pre_pattern(layout))
    else:
        base, models = open_models(sub, allow_pickle=allow_pickle, preloaded=preloaded)
        base, models = (own(base) if base is not None else None), [own(m) for m in models]
    plan = build_plan(sub, base, models, chunk_elems, trust_recipe_code=trust_recipe_code,
                      trust_remote_code=trust_remote_code, layer_pattern=pattern)
    if plan.method.data(plan.params):
        raise MergeError(f"method {plan.method.name} with these parameters runs calibration data through whole "
                         "models, which a module cannot give; merge with `models`")
    return plan


def run_modules(plan: Plan, sink, executor_for: Callable[[Plan], Any]) -> Report:
    """Run each module's plan (`executor_for(module plan).run(sink)`) into the one output, closed
    once all are written; any failure aborts it."""
    class OneOutput:  # each module's run closes it; only the last close is the output's
        def __getattr__(self, name):
            return getattr(sink, name)

        def close(self, manifest=None):
            return None

    report = Report()
    try:
        for _, module_plan in plan.modules:
            done = executor_for(module_plan).run(OneOutput())
            for key, value in done.seconds.items():
                report.seconds[key] = report.seconds.get(key, 0.0) + value
            report.merged_tensors += done.merged_tensors
            report.copied_tensors += done.copied_tensors
            report.merged_parameters += done.merged_parameters
            report.statistics.update(done.statistics)
        sink.close()
    except BaseException:
        sink.abort()
        raise
    return report


def summary(plan: Plan) -> dict[str, Any]:
    """--dry-run of a `modules:` merge: the whole output's counts, and each module's models,
    parameters and tensors."""
    subs = [(name, p.summary()) for name, p in plan.modules]
    s = plan.summary()
    s["models"] = list(dict.fromkeys(m for _, x in subs for m in x["models"]))
    s["estimated_peak_bytes"] = max(x["estimated_peak_bytes"] for _, x in subs)
    s["jobs"] = sum(x["jobs"] for _, x in subs)
    s["modules"] = {name: {k: x[k] for k in ("base", "models", "params", "tensors", "merged_tensors")} |
                    {"layers": p.num_layers}
                    for (name, x), (_, p) in zip(subs, plan.modules)}
    return s
