"""A native recipe as the mergekit 0.1.5 recipe that means the same merge, for `bench speed --mergekit`.

This is the inverse of engine/recipe.py's from_mergekit, written from each method's MergekitForm data
(methods/base.py) and no method's name, so a method registered with a form is covered as it is.
The answer is only trusted after it has been translated back: parse_recipe of the mergekit recipe
must give a merge with the same meaning (per model: path, weight and every effective parameter,
defaults filled in; the base; the output dtype). Where no form gives that, the answer is None and a
reason naming the parameters that differ, e.g. native TIES's default `scope: global` against
mergekit's per-tensor trim.
"""

from __future__ import annotations

from typing import Any

from ..engine.recipe import Recipe, parse_recipe
from ..errors import MergeError
from ..methods.base import MergekitForm, Method
from ..methods.registry import get_method

# the recipe fields this translation carries over; any other (include, seed, parts, calibration, and
# fields added later) must keep its default, or there is no mergekit recipe (copy_files_from only
# names where config files come from; source_* are the tool's own)
_TRANSLATED_FIELDS = {"method", "base", "models", "params", "dtype", "copy_files_from", "source_format", "source_text"}


def _other_fields() -> list[str]:
    return [f for f in Recipe.model_fields if f not in _TRANSLATED_FIELDS]


def to_mergekit(native: dict[str, Any] | Recipe, mergekit_params: dict[str, dict[str, bool]] | None = None
                ) -> tuple[dict[str, Any] | None, str]:
    """(the mergekit recipe, "") for a native recipe, or (None, why there is none).

    `mergekit_params`: the parameters of each method of the mergekit that will run the recipe, each
    with whether it is required (PARAMETER_NAMES_SCRIPT's answer); a required one is always written,
    one it does not know is left out where that changes nothing and is a reason otherwise. None: no
    such check.

    Arithmetic dtype: mergekit's `dtype` is the dtype it computes in when `out_dtype` is given;
    modalmerge always computes in float32, so a native `dtype: X` becomes `dtype: float32,
    out_dtype: X`. A native recipe without `dtype` gets none (mergekit then computes in the
    stored dtype).
    """
    recipe = parse_recipe(native)
    method = get_method(recipe.method)
    if not method.mergekit:
        return None, f"{method.name} has no mergekit form"
    for field_name in _other_fields():
        if getattr(recipe, field_name) != Recipe.model_fields[field_name].get_default(call_default_factory=True):
            return None, f"the recipe's `{field_name}` has no mergekit equivalent here"
    for m in recipe.models:
        for field_name, f in type(m).model_fields.items():
            if field_name not in ("path", "name", "weight", "params") and \
                    getattr(m, field_name) != f.get_default(call_default_factory=True):
                return None, f"model {m.label!r}: `{field_name}` has no mergekit equivalent here"
    reasons = []
    for form in method.mergekit:
        if mergekit_params is not None and form.name not in mergekit_params:
            reasons.append(f"this mergekit has no method {form.name!r}")
            continue
        try:
            mk, why = _translate(recipe, method, form, mergekit_params)
        except MergeError as e:  # a value the mergekit form cannot take
            mk, why = None, str(e)
        if mk is not None:
            return mk, ""
        reasons.append(why)
    return None, "; ".join(reasons)


def _translate(recipe: Recipe, method: Method, form: MergekitForm, known: dict[str, dict[str, bool]] | None
               ) -> tuple[dict[str, Any] | None, str]:
    to_mk = {native: mk for mk, native in form.per_model_renames.items()}
    mk: dict[str, Any] = {"merge_method": form.name}
    if method.base == "forbidden":
        # from_mergekit reads mergekit's base_model as the first input (SLERP's t = 0 end)
        if recipe.models:
            mk["base_model"] = recipe.models[0].path
    elif recipe.base is not None and not form.base_is_input:
        mk["base_model"] = recipe.base
    # base_is_input: mergekit would average a base_model with the models, which the native method
    # does not do with its base; the same merge is the models alone
    mk["models"] = [{"model": m.path, "parameters": {"weight": m.weight} if method.weighted else {}}
                    for m in recipe.models]
    # a parameter is written when the recipe gives it, when mergekit's default would differ, or
    # when the running mergekit requires it; the rest are left to mergekit's defaults (some native
    # parameters may not even be given together, e.g. an option of a mode that is off)
    required = {k for k, needed in (known or {}).get(form.name, {}).items() if needed}
    # what the round trip gives where the recipe writes nothing: mergekit's defaults (the form's
    # `defaults`, translated), else the native defaults
    defaults = {f.alias or k: f.default for k, f in method.params.model_fields.items() if not f.is_required()}
    baseline = defaults | parse_recipe(mk, "mergekit recipe").params
    params = {}
    for key, value in _effective(method, recipe.params).items():
        entry = _mergekit_entry(form, to_mk, key, value)
        if entry is not None and (key in recipe.params or value != baseline.get(key) or entry[0] in required):
            params[entry[0]] = entry[1]
    for m, entry_out in zip(recipe.models, mk["models"]):
        for key, value in m.params.items():
            entry = _mergekit_entry(form, to_mk, key, value)
            if entry is not None:
                entry_out["parameters"][entry[0]] = entry[1]
    if params:
        mk["parameters"] = params
    if recipe.dtype is not None:
        mk.update({"dtype": recipe.dtype} if recipe.dtype == "float32" else
                  {"dtype": "float32", "out_dtype": recipe.dtype})
    dropped = _drop_unknown(mk, form, known)
    differences = _differences(recipe, mk, method, form)
    if differences:
        why = f"not mergekit's {form.name}: " + ", ".join(differences)
        if dropped:
            why += f" (this mergekit's {form.name} takes no {', '.join(sorted(dropped))})"
        return None, why
    return mk, ""


def _mergekit_entry(form: MergekitForm, to_mk: dict[str, str], key: str, value: Any) -> tuple[str, Any] | None:
    """One native parameter as mergekit's (name, value); None for what the form itself implies
    (its `native` settings, the election's tie rule): the round trip checks those."""
    if key in form.native:
        return None
    value = _mergekit_value(value)
    if form.electing and key == "tie":
        return None
    if form.electing and key == "aggregate":
        return ("normalize", True) if value == "mean" else ("normalize", False) if value == "sum" else None
    if form.rescale and key == "rescale":
        return ("rescale", True) if value == "l1" else ("rescale", False) if value == "none" else None
    return to_mk.get(key, key), value


def _mergekit_value(value: Any) -> Any:
    """A native schedule (methods/schedules.py) as mergekit writes it: `{layers: [...]}` is a
    gradient list, `{filters: [...]}` a filter list; a scalar is kept."""
    if isinstance(value, dict) and set(value) == {"layers"}:
        return value["layers"]
    if isinstance(value, dict) and set(value) == {"filters"}:
        return [{**entry, "value": _mergekit_value(entry["value"])} for entry in value["filters"]]
    return value


def _drop_unknown(mk: dict[str, Any], form: MergekitForm, known: dict[str, dict[str, bool]] | None) -> set[str]:
    """Remove the parameters the running mergekit does not take (the round trip then says whether
    that mattered); the names removed."""
    if known is None:
        return set()
    names = known.get(form.name, {})
    dropped = set()
    for params in [mk.get("parameters", {})] + [m["parameters"] for m in mk["models"]]:
        for key in [k for k in params if k not in names]:
            dropped.add(key)
            del params[key]
    if "parameters" in mk and not mk["parameters"]:
        del mk["parameters"]
    return dropped


def _effective(method: Method, params: dict[str, Any]) -> dict[str, Any]:
    """Every parameter's value, defaults filled in, by its recipe name; schedules (per layer, per
    tensor name) kept as written (they are checked per tensor at merge time)."""
    schedules = {k: v for k, v in params.items() if isinstance(v, dict)}
    scalars = {k: v for k, v in params.items() if k not in schedules}
    return method.parse_params(scalars).model_dump(by_alias=True) | schedules


def merge_meaning(recipe: Recipe, method: Method, form: MergekitForm | None = None) -> dict[str, Any]:
    """What decides a merge's tensors, comparable between two recipes: per model its path, weight
    and effective parameters; the base (not for a form whose native method takes no base as an
    input); the output dtype; the fields a mergekit recipe cannot set."""
    method_level = dict(recipe.params)
    return {
        "method": recipe.method,
        "base": None if form is not None and form.base_is_input else recipe.base,
        "dtype": recipe.dtype,
        "models": [(m.path, m.weight, _effective(method, {**method_level, **m.params})) for m in recipe.models],
        "per_model_keys": sorted({k for m in recipe.models for k in m.params} - set(method.params.per_model)),
        **{f: getattr(recipe, f) for f in _other_fields()},
    }


def _differences(recipe: Recipe, mk: dict[str, Any], method: Method, form: MergekitForm) -> list[str]:
    """What the mergekit recipe, translated back, changes in the native recipe's meaning."""
    back = parse_recipe(mk, "mergekit recipe")
    if back.method != recipe.method:
        return [f"method {back.method}"]
    want, got = merge_meaning(recipe, method, form), merge_meaning(back, method, form)
    out = []
    if got["per_model_keys"]:
        out.append(f"mergekit sets {', '.join(got['per_model_keys'])} per model, which {method.name} does not take")
    if len(want["models"]) != len(got["models"]):
        return out + [f"{len(got['models'])} models instead of {len(want['models'])}"]
    for key in ("base", "dtype"):
        if want[key] != got[key]:
            out.append(f"{key} {got[key]!r} instead of {want[key]!r}")
    for (path, weight, params), (path2, weight2, params2) in zip(want["models"], got["models"]):
        if path != path2 or weight != weight2:
            out.append(f"model {path2} weight {weight2} instead of {path} weight {weight}")
        for key in params:
            if params.get(key) != params2.get(key) and f"{key}=" not in " ".join(out):
                out.append(f"{key}={params[key]!r} (mergekit's {form.name}: {params2.get(key)!r})")
    return out


# Run in a child with the mergekit under test on its path: each method's parameters and whether
# each is required, as JSON, from mergekit's registry (0.1.5's spec objects; older releases'
# parameters() lists).
PARAMETER_NAMES_SCRIPT = """
import json
try:
    from mergekit.merge_methods.registry import registered_methods
    names = {m.spec.name: {p.name: p.required for p in m.spec.parameters} for m in registered_methods()}
except ImportError:
    from mergekit.merge_methods import REGISTERED_MERGE_METHODS
    names = {n: {p.name: bool(p.required) for p in list(m.parameters()) + list(m.tensor_parameters())}
             for n, m in REGISTERED_MERGE_METHODS.items()}
try:
    from importlib.metadata import version
    v = version('mergekit')
except Exception:
    v = None
print(json.dumps({'version': v, 'methods': names}))
"""
