"""Recipes: the native YAML format and mergekit's, validated into one `Recipe`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import MergeError

DTYPES = ("float32", "float16", "bfloat16", "float64")


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    name: str | None = None
    weight: float = 1.0
    params: dict[str, Any] = Field(default_factory=dict)
    # data-aware methods: this model's calibration data (overrides the recipe's) and the
    # optimiser second moments it was trained with (OTA); see engine/calibration.py
    calibration: dict[str, Any] | None = None
    optimizer_state: str | None = None

    @property
    def label(self) -> str:
        return self.name or Path(self.path).name or self.path


class Recipe(BaseModel):
    """A merge: which method, which models, what parameters, what to merge."""

    model_config = ConfigDict(extra="forbid")

    method: str
    base: str | None = None
    models: list[ModelEntry]
    params: dict[str, Any] = Field(default_factory=dict)
    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    dtype: str | None = None
    seed: int = 0
    copy_files_from: str | None = None        # model whose config/tokenizer files are copied
    parts: dict[str, str] = Field(default_factory=dict)  # multimodal parts by name pattern
    calibration: dict[str, Any] | None = None  # data-aware methods: see engine/calibration.py
    source_format: str = "native"

    @field_validator("models", mode="before")
    @classmethod
    def _plain_paths(cls, v):
        if isinstance(v, list):
            return [{"path": m} if isinstance(m, str) else m for m in v]
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v):
        if v is not None and v not in DTYPES:
            raise ValueError(f"must be one of {', '.join(DTYPES)}")
        return v

    def resolve_paths(self, root: Path) -> "Recipe":
        """Relative paths in a recipe file are relative to the file's folder."""
        def fix(p: str | None) -> str | None:
            if p is None or os.path.isabs(p):
                return p
            candidate = root / p
            return str(candidate) if candidate.exists() or not Path(p).exists() else p
        def fix_calibration(c: dict[str, Any] | None) -> dict[str, Any] | None:
            return c if not c or "file" not in c else {**c, "file": fix(str(c["file"]))}
        return self.model_copy(update={
            "base": fix(self.base),
            "models": [m.model_copy(update={"path": fix(m.path), "optimizer_state": fix(m.optimizer_state),
                                            "calibration": fix_calibration(m.calibration)})
                       for m in self.models],
            "copy_files_from": fix(self.copy_files_from),
            "calibration": fix_calibration(self.calibration),
        })


def _validation_message(e: ValidationError, where: str) -> str:
    err = e.errors()[0]
    loc = err["loc"]
    field_name = ".".join(str(x) for x in loc)
    if err["type"] == "missing":
        hint = " (a list of model folders, or of {path, name, weight, params})" if loc == ("models",) else ""
        return f"{where}: required field {field_name!r} is missing; add it{hint}"
    if err["type"] == "extra_forbidden":
        owner = ModelEntry if loc[0] == "models" and len(loc) == 3 else Recipe
        fields = ", ".join(n for n in owner.model_fields if n != "source_format")
        return f"{where}: unknown field {field_name!r}; remove or rename it (fields: {fields})"
    return f"{where}: field {field_name!r}: {err['msg']}; fix its value"


def parse_recipe(data: dict[str, Any] | Recipe, where: str = "recipe") -> Recipe:
    """A Recipe from a dict in either format."""
    if isinstance(data, Recipe):
        return data
    if not isinstance(data, dict):
        raise MergeError(f"{where}: not a recipe; write it as a YAML mapping with `method` and `models` keys")
    if "merge_method" in data or "slices" in data:
        data = from_mergekit(data, where)
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise MergeError(_validation_message(e, where)) from None


def load_recipe(path: str | os.PathLike) -> Recipe:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise MergeError(f"recipe {p}: cannot read it ({e.strerror}); check the path") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None)
        raise MergeError(f"recipe {p}: invalid YAML{at}" + (f" ({problem})" if problem else "") +
                         "; fix the syntax there") from None
    return parse_recipe(data, f"recipe {p}").resolve_paths(p.parent)


# mergekit 0.1.5's methods and their defaults (merge_methods/registry.py, generalized_task_arithmetic.py)
# mergekit's methods, their defaults and the native parameters that reproduce their semantics
_MERGEKIT_DEFAULTS = {
    "linear": {"normalize": True},
    "task_arithmetic": {"normalize": False, "lambda": 1.0},
    "ties": {"normalize": True, "lambda": 1.0, "density": 1.0},
    # mergekit's `rescale: true` (its default for DARE and DELLA) matches each tensor's L1 norm
    "dare_linear": {"normalize": False, "lambda": 1.0, "density": 1.0, "rescale": True},
    "dare_ties": {"normalize": False, "lambda": 1.0, "density": 1.0, "rescale": True},
    "breadcrumbs": {"normalize": False, "lambda": 1.0, "density": 1.0, "gamma": 0.01},
    "della": {"normalize": True, "lambda": 1.0, "density": 1.0, "epsilon": 0.15, "rescale": True},
    "della_linear": {"normalize": False, "lambda": 1.0, "density": 1.0, "epsilon": 0.15, "rescale": True},
    "model_stock": {"filter_wise": False},
    "slerp": {},
}
# mergekit parameters that are set per input model (ParameterScope.INPUT / NON_BASE)
_MERGEKIT_PER_MODEL = ("weight", "density", "gamma", "epsilon")
_MERGEKIT_FIELDS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
                    "tokenizer", "chat_template", "name"}
# methods whose sign election mergekit breaks towards + (native: the tensor total's sign)
_MERGEKIT_ELECTING = ("ties", "dare_ties", "della")


def _mergekit_value(value: Any, where: str, key: str) -> Any:
    """A mergekit parameter value: a number, or a gradient (a list of numbers, interpolated over
    the layers: a native per-layer schedule). Name filters are not supported."""
    if isinstance(value, list) and value and all(isinstance(x, (int, float)) for x in value):
        return {"layers": value}
    if isinstance(value, (list, dict)):
        raise MergeError(f"{where}: parameter {key!r}: mergekit filters (`filter:` lists) are not supported; "
                         "give one value or a list of numbers (a gradient over the layers)")
    return value


def from_mergekit(data: dict[str, Any], where: str) -> dict[str, Any]:
    """Translate a mergekit recipe into the native form, keeping mergekit's semantics.

    As mergekit does, top-level `parameters` are the defaults of every model's own `parameters`;
    a base model is no task vector for the task-vector methods, but linear averages it with the
    others (mergekit always adds the base to the inputs), and SLERP interpolates from it.
    """
    from ..methods.registry import mergekit_method

    if "slices" in data or "modules" in data:
        raise MergeError(f"{where}: mergekit `slices`/`modules` (layer stacking) are not supported; use `models`")
    unknown = set(data) - _MERGEKIT_FIELDS
    if unknown:
        raise MergeError(f"{where}: unknown mergekit field(s) {', '.join(sorted(unknown))}; remove them")
    name = data["merge_method"]
    method = mergekit_method(name)
    top = {k: _mergekit_value(v, where, k) for k, v in (data.get("parameters") or {}).items()}
    model_defaults = {k: v for k, v in top.items() if k in _MERGEKIT_PER_MODEL}
    params: dict[str, Any] = dict(_MERGEKIT_DEFAULTS.get(name, {}))
    params.update({k: v for k, v in top.items() if k not in _MERGEKIT_PER_MODEL})
    base = data.get("base_model")
    base_is_input = base is not None and (name == "linear" or method.base == "forbidden")
    entries = []
    for i, entry in enumerate(data.get("models") or []):
        entry = {"model": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "model" not in entry:
            raise MergeError(f"{where}: models[{i}] has no `model`; add `model: path/to/model` to it")
        entries.append(entry)
    if base_is_input and base not in [e["model"] for e in entries]:
        entries.append({"model": base})  # linear averages the base too
    if base_is_input and method.base == "forbidden":
        # SLERP interpolates from mergekit's base_model: it is the first endpoint
        entries.sort(key=lambda e: e["model"] != base)
    models = []
    for entry in entries:
        if base is not None and entry["model"] == base and not base_is_input:
            continue  # the base listed among the models is no task vector
        mp = dict(model_defaults)
        mp.update({k: _mergekit_value(v, where, f"{entry['model']}.{k}")
                   for k, v in (entry.get("parameters") or {}).items()})
        weight = mp.pop("weight", 1.0)
        models.append({"path": entry["model"], "weight": weight, "params": _model_params_from_mergekit(name, mp)})
    native = {"method": method.name, "base": None if base_is_input else base, "models": models,
              "source_format": "mergekit", "params": method_params_from_mergekit(name, params, where)}
    if base is not None:
        native["copy_files_from"] = base  # mergekit takes config files from the base model
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype:
        native["dtype"] = dtype
    return native


def method_params_from_mergekit(name: str, params: dict[str, Any], where: str = "recipe") -> dict[str, Any]:
    """mergekit's shared parameters → native ones with the same semantics.

    TIES: mergekit trims per tensor keeping at least one entry (`k = max(1, int(density·n))`);
    its elections send exact zero sums to +1; `normalize` divides by the weights of the agreeing
    models (native `aggregate: mean` with weights) or not at all (`sum`).
    """
    params = dict(params)
    params.pop("int8_mask", None)  # a memory option of mergekit's, no effect on the result
    out: dict[str, Any] = {}
    normalize = params.pop("normalize", None)
    if name in _MERGEKIT_ELECTING:
        out["aggregate"] = "mean" if normalize in (None, True) else "sum"
        out["tie"] = "positive"
        if name == "ties":
            out["scope"] = "tensor"
            out["keep_min"] = 1
    elif normalize is not None:
        out["normalize"] = normalize
    if "rescale" in params:
        rescale = params.pop("rescale")
        if name in ("dare_linear", "dare_ties", "della", "della_linear"):
            out["rescale"] = "l1" if rescale else "none"  # mergekit rescales to the L1 norm, not 1/p
        elif rescale:
            raise MergeError(f"{where}: `rescale: true` is not supported for mergekit method {name!r}")
    if name == "breadcrumbs":
        out["scope"] = "tensor"
    out.update(_model_params_from_mergekit(name, params))
    return out


def _model_params_from_mergekit(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Renames of mergekit's per-model (tensor) parameters; also applied to the global ones."""
    if name == "breadcrumbs":
        renames = {"density": "keep_fraction", "gamma": "top_remove_fraction"}
        return {renames.get(k, k): v for k, v in params.items()}
    return dict(params)
