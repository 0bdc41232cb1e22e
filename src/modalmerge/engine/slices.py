"""Layer stacking (mergekit's `slices:`): an output model whose blocks are other models' layer
ranges, each slice merged across its sources with the recipe's method, then renumbered.

A slices recipe becomes an ordinary merge whose models are views (checkpoint/layer_views.py):
model j is the j-th source of every slice, stacked; the base, when slices have one, is each slice's
base stacked the same way. The embeddings come from the first slice's sources and the final norm
and LM head from the last slice's, as mergekit plans them (plan.py: pre-weights over the first
slice, post-weights over the last). The engine then merges the views as it merges any models.

Parameters keep mergekit's meaning (config.py ConfigReader, parameter_resolver.py): a source's
own value, else its slice's, else the recipe's, else the method's default; a gradient runs over
the slice's own blocks (block i of n at t = i/(n−1), t = 1 for a single block; embeddings, norm
and head at t = 0); a filter is matched against the output name for shared parameters and the
source's own tensor name for per-model ones. Here they are resolved per output tensor when the
views are opened and handed to the engine as per-tensor values (methods/schedules.py filter lists
on exact tensor names), so the engine needs no knowledge of slices.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..checkpoint.layer_views import PRE_PATTERN, LayerStack, Piece, block_count
from ..checkpoint.sources import TensorSource, open_source
from ..errors import MergeError, one_line
from ..methods import schedules
from ..methods.base import MergekitForm, Method
from ..methods.registry import get_method
from .architectures import spec_for
from .mergekit_output import output_fields


class SliceSource(BaseModel):
    """Blocks [layers[0], layers[1]) of one model, with this model's parameters in the slice."""

    model_config = ConfigDict(extra="forbid", strict=True)

    path: str
    layers: list[int]
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("layers")
    @classmethod
    def _range(cls, v):
        if len(v) != 2 or not 0 <= v[0] < v[1]:
            raise ValueError(f"must be [start, stop) with 0 <= start < stop, not {v}")
        return v

    @property
    def length(self) -> int:
        return self.layers[1] - self.layers[0]


class SliceEntry(BaseModel):
    """One output slice: its sources (model j of the merge is the j-th source of every slice), an
    optional base (with its own layer range), and parameters for every source of the slice."""

    model_config = ConfigDict(extra="forbid", strict=True)

    sources: list[SliceSource]
    base: SliceSource | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("sources")
    @classmethod
    def _sources(cls, v):
        if not v:
            raise ValueError("a slice needs at least one source")
        return v

    @property
    def length(self) -> int:
        return self.sources[0].length

    def with_paths(self, fix: Callable[[str], str]) -> "SliceEntry":
        def one(s: SliceSource | None) -> SliceSource | None:
            return None if s is None else s.model_copy(update={"path": fix(s.path)})
        return self.model_copy(update={"sources": [one(s) for s in self.sources], "base": one(self.base)})


def check_slices(slices: list[SliceEntry], where: str = "recipe") -> None:
    """What the layout needs: each slice's sources (and base) of one length, the same number of
    sources in every slice, and a base in every slice or in none."""
    for i, s in enumerate(slices):
        lengths = {(x.path, tuple(x.layers)): x.length for x in [*s.sources, *([s.base] if s.base else [])]}
        if len(set(lengths.values())) > 1:
            shown = ", ".join(f"{Path(p).name or p} {list(r)}" for p, r in lengths)
            raise MergeError(f"{where}: slices[{i}]: its sources cover different numbers of layers ({one_line(shown)}); "
                             "give every source of a slice a layer range of the same length")
    counts = {len(s.sources) for s in slices}
    if len(counts) > 1:
        raise MergeError(f"{where}: the slices have different numbers of sources ({sorted(counts)}); each model of the "
                         "merge is one source of every slice: give every slice the same number of sources")
    for i, s in enumerate(slices):
        scopes = [(f"slices[{i}].params", s.params),
                  *((f"slices[{i}].sources[{j}].params", x.params) for j, x in enumerate(s.sources))]
        for at, scope in scopes:
            for key, value in scope.items():
                try:
                    schedules.check(key, value)
                except ValueError as e:
                    raise MergeError(f"{where}: {at}: {e}") from None
    bases = {s.base is not None for s in slices}
    if len(bases) > 1:
        raise MergeError(f"{where}: some slices have a base model and others none; give every slice a base "
                         "(mergekit: a `base_model` among each slice's sources) or none")


def layer_sources(slices: list[SliceEntry]) -> list[int]:
    """For each output block, the block of the first source it comes from (for layer-indexed
    config lists such as `layer_types`)."""
    return [s.sources[0].layers[0] + i for s in slices for i in range(s.length)]


# ------------------------------------------------------------------ mergekit's form

_SLICE_FIELDS = ("sources", "base_model", "parameters", "residual_weight")
_SOURCE_FIELDS = ("model", "layer_range", "parameters")
# mergekit flags that change what the method does as a whole: only at the top level here
_FLAGS = ("normalize", "rescale", "int8_mask")


def slices_from_mergekit(data: dict[str, Any], where: str, method: Method, form: MergekitForm, base: str | None,
                         top: dict[str, Any], *, reference: Callable[[Any, str, str], str],
                         value: Callable[[Any, str, str], Any],
                         shared: Callable[[MergekitForm, dict[str, Any], str], dict[str, Any]]) -> dict[str, Any]:
    """mergekit's `slices:` recipe in the native form. `top`: its top-level parameters already in
    the native value form; `reference`, `value`, `shared`: engine/recipe.py's translations of a
    model reference, of one parameter value, and of the method-wide parameters."""
    if data.get("models") is not None:
        raise MergeError(f"{where}: give either `models` or `slices`, not both (as mergekit requires)")
    raw = data["slices"]
    if not isinstance(raw, list) or not raw:
        raise MergeError(f"{where}: `slices` must be a non-empty list of {{sources: [{{model, layer_range}}, ...]}}; "
                         "fix it")
    rename = form.per_model_renames
    flags = {k: v for k, v in top.items() if k in _FLAGS}
    params = shared(form, {**{k: v for k, v in form.defaults.items() if k in _FLAGS}, **flags}, where)
    params.update({k: v for k, v in form.defaults.items() if k not in _FLAGS})
    global_scope = {rename.get(k, k): v for k, v in top.items() if k not in _FLAGS}
    base_is_input = form.base_is_input or method.base == "forbidden"
    slices = []
    for i, s in enumerate(raw):
        at = f"slices[{i}]"
        if not isinstance(s, dict) or not isinstance(s.get("sources"), list) or not s["sources"]:
            raise MergeError(f"{where}: {at} must be a mapping with `sources: [{{model, layer_range}}, ...]`; fix it")
        extra = [one_line(k, 60) for k in s if k not in _SLICE_FIELDS]
        if extra:
            raise MergeError(f"{where}: {at} has unknown field {extra[0]!r}; a slice has {', '.join(_SLICE_FIELDS)}")
        if s.get("residual_weight") is not None:
            raise MergeError(f"{where}: {at}.residual_weight is not applied (mergekit 0.1.5 ignores it too); remove it")
        slice_base = reference(s["base_model"], where, f"{at}.base_model") if s.get("base_model") is not None else base
        scope = _scope(s.get("parameters"), where, f"{at}.parameters", value, rename)
        scope = {**global_scope, **{k: schedules.with_fallback(v, global_scope[k]) if k in global_scope else v
                                    for k, v in scope.items()}}
        sources = [_source(x, where, f"{at}.sources[{j}]", reference, value, rename, scope)
                   for j, x in enumerate(s["sources"])]
        entry: dict[str, Any] = {"sources": sources, "params": scope}
        if slice_base is not None:
            at_base = [x for x in sources if x["path"] == slice_base]
            # as mergekit: a base must be among the inputs, except where its methods ignore the base
            # (passthrough's single input, linear's average)
            if not at_base and not (form.base_is_input or method.max_models == 1):
                raise MergeError(f"{where}: {at}: its base model {slice_base!r} is not among its sources; add it "
                                 "with a `layer_range`")
            if at_base and base_is_input and method.base == "forbidden" and not form.base_is_input:
                sources.sort(key=lambda x: x["path"] != slice_base)  # SLERP goes from the base
            elif at_base and not base_is_input:
                sources.remove(at_base[0])
                if at_base[0]["params"]:
                    raise MergeError(f"{where}: {at}: the base model's `parameters` are not used (the base is no "
                                     "task vector); remove them")
                entry["base"] = at_base[0]
        slices.append(entry)
    try:
        check_slices([SliceEntry.model_validate(s) for s in slices], where)
    except ValueError as e:  # pydantic's, for a value the checks above let through
        raise MergeError(f"{where}: `slices`: {one_line(e)}") from None
    return {"method": method.name, "models": [], "slices": slices, "params": params, "source_format": "mergekit",
            **output_fields(data, base, where)}


def _scope(raw: Any, where: str, at: str, value, rename: dict[str, str]) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise MergeError(f"{where}: `{at}` must be a mapping of parameter names to values; fix it")
    flags = [k for k in raw if k in _FLAGS]
    if flags:
        raise MergeError(f"{where}: `{at}.{flags[0]}` can only be set for the whole recipe here; move it to the "
                         "top-level `parameters`")
    return {rename.get(k, k): value(v, where, f"{at}.{k}") for k, v in raw.items()}


def _source(raw: Any, where: str, at: str, reference, value, rename, slice_scope) -> dict[str, Any]:
    if not isinstance(raw, dict) or "model" not in raw:
        raise MergeError(f"{where}: {at} has no `model`; add `model: path/to/model` and `layer_range: [start, stop]`")
    extra = [one_line(k, 60) for k in raw if k not in _SOURCE_FIELDS]
    if extra:
        raise MergeError(f"{where}: {at} has unknown field {extra[0]!r}; a slice source has {', '.join(_SOURCE_FIELDS)}")
    r = raw.get("layer_range")
    if not (isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r)):
        raise MergeError(f"{where}: {at}.layer_range must be [start, stop] (two integers); fix it")
    if not 0 <= r[0] < r[1]:
        raise MergeError(f"{where}: {at}.layer_range {r} is empty or negative; give 0 <= start < stop")
    own = _scope(raw.get("parameters"), where, f"{at}.parameters", value, rename)
    own = {k: schedules.with_fallback(v, slice_scope[k]) if k in slice_scope else v for k, v in own.items()}
    return {"path": reference(raw["model"], where, f"{at}.model"), "layers": list(r), "params": own}


# ------------------------------------------------------------------ opening: views and per-tensor values

def open_slices(recipe, *, allow_pickle: bool = False, preloaded: dict[str, TensorSource] | None = None,
                layer_pattern: str | None = None, pre_pattern: str = PRE_PATTERN):
    """The recipe's slices opened as views: (the recipe with `models`/`base` standing for the views
    and every parameter resolved per output tensor, the base view or None, the model views).
    `layer_pattern` / `pre_pattern`: one module's layers and pre-layer tensors (engine/modules.py);
    by default the architecture's."""
    method = get_method(recipe.method)
    if method.runs != "streaming":
        raise MergeError(f"method {method.name} cannot stack layers (`slices`): it is not merged tensor by tensor; "
                         "use `models`")
    if recipe.models:
        raise MergeError("give either `models` or `slices`, not both")
    if recipe.base is not None:
        raise MergeError("`base` with `slices`: give each slice its own `base: {path, layers}` instead")
    slices = recipe.slices
    check_slices(slices)
    preloaded = preloaded or {}
    opened: dict[str, TensorSource] = {}

    def get(path: str) -> TensorSource:
        if path not in opened:
            opened[path] = preloaded.get(path) or open_source(path, label=Path(path).name or path,
                                                              allow_pickle=allow_pickle)
        return opened[path]

    first = get(slices[0].sources[0].path)
    pattern = layer_pattern or spec_for(_model_type(first.folder)).layer_pattern
    layer_re = re.compile(pattern)
    for i, s in enumerate(slices):
        for j, x in enumerate([*s.sources, *([s.base] if s.base else [])]):
            n = block_count(get(x.path), layer_re)
            if x.layers[1] > n:
                what = f"sources[{j}]" if j < len(s.sources) else "base"
                raise MergeError(f"slices[{i}].{what}: layer range {x.layers} of model {x.path!r} goes past its "
                                 f"{n} layers; give a range within [0, {n}]")
    starts = [sum(s.length for s in slices[:i]) for i in range(len(slices))]
    labels = _labels([s.path for s in slices[0].sources])

    def stack(pick, label: str) -> LayerStack:
        return LayerStack([Piece(get(pick(s).path), pick(s).layers[0], pick(s).layers[1], o)
                           for s, o in zip(slices, starts)], label, pattern, pre_pattern)

    views = [stack(lambda s, j=j: s.sources[j], labels[j]) for j in range(len(slices[0].sources))]
    base = stack(lambda s: s.base, "base") if slices[0].base is not None else None
    reference = base or views[0]
    names = reference.names()
    per_model_keys = set(method.params.per_model) | {"weight"}
    models = []
    for j, view in enumerate(views):
        values = {k: {} for s in slices for k in {*s.sources[j].params, *s.params} if k in per_model_keys}
        for name in names:
            k_slice, layer, n = _position(name, reference, layer_re, starts, slices)
            if name not in view:
                continue  # the engine names the model that lacks it
            source_name = view.origin(name)[1]
            src = slices[k_slice].sources[j]
            own = schedules.resolve(src.params, layer, n, source_name)
            around = schedules.resolve(slices[k_slice].params, layer, n, source_name)
            for key in values:
                if key in own or key in around:
                    values[key][name] = own[key] if key in own else around[key]
        for s_i, s in enumerate(slices):
            bad = sorted(set(s.sources[j].params) - per_model_keys)
            if bad:
                allowed = ", ".join(sorted(per_model_keys))
                raise MergeError(f"slices[{s_i}]: model {s.sources[j].path!r}: parameter {bad[0]!r} cannot be set "
                                 f"per model for {method.name} (per-model parameters: {allowed}); set it for the "
                                 "slice")
        weights = values.pop("weight", {})
        weight = _one_weight(weights, names, labels[j])
        models.append({"path": slices[0].sources[j].path, "name": labels[j], "weight": weight,
                       "params": {k: v for k, v in ((k, compress(vals, names)) for k, vals in values.items())
                                  if v is not None}})
    params = dict(recipe.params)
    for key in sorted({k for s in slices for k in s.params if k not in per_model_keys}):
        vals = {}
        for name in names:
            k_slice, layer, n = _position(name, reference, layer_re, starts, slices)
            scope = slices[k_slice].params
            got = schedules.resolve({key: scope[key]}, layer, n, name) if key in scope else {}
            if key in got:
                vals[name] = got[key]
        packed = compress(vals, names)
        if packed is not None:
            params[key] = schedules.with_fallback(packed, params[key]) if key in params else packed
    data = {**recipe.model_dump(exclude={"source_text"}), "models": models, "params": params,
            "base": slices[0].base.path if base is not None else None}
    expanded = type(recipe).model_validate(data).model_copy(update={"source_text": recipe.source_text})
    return expanded, base, views


def _model_type(folder: Path | None) -> str | None:
    config = None if folder is None else folder / "config.json"
    if config is None or not config.is_file():
        return None
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    return data.get("model_type") if isinstance(data, dict) else None


def _labels(paths: list[str]) -> list[str]:
    names = [Path(p).name or p for p in paths]
    counts = Counter(names)
    return [f"{n}#{j}" if counts[n] > 1 else n for j, n in enumerate(names)]


def _position(name: str, view: LayerStack, layer_re: re.Pattern, starts: list[int],
              slices: list[SliceEntry]) -> tuple[int, int | None, int]:
    """(slice index, block within the slice or None, the slice's block count) of an output tensor:
    a block's own slice; embeddings the first slice's, at t = 0; the rest the last slice's, at t = 0."""
    m = layer_re.search(name)
    if m is None:
        k = 0 if view.is_pre(name) else len(slices) - 1
        return k, None, slices[k].length
    out = int(m.group(1))
    k = max(i for i, o in enumerate(starts) if o <= out)
    return k, out - starts[k], slices[k].length


def _one_weight(weights: dict[str, Any], names: list[str], label: str) -> float | dict[str, Any]:
    """A model's `weight`: one number, or per tensor (absent where no scope gives one: 1)."""
    bad = [w for w in weights.values() if not isinstance(w, (int, float)) or isinstance(w, bool)]
    if bad:
        raise MergeError(f"model {label!r}: `weight` must be a number, not {one_line(bad[0], 40)!r}")
    packed = compress(weights, names)
    return 1.0 if packed is None else float(packed) if not isinstance(packed, dict) else packed


def compress(values: dict[str, Any], names: list[str]) -> Any:
    """Per-tensor values ({output name: value}; a name left out has no value there) as one
    parameter value: a plain value when every tensor has the same, else a filter list on exact
    tensor names (longest names first, so that no name's entry catches a longer name that holds
    it), with the most common value as the catch-all when every tensor has one. None: no tensor
    has a value."""
    if not values:
        return None
    counts = Counter(values.values())
    common, _ = counts.most_common(1)[0]
    full = len(values) == len(names)
    if full and len(counts) == 1:
        return common
    listed = [n for n in names if n in values and not (full and values[n] == common)]
    # a name holding a listed one must come with its own entry, or the listed one would catch it
    listed += [n for n in names if n in values and n not in listed and any(x in n for x in listed)]
    listed.sort(key=len, reverse=True)
    entries = [{"filter": n, "value": values[n]} for n in listed]
    if full:
        entries.append({"value": common})
    packed = {"filters": entries}
    for n in names:  # exact: every tensor gets its own value, or none
        got = schedules.resolve({"v": packed}, None, 1, n)
        if got.get("v", _NONE) != values.get(n, _NONE):
            raise MergeError(f"tensor {n!r}: its parameter values cannot be told apart from those of a tensor whose "
                             "name it holds; give those parameters one value across the slices")
    return packed


_NONE = object()
