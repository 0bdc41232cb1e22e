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


# mergekit's methods, their defaults and the native parameters that reproduce their semantics
_MERGEKIT_DEFAULTS = {
    "linear": {"normalize": True},
    "task_arithmetic": {"normalize": False, "lambda": 1.0},
    "ties": {"normalize": True, "lambda": 1.0, "density": 1.0},
    # mergekit's `rescale: true` (its default for DARE and DELLA) matches each tensor's L1 norm
    "dare_linear": {"normalize": False, "lambda": 1.0, "density": 1.0, "rescale": True},
    "dare_ties": {"normalize": False, "lambda": 1.0, "density": 1.0, "rescale": True},
    "breadcrumbs": {"normalize": False, "lambda": 1.0, "density": 1.0, "gamma": 0.01},
    "breadcrumbs_ties": {"normalize": True, "lambda": 1.0},
    "della": {"normalize": True, "lambda": 1.0, "density": 1.0, "epsilon": 0.15, "rescale": True},
    "della_linear": {"normalize": False, "lambda": 1.0, "density": 1.0, "epsilon": 0.15, "rescale": True},
    "model_stock": {},
    "slerp": {},
}


def from_mergekit(data: dict[str, Any], where: str) -> dict[str, Any]:
    """Translate a mergekit recipe into the native form, keeping mergekit's semantics."""
    from ..methods.registry import mergekit_method

    if "slices" in data:
        raise MergeError(f"{where}: mergekit `slices` (layer stacking) is not supported; use `models`")
    unknown = set(data) - {"merge_method", "base_model", "models", "parameters", "dtype", "tokenizer_source",
                           "out_dtype", "name", "chat_template", "tokenizer"}
    if unknown:
        raise MergeError(f"{where}: unknown mergekit field(s) {', '.join(sorted(unknown))}; remove them")
    name = data["merge_method"]
    method = mergekit_method(name)
    params: dict[str, Any] = dict(_MERGEKIT_DEFAULTS.get(name, {}))
    params.update(data.get("parameters") or {})
    base = data.get("base_model")
    models = []
    for i, entry in enumerate(data.get("models") or []):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise MergeError(f"{where}: models[{i}] has no `model`; add `model: path/to/model` to it")
        if base is not None and entry["model"] == base and method.base != "forbidden":
            continue  # mergekit treats the base listed among the models as no task vector
        mp = dict(entry.get("parameters") or {})
        weight = mp.pop("weight", 1.0)
        models.append({"path": entry["model"], "weight": weight, "params": _model_params_from_mergekit(name, mp)})
    if base is not None and method.base == "forbidden":
        # a method without a base (slerp): mergekit's base_model is its first input
        rest = [m for m in models if m["path"] != base]
        first = next((m for m in models if m["path"] == base), {"path": base, "weight": 1.0, "params": {}})
        models, base = [first] + rest, None
    native = {"method": method.name, "base": base, "models": models, "source_format": "mergekit",
              "params": method_params_from_mergekit(name, params)}
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype:
        native["dtype"] = dtype
    return native


def method_params_from_mergekit(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """mergekit parameter names and flags → native ones (per-tensor scope, weighted normalisation)."""
    params = dict(params)
    params.pop("int8_mask", None)
    out: dict[str, Any] = {}
    normalize = params.pop("normalize", None)
    if name in ("ties", "dare_ties", "della", "breadcrumbs_ties"):
        out["aggregate"] = "mean" if normalize in (None, True) else "sum"
        if name == "ties":
            out["scope"] = "tensor"
    elif normalize is not None:
        out["normalize"] = normalize
    if name in ("dare_linear", "dare_ties", "della", "della_linear") and isinstance(params.get("rescale"), bool):
        params["rescale"] = "l1" if params["rescale"] else "none"
    if name == "breadcrumbs":
        out["scope"] = "tensor"
        if params.get("rescale") is False:
            params.pop("rescale")  # mergekit's default: nothing to do
    if name == "slerp" and not isinstance(params.get("t", 0.5), (int, float)):
        raise MergeError("mergekit slerp: a layer-dependent `t` (a list or filters) is not supported; "
                         "give `t` as one number")
    out.update(_model_params_from_mergekit(name, params))
    # a mergekit gradient (a list of numbers) is a per-layer schedule here
    return {k: {"layers": v} if isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v) else v
            for k, v in out.items()}


def _model_params_from_mergekit(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Renames of mergekit's per-model (tensor) parameters; also applied to the global ones."""
    if name == "breadcrumbs":
        renames = {"density": "keep_fraction", "gamma": "top_remove_fraction"}
        return {renames.get(k, k): v for k, v in params.items()}
    return dict(params)
