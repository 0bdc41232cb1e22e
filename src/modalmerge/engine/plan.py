"""Plan: a recipe and its opened models become a list of tensor jobs, checked before any work."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.hub import is_hub_reference, reference_folder
from ..checkpoint.safetensors_io import TensorMeta
from ..checkpoint.sources import TensorSource, adapter_base_path, load_json, open_source
from ..errors import MergeError, one_line
from ..methods.base import Method, Params, TensorInfo
from ..methods.registry import METHODS, get_method
from ..methods import schedules
from .architectures import Describer, spec_for
from .metrics import fill_metrics
from .recipe import Recipe

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DEFAULT_CHUNK_ELEMS = 1 << 22


@dataclass
class TensorPlan:
    name: str
    meta: TensorMeta                 # shape and dtype of the inputs (the base's)
    out_dtype: torch.dtype
    merge: bool                      # False: copied from `copy_source`
    info: TensorInfo
    chunks: list[tuple[int, int]] = field(default_factory=list)  # row ranges; one for a whole tensor

    @property
    def row_elems(self) -> int:
        n = 1
        for s in self.meta.shape[1:]:
            n *= s
        return n


@dataclass
class Plan:
    recipe: Recipe
    method: Method
    params: Params
    base: TensorSource | None
    models: list[TensorSource]
    model_names: list[str]
    weights: list[float]
    model_params: list[dict[str, Any]]
    tensors: list[TensorPlan]
    copy_source: TensorSource
    aux_folder: Path | None
    chunk_elems: int
    # per-tensor values (`{layers: [...]}` schedules, `{filters: [...]}` lists): the raw
    # parameters and the block count; resolved values cached per (layer, matched filters)
    raw_params: dict[str, Any] = field(default_factory=dict)
    raw_model_params: list[dict[str, Any]] = field(default_factory=list)
    raw_weights: dict[int, Any] = field(default_factory=dict)  # model index -> its `weight`
    num_layers: int = 0
    _by_key: dict = field(default_factory=dict, repr=False)

    @property
    def scheduled(self) -> bool:
        return any(schedules.has_schedules(m) for m in (self.raw_params, *self.raw_model_params, self.raw_weights))

    def weights_for(self, info: TensorInfo) -> list[float]:
        """The models' weights at this tensor (a per-tensor `weight` resolved; absent: 1)."""
        if not self.scheduled:
            return self.weights
        self.params_for(info)
        return self._by_key[self._key(info)][2]

    def _key(self, info: TensorInfo) -> tuple:
        return (info.layer, schedules.match_key([self.raw_params, *self.raw_model_params, self.raw_weights],
                                                info.name))

    def params_for(self, info: TensorInfo) -> tuple[Params, list[dict[str, Any]]]:
        """The method's parameters and per-model overrides at this tensor (schedules and filter
        lists resolved; a model's value a filter list leaves out falls back to the recipe's)."""
        if not self.scheduled:
            return self.params, self.model_params
        key = self._key(info)
        if key not in self._by_key:
            shared = schedules.resolve(self.raw_params, info.layer, self.num_layers, info.name)
            per_model = [schedules.resolve(m, info.layer, self.num_layers, info.name) for m in self.raw_model_params]
            try:
                params = self.method.parse_params(shared)
                for label, own in zip(self.model_names, per_model):
                    self.method.parse_params({**shared, **own}, where=f"models[{label}].params")
            except MergeError as e:  # build_plan resolves every tensor: this fails before any work
                raise MergeError(f"{e}; the value it has at tensor {info.name!r} (from a per-layer or "
                                 "filtered value)") from None
            weights = schedules.resolve(self.raw_weights, info.layer, self.num_layers, info.name)
            weights = [float(weights.get(i, 1.0)) if i in self.raw_weights else w for i, w in enumerate(self.weights)]
            if getattr(params, "normalize", False) and abs(sum(weights)) < 1e-12:
                raise MergeError(f"the model weights sum to 0 at tensor {info.name!r}, so they cannot be normalised; "
                                 "change a `weight`")
            self._by_key[key] = (params, per_model, weights)
        return self._by_key[key][:2]
    # the composed procedure's layout of the model folders (procedures/mmer.py: each model's parts)
    composition: Any = None
    # what the user allowed: importing code a recipe names (calibration callables), running a
    # model folder's own modelling code (auto_map); procedures/calibration.py reads them
    trust_recipe_code: bool = False
    trust_remote_code: bool = False
    # the output tokenizer when the recipe sets one (checkpoint/vocabulary.py; engine/embedding_views.py)
    vocabulary: Any = None
    # a `modules:` recipe (engine/modules.py): each module's own plan, by name, and the output
    # config's layer counts it sets ({dotted key: the source block of each output block})
    modules: list[tuple[str, "Plan"]] = field(default_factory=list)
    layer_counts: dict[str, list[int]] = field(default_factory=dict)

    @property
    def merged(self) -> list[TensorPlan]:
        return [t for t in self.tensors if t.merge]

    @property
    def num_inputs(self) -> int:
        return len(self.models) + (self.base is not None)

    def summary(self) -> dict[str, Any]:
        """The streaming estimates --dry-run prints: tensors, passes, memory and output size
        (procedures/run.describe adds what other procedures know: a data pass, a whole model)."""
        merged = self.merged
        largest = max((min(t.meta.numel, t.row_elems * max(r1 - r0 for r0, r1 in t.chunks)) for t in merged),
                      default=0)
        n_in = self.num_inputs
        # stacked float32 inputs, ~3 float32 temporaries of the stack's size, raw buffers of the
        # current and the prefetched job
        peak = largest * 4 * (n_in * 4) + 2 * largest * 4 * n_in
        out_bytes = sum(t.meta.numel * t.out_dtype.itemsize for t in self.tensors)
        stats = [s.name + (" (sampled)" if s.sampled else "") for s in self.method.statistics(self.params)]
        return {
            "method": self.method.name,
            "params": self.params.model_dump(by_alias=True),
            "base": self.base.label if self.base else None,
            "models": self.model_names,
            "tensors": len(self.tensors),
            "merged_tensors": len(merged),
            "copied_tensors": len(self.tensors) - len(merged),
            "merged_parameters": sum(t.meta.numel for t in merged),
            "jobs": sum(len(t.chunks) for t in merged),
            "passes": [f"statistics: {s}" for s in stats] + ["apply"],
            "estimated_peak_bytes": int(peak),
            "output_bytes": int(out_bytes),
            "data": None,
            # the output vocabulary and chat template (checkpoint/vocabulary.py), when the recipe sets them
            "vocabulary": self.vocabulary.summary() if self.vocabulary is not None else None,
        }


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _torch_dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


def read_model_type(folder: Path | None) -> str | None:
    if folder is None or not (folder / "config.json").exists():
        return None
    config = load_json(folder / "config.json", "model config", "fix or replace it")
    return config.get("model_type") if isinstance(config, dict) else None


def open_models(recipe: Recipe, allow_pickle: bool = False,
                preloaded: dict[str, TensorSource] | None = None) -> tuple[TensorSource | None, list[TensorSource]]:
    if recipe.slices:  # never opened as plain models: their layers are views (engine/slices.open_slices)
        raise MergeError("a recipe with `slices` is planned with procedures.run.plan_merge (api.merge)")
    preloaded = preloaded or {}

    def get(path: str, label: str, base: TensorSource | None) -> TensorSource:
        if path in preloaded:
            return preloaded[path]
        return open_source(path, label=label, allow_pickle=allow_pickle, base=base)

    base = None
    if recipe.base is not None:
        base = get(recipe.base, "base", None)
    models = []
    for m in recipe.models:
        adapter_base = base
        if base is None and Path(m.path).is_dir() and (Path(m.path) / "adapter_config.json").exists():
            named = adapter_base_path(Path(m.path))
            # a base named by hub id (as PEFT writes it) is read from the hub cache (checkpoint/hub.py)
            if named and (Path(named).exists() or is_hub_reference(named)):
                adapter_base = get(named, "adapter base", None)
        models.append(get(m.path, m.label, adapter_base))
    return base, models


def build_plan(recipe: Recipe, base: TensorSource | None, models: list[TensorSource],
               chunk_elems: int = DEFAULT_CHUNK_ELEMS, *, trust_recipe_code: bool = False,
               trust_remote_code: bool = False, layer_pattern: str | None = None) -> Plan:
    """Check the recipe against the method and the models, and list the tensor jobs. The trust
    flags are kept in the plan; procedures/run.plan_merge refuses, before any work, code named by
    the recipe (calibration callables) or by a model folder (auto_map) that the merge would run,
    unless the matching flag is given."""
    method = get_method(recipe.method)
    if method.metrics:  # plan-time hook: per-model loss/step from trainer_state.json
        filled = fill_metrics(recipe.models, method.metrics)
        recipe = recipe.model_copy(update={"models": [m.model_copy(update={"params": f})
                                                      for m, f in zip(recipe.models, filled)]})
    params, first_model_params = method_params(recipe, method)
    check_contract(recipe, method, base, models)
    check_fields(recipe, method)
    weights = model_weights(recipe)
    # per-tensor weights are checked at each tensor (Plan.params_for)
    if getattr(params, "normalize", False) and abs(sum(weights)) < 1e-12 and \
            not any(isinstance(m.weight, dict) for m in recipe.models):
        raise MergeError("the model weights sum to 0, so they cannot be normalised; change a `weight`")
    reference = base if base is not None else models[0]
    folder = reference_folder(recipe.copy_files_from, "copy_files_from") if recipe.copy_files_from \
        else reference.folder
    tensors = tensor_jobs(recipe, method, params, reference, models, folder, chunk_elems, layer_pattern)
    layers = [t.info.layer for t in tensors if t.merge and t.info.layer is not None]
    plan = Plan(recipe, method, params, base, models, [m.label for m in recipe.models], weights,
                first_model_params, tensors, reference, folder, chunk_elems,
                raw_params=dict(recipe.params), raw_model_params=[dict(m.params) for m in recipe.models],
                raw_weights={i: m.weight for i, m in enumerate(recipe.models) if schedules.is_per_tensor(m.weight)},
                num_layers=max(layers) + 1 if layers else 0,
                trust_recipe_code=trust_recipe_code, trust_remote_code=trust_remote_code)
    if plan.scheduled:
        check_per_tensor(plan, chunk_elems)
    return plan


def check_per_tensor(plan: Plan, chunk_elems: int) -> None:
    """Per-tensor values: resolve (and so validate) every merged tensor's parameters before any
    work, cut each tensor into blocks by its own parameters, and refuse a value that varies where
    a whole-model statistic needs one (a global trim threshold takes one density per model)."""
    method, first = plan.method, plan.params
    names = [s.name for s in method.statistics(first)]
    keys = [getattr(s, "density_key", None) for s in method.statistics(first)]
    checked: set[int] = set()
    for t in plan.merged:
        params, per_model = plan.params_for(t.info)
        t.chunks = _chunks(t, method, params, chunk_elems)
        if id(params) in checked:  # one resolved combination, already checked
            continue
        checked.add(id(params))
        if [s.name for s in method.statistics(params)] != names:
            raise MergeError(f"method {method.name}: a per-layer or filtered parameter changes the whole-model "
                             f"statistics the merge needs (at tensor {t.name!r}); give those parameters one value")
        for key in filter(None, keys):
            mine = [mp.get(key, getattr(params, key)) for mp in per_model]
            base = [mp.get(key, getattr(first, key)) for mp in plan.model_params]
            if mine != base:
                raise MergeError(f"method {method.name}: parameter {key!r} varies by tensor (at {t.name!r}), but a "
                                 "whole-model trim threshold takes one value per model; give it one value, or "
                                 "trim per tensor (`scope: tensor`)")


def model_weights(recipe: Recipe) -> list[float]:
    """Each model's weight; a per-tensor one (schedule or filter list) checked, and given by its
    first value (Plan.weights_for resolves it per tensor)."""
    weights = []
    for m in recipe.models:
        w = m.weight
        if isinstance(w, dict):
            try:
                schedules.check("weight", w)
            except ValueError as e:
                raise MergeError(f"model {m.label!r}: {e}") from None
            values = schedules.candidates(w) if schedules.is_per_tensor(w) else [w]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise MergeError(f"model {m.label!r}: `weight` must be a number, {{layers: [numbers]}} or "
                                 "{filters: [{filter: ..., value: number}, ...]}; fix it")
            w = values[0]
        weights.append(float(w))
    return weights


def method_params(recipe: Recipe, method: Method) -> tuple[Params, list[dict[str, Any]]]:
    """The method's parameters and each model's overrides, with the first value of each per-tensor
    value (schedule or filter list; Plan.params_for resolves them per tensor, build_plan checks
    every tensor's), and every value such a list holds validated alone."""
    try:
        first_params = schedules.first(recipe.params)
        first_model_params = [schedules.first(m.params) for m in recipe.models]
    except ValueError as e:
        raise MergeError(f"method {method.name}: {e}") from None
    params = method.parse_params(first_params)
    for entry, first in zip(recipe.models, first_model_params):
        unknown = set(entry.params) - set(method.params.per_model)
        if unknown:
            allowed = ", ".join(sorted(method.params.per_model)) or "none"
            raise MergeError(f"model {entry.label!r}: parameter {sorted(unknown)[0]!r} cannot be set per model "
                             f"for {method.name} (per-model parameters: {allowed})")
        method.parse_params({**first_params, **first}, where=f"models[{entry.label}].params")
    for raw, where in [(recipe.params, "params"), *((m.params, f"models[{m.label}].params") for m in recipe.models)]:
        for key, value in raw.items():
            if schedules.is_per_tensor(value):  # a bad value deep in a list fails here, before any work
                for one in schedules.candidates(value):
                    method.parse_params({**first_params, key: one}, where=where)
    return params, first_model_params


def check_contract(recipe: Recipe, method: Method, base: TensorSource | None, models: list[TensorSource]) -> None:
    """The method's input contract: a base required or forbidden, how many models, distinct names."""
    n = len(models)
    if method.base == "required" and base is None:
        raise MergeError(f"method {method.name} needs a base model: add `base: path/to/base` to the recipe")
    if method.base == "forbidden" and base is not None:
        raise MergeError(f"method {method.name} takes no base model: remove `base` from the recipe")
    if n < method.min_models:
        raise MergeError(f"method {method.name} needs at least {method.min_models} model(s), the recipe has {n}")
    if method.max_models is not None and n > method.max_models:
        raise MergeError(f"method {method.name} takes at most {method.max_models} model(s), the recipe has {n}")
    names = [m.label for m in recipe.models]
    dupes = {x for x in names if names.count(x) > 1}
    if dupes:
        raise MergeError(f"two models are named {sorted(dupes)[0]!r}; give each a distinct `name` in the recipe")
    if method.decoupled:
        check_task_names(method.name, names)


def tensor_jobs(recipe: Recipe, method: Method, params: Params, reference: TensorSource,
                models: list[TensorSource], folder: Path | None, chunk_elems: int,
                layer_pattern: str | None = None) -> list[TensorPlan]:
    """Every tensor of the reference model: merged (when selected, floating-point and not empty,
    after checking that every model has it alike) or copied, described by the architecture spec
    (its layer index by `layer_pattern` when given: one module's layers) and cut into row blocks."""
    out_dtype = _torch_dtype(recipe.dtype)
    spec = spec_for(read_model_type(folder))
    if layer_pattern is not None:
        spec = replace(spec, layer_pattern=layer_pattern)
    describer = Describer(spec, tuple((k, v) for k, v in part_patterns(recipe.parts)))
    include = recipe.include or ["*"]

    def wanted(name: str) -> bool:
        return _matches(name, include) and not _matches(name, recipe.exclude)

    tensors: list[TensorPlan] = []
    for name in reference.names():
        meta = reference.meta(name)
        # an empty tensor has no values to merge: it is copied (every model holds the same nothing)
        merge = wanted(name) and meta.dtype in FLOAT_DTYPES and meta.numel > 0
        if wanted(name):
            check_tensor(name, reference, models)
        info = describer.describe(name, meta.shape)
        dtype = out_dtype if (out_dtype is not None and meta.dtype in FLOAT_DTYPES) else meta.dtype
        plan = TensorPlan(name, meta, dtype, merge, info)
        plan.chunks = _chunks(plan, method, params, chunk_elems) if merge else [(0, max(meta.shape[0], 1) if meta.shape else 1)]
        tensors.append(plan)
    check_no_extra(reference, models, wanted)
    if not any(t.merge for t in tensors):
        raise MergeError("no tensor is selected for merging; check `include` and `exclude`")
    return tensors


# names that become folder names and mask keys (MMER's modalities/<name>/, TALL/EMR/MMER masks)
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")


def check_task_names(method: str, names: list[str]) -> None:
    """A decoupled method's model names: safe as folder names, and distinct once case is folded
    (some filesystems do not tell `Math` from `math`)."""
    seen: dict[str, str] = {}
    for name in names:
        if not _SAFE_NAME.fullmatch(name) or ".." in name:
            shown = one_line(name, 60)
            raise MergeError(f"model name {shown!r} cannot name the folders and masks of a {method} merge: use at "
                             "most 100 letters, digits, '.', '_' and '-', not starting with '.' or '-' and without "
                             "'..'; set `name:` in its recipe entry")
        key = name.casefold()
        if key in seen:
            raise MergeError(f"model names {seen[key]!r} and {name!r} differ only in case, which some filesystems do "
                             f"not tell apart; give one another `name` in the recipe")
        seen[key] = name


def check_fields(recipe: Recipe, method: Method) -> None:
    """Refuse a `weight` or `parts` the method does not apply: a field is never ignored silently
    (the data-aware fields, `calibration` and `optimizer_state`, are checked with the data pass:
    procedures/calibration.check_data_fields)."""
    for entry in recipe.models:
        if not method.weighted and entry.weight != 1.0:
            raise MergeError(f"model {entry.label!r}: field `weight` is not used by method {method.name}; remove it, "
                             "or choose a method that weights the models")
    if recipe.parts and not method.reads_parts:
        readers = sorted(m.name for m in METHODS.values() if m.reads_parts)
        raise MergeError(f"field `parts` is not used by method {method.name} (only {', '.join(readers)} "
                         "read it); remove it")


def who(src: TensorSource) -> str:
    """A model as messages name it: its recipe name and, when it has one, its path."""
    return f"{src.label!r} ({src.path})" if src.path is not None else repr(src.label)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


EXCLUDE_FIX = "add it to `exclude` in the recipe"


def check_tensor(name: str, reference: TensorSource, models: list[TensorSource],
                 exclude_fix: str = EXCLUDE_FIX) -> None:
    """That every model has tensor `name` with the reference's shape, and a float dtype where it has one."""
    meta = reference.meta(name)
    for src in models:
        if meta.dtype not in FLOAT_DTYPES:
            # copied from the reference, whatever the models hold, unless they hold weights there
            if name in src and src.meta(name).dtype in FLOAT_DTYPES:
                raise MergeError(f"tensor {name!r} is {_dtype_name(meta.dtype)} in model {who(reference)} but "
                                 f"{_dtype_name(src.meta(name).dtype)} in model {who(src)}; only floating-point "
                                 f"tensors are merged: {exclude_fix}, or fix the checkpoint")
            continue
        if name not in src:
            raise MergeError(f"model {who(src)} has no tensor {name!r} that {who(reference)} has; {exclude_fix} "
                             f"(it is then copied from {reference.label!r}), or merge models of one architecture")
        other = src.meta(name)
        if other.shape != meta.shape:
            raise MergeError(f"tensor {name!r} has shape {list(other.shape)} in model {who(src)} but "
                             f"{list(meta.shape)} in {who(reference)}; these cannot be merged: {exclude_fix}, or "
                             "merge models of one architecture")
        if other.dtype not in FLOAT_DTYPES:
            raise MergeError(f"tensor {name!r} is {_dtype_name(other.dtype)} in model {who(src)} but "
                             f"{_dtype_name(meta.dtype)} in {who(reference)}; only floating-point tensors are "
                             f"merged: {exclude_fix}, or fix the checkpoint")


def check_no_extra(reference: TensorSource, models: list[TensorSource], wanted,
                   exclude_fix: str = EXCLUDE_FIX) -> None:
    """That no model has a (wanted) tensor the reference lacks."""
    ref_names = set(reference.names())
    for src in models:
        extra = [x for x in src.names() if x not in ref_names and wanted(x)]
        if extra:
            raise MergeError(f"model {who(src)} has tensor {extra[0]!r} that {who(reference)} lacks; "
                             f"{exclude_fix}, or merge models of one architecture")


def part_patterns(parts: dict[str, str]):
    # recipe: {llm: "language_model.*", encoder: "vision_tower.*"} -> regexes on names
    for part, pattern in parts.items():
        yield fnmatch.translate(pattern).replace("\\Z", ""), part


def _chunks(plan: TensorPlan, method: Method, params: Params, chunk_elems: int) -> list[tuple[int, int]]:
    rows = plan.meta.shape[0] if plan.meta.shape else 1
    if plan.meta.numel <= chunk_elems or not method.chunkable(params, plan.info) or len(plan.meta.shape) == 0:
        return [(0, rows)]
    # row blocks whose element count is a multiple of 8, so bit-packed masks stay byte aligned
    per = max(8, (chunk_elems // max(plan.row_elems, 1)) // 8 * 8)
    return [(r, min(r + per, rows)) for r in range(0, rows, per)]
