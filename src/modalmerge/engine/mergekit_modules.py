"""mergekit's `modules:` recipe in the native form: each module (a VLM's text decoder, vision tower,
projector) an ordinary mergekit recipe of its own, translated as one.

mergekit 0.1.5 (config.py OutputModuleDefinition, plan.py MergePlanner) lets a module hold exactly
one of `models` and `slices`, and `parameters`; the merge method and `base_model` are the recipe's.
A parameter is looked up from the most specific scope out — a source's (or model's) own, its
slice's, the module's, the recipe's — and a filter list that matches nothing at one scope leaves the
next one to decide. Here the module's and the recipe's `parameters` are folded into one mergekit
mapping with that meaning (a filter list continued by the recipe's value), and the module is then
translated by the same code as a whole recipe (engine/recipe.py `from_mergekit`), so models, slices,
per-model values and the base model keep exactly the semantics they have at the top level.

mergekit ignores any other field of a module (its own `merge_method`, `base_model`); here such a
field is an error, as every field that would not be applied.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import MergeError, one_line

_MODULE_FIELDS = ("models", "slices", "parameters")


def modules_from_mergekit(data: dict[str, Any], where: str,
                          translate: Callable[[dict[str, Any], str], dict[str, Any]]) -> dict[str, Any]:
    """The native fields (`method`, `models: []`, `modules`) of mergekit recipe `data` with
    `modules:`; `translate`: engine/recipe.py's translation of a whole mergekit recipe."""
    if data.get("models") or data.get("slices"):
        raise MergeError(f"{where}: give exactly one of `models`, `slices` and `modules` (as mergekit requires); "
                         "move the others into the modules")
    raw = data["modules"]
    if not isinstance(raw, dict) or not raw or not all(isinstance(k, str) for k in raw):
        raise MergeError(f"{where}: `modules` must be a mapping of module names (text_decoder, vision_tower, ...) to "
                         "{models: [...]} or {slices: [...]}, with optional `parameters`; fix it")
    top = data.get("parameters") or {}
    modules: dict[str, Any] = {}
    for name, module in raw.items():
        at = f"modules.{one_line(name, 60)}"
        if not isinstance(module, dict):
            raise MergeError(f"{where}: `{at}` must be a mapping with `models` or `slices` (and optional "
                             "`parameters`); fix it")
        extra = [one_line(k, 60) for k in module if k not in _MODULE_FIELDS]
        if extra:
            why = ("mergekit 0.1.5 takes one merge_method and one base_model for the whole recipe (and ignores a "
                   "module's)" if extra[0] in ("merge_method", "base_model") else
                   f"a module has {', '.join(_MODULE_FIELDS)}")
            raise MergeError(f"{where}: `{at}` has field {extra[0]!r}, which is not applied: {why}; remove it")
        if bool(module.get("models")) == bool(module.get("slices")):
            raise MergeError(f"{where}: `{at}` must give either `models` or `slices` (one of them, not empty, as "
                             "mergekit requires); add the models to merge in this module")
        own = module.get("parameters")
        if own is not None and (not isinstance(own, dict) or not all(isinstance(k, str) for k in own)):
            raise MergeError(f"{where}: `{at}.parameters` must be a mapping of parameter names to values; fix it")
        params = dict(top)  # a mapping: engine/recipe.py checked it
        for key, value in (own or {}).items():
            params[key] = continued(value, top[key]) if key in top else value
        sub = {"merge_method": data["merge_method"], "parameters": params,
               "models" if module.get("models") else "slices": module.get("models") or module.get("slices")}
        if data.get("base_model") is not None:
            sub["base_model"] = data["base_model"]
        native = translate(sub, f"{where}: {at}")
        modules[name] = {"models": native["models"], "slices": native.get("slices", []), "base": native.get("base"),
                         "params": native["params"]}
    return {"method": native["method"], "models": [], "modules": modules, "source_format": "mergekit"}


def continued(value: Any, fallback: Any) -> Any:
    """A mergekit parameter value whose filter list, where it matches nothing, gives `fallback`'s
    value instead (mergekit's next scope): the list followed by the fallback's entries."""
    if not _is_filter_list(value):
        return value  # a scalar or gradient applies to every tensor: the fallback is never reached
    return _entries(value) + _entries(fallback)


def _is_filter_list(value: Any) -> bool:
    return isinstance(value, dict) or (isinstance(value, list) and any(isinstance(x, dict) for x in value))


def _entries(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [value]
    if _is_filter_list(value):
        return list(value)
    return [{"value": value}]
