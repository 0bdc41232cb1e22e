"""Recipes: the native YAML format and mergekit's, validated into one `Recipe`."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..checkpoint.hub import is_hub_reference
from ..checkpoint.safetensors_io import read_regular
from ..checkpoint.vocabulary import TokenizerSettings, settings_from_mergekit
from ..errors import MergeError, Note, one_line
from ..methods.base import MergekitForm, Method
from ..methods import schedules
from ..methods.registry import mergekit_method
from .mergekit_modules import modules_from_mergekit
from .mergekit_output import output_fields
from .slices import SliceEntry, slices_from_mergekit

DTYPES = ("float32", "float16", "bfloat16", "float64")

# Bounds on a recipe file: recipes are small, and one written by someone else must not be able
# to exhaust memory or time (an alias bomb, a device file, nesting past the recursion limit).
MAX_RECIPE_BYTES = 1 << 20          # the file
MAX_DEPTH = 64                      # nested mappings/sequences
MAX_ALIAS_NODES = 10_000            # nodes that aliases add beyond the file's own
MAX_EXPANDED_CHARS = 4 << 20        # characters of all scalars once aliases are expanded


class ModelEntry(BaseModel):
    # strict: `weight: true` or `weight: "2"` is an error, not 1.0 or 2.0
    model_config = ConfigDict(extra="forbid", strict=True)

    path: str
    name: str | None = None
    weight: float | dict[str, Any] = 1.0  # or per tensor, {layers: ...} / {filters: ...} (methods/schedules.py)
    params: dict[str, Any] = Field(default_factory=dict)
    # data-aware methods: this model's calibration data (overrides the recipe's) and the
    # optimiser second moments it was trained with (OTA); see procedures/calibration.py
    calibration: dict[str, Any] | None = None
    optimizer_state: str | None = None

    @property
    def label(self) -> str:
        return self.name or Path(self.path).name or self.path


class ModuleEntry(BaseModel):
    """One module of a multi-module model (mergekit's `modules:`; engine/modules.py): its own models
    or slices, base (else the recipe's) and parameters (over the recipe's)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    models: list[ModelEntry] = Field(default_factory=list)
    slices: list[SliceEntry] = Field(default_factory=list)
    base: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("models", mode="before")
    @classmethod
    def _plain_paths(cls, v):
        return [{"path": m} if isinstance(m, str) else m for m in v] if isinstance(v, list) else v


class Recipe(BaseModel):
    """A merge: which method, which models, what parameters, what to merge."""

    model_config = ConfigDict(extra="forbid", strict=True)

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
    slices: list[SliceEntry] = Field(default_factory=list)  # layer stacking: engine/slices.py
    modules: dict[str, ModuleEntry] = Field(default_factory=dict)  # per-module merges: engine/modules.py
    calibration: dict[str, Any] | None = None  # data-aware methods: see procedures/calibration.py
    # the output vocabulary and chat template, as mergekit's (checkpoint/vocabulary.py)
    tokenizer_source: str | None = None       # union | base | a model
    tokenizer: TokenizerSettings | None = None
    chat_template: str | None = None          # auto | Jinja text
    source_format: str = "native"
    # the recipe file's own text, for the model card (load_recipe): not a field a recipe sets, left
    # out of dumps and of comparisons (a file and the mapping it holds are the same recipe)
    source_text: str | None = Field(default=None, exclude=True, repr=False)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Recipe):
            return NotImplemented
        return BaseModel.__eq__(self.model_copy(update={"source_text": None}),
                                other.model_copy(update={"source_text": None}))

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
        def fix_model(p: str | None) -> str | None:
            # a model reference that is no path here: `model+lora` (each part fixed) or a hub id (kept)
            if p is None or os.path.isabs(p) or (root / p).exists() or Path(p).exists():
                return fix(p)
            parts = p.split("+")
            if len(parts) == 2 and all(parts):
                return "+".join(fix_model(x) for x in parts)
            return p if is_hub_reference(p) else fix(p)
        def fix_calibration(c: dict[str, Any] | None) -> dict[str, Any] | None:
            return c if not c or "file" not in c else {**c, "file": fix(str(c["file"]))}
        return self.model_copy(update={
            "base": fix_model(self.base),
            "models": [m.model_copy(update={"path": fix_model(m.path), "optimizer_state": fix(m.optimizer_state),
                                            "calibration": fix_calibration(m.calibration)})
                       for m in self.models],
            "copy_files_from": fix_model(self.copy_files_from),
            "slices": [s.with_paths(fix_model) for s in self.slices],
            "modules": {k: m.model_copy(update={
                "base": fix_model(m.base), "slices": [s.with_paths(fix_model) for s in m.slices],
                "models": [e.model_copy(update={"path": fix_model(e.path)}) for e in m.models]})
                for k, m in self.modules.items()},
            "calibration": fix_calibration(self.calibration),
            "tokenizer_source": self.tokenizer_source if self.tokenizer_source in (None, "union", "base")
            else fix_model(self.tokenizer_source),
            "tokenizer": self.tokenizer.with_models(fix_model) if self.tokenizer else None,
        })


def _validation_message(e: ValidationError, where: str) -> str:
    err = e.errors()[0]
    loc = err["loc"]
    field_name = one_line(".".join(str(x) for x in loc), 80)  # a key of the recipe's own: kept short
    if err["type"] == "missing":
        hint = " (a list of model folders, or of {path, name, weight, params})" if loc == ("models",) else ""
        return f"{where}: required field {field_name!r} is missing; add it{hint}"
    if err["type"] == "extra_forbidden":
        owner = ModelEntry if loc[0] == "models" and len(loc) == 3 else \
            ModuleEntry if loc[0] == "modules" and len(loc) == 3 else Recipe
        fields = ", ".join(n for n in owner.model_fields if n not in ("source_format", "source_text"))
        return f"{where}: unknown field {field_name!r}; remove or rename it (fields: {fields})"
    return f"{where}: field {field_name!r}: {one_line(err['msg'])}; fix its value"


def parse_recipe(data: dict[str, Any] | Recipe, where: str = "recipe") -> Recipe:
    """A Recipe from a dict in either format."""
    if isinstance(data, Recipe):
        return data
    if not isinstance(data, dict):
        raise MergeError(f"{where}: not a recipe; write it as a YAML mapping with `method` and `models` keys")
    source_text = None
    if "merge_method" in data or ("slices" in data and "method" not in data):
        source_text = _dump_mapping(data)  # the user's own recipe, for the model card and mergekit_config.yml
        data = from_mergekit(data, where)
    elif "source_format" in data or "source_text" in data:  # set by the tool, not by a recipe
        field_name = "source_format" if "source_format" in data else "source_text"
        raise MergeError(f"{where}: unknown field {field_name!r}; remove it")
    elif (data.get("slices") or data.get("modules")) and "models" not in data:  # models: the slices' or modules'
        data = {**data, "models": []}
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise MergeError(_validation_message(e, where)) from None
    except RecursionError:
        raise MergeError(f"{where}: the recipe is nested too deeply; write it flat") from None
    return recipe if source_text is None else recipe.model_copy(update={"source_text": source_text})


def _dump_mapping(data: dict[str, Any]) -> str | None:
    try:
        return yaml.safe_dump(data, sort_keys=False)
    except (yaml.YAMLError, RecursionError):  # a value YAML cannot write (an object given through the API)
        return None


def read_recipe_text(p: Path) -> str:
    """A recipe file's text: a regular file (reading /dev/zero or a FIFO never ends) of at most
    MAX_RECIPE_BYTES, UTF-8."""
    raw = read_regular(p, MAX_RECIPE_BYTES, "recipe (a YAML file)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MergeError(f"recipe {p}: byte {e.start} is not UTF-8 text; a recipe is a YAML text file") from None


class _Bound(Exception):
    """A recipe past one of the parsing bounds."""


class _BoundedLoader(yaml.SafeLoader):
    """yaml's SafeLoader with nesting bounded while composing (the composer recurses)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _Bound(f"nested more than {MAX_DEPTH} levels deep at line {mark.line + 1}; write it flatter")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a node graph whose aliases expand it past the bounds, or refer to themselves.

    Aliases share nodes, so composing is cheap whatever they expand to; the expanded size is
    counted here once per distinct node (depth-first, iteratively) before anything is built."""
    nodes: dict[int, int] = {}     # id -> expanded node count
    chars: dict[int, int] = {}     # id -> expanded scalar characters
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]

    def children(node):
        if isinstance(node, yaml.SequenceNode):
            return node.value
        if isinstance(node, yaml.MappingNode):
            return [x for pair in node.value for x in pair]
        return []

    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            kids = children(node)
            nodes[key] = 1 + sum(nodes[id(c)] for c in kids)
            chars[key] = (len(node.value) if isinstance(node, yaml.ScalarNode) else 0) + sum(chars[id(c)] for c in kids)
            on_path.discard(key)
            if nodes[key] - len(nodes) > MAX_ALIAS_NODES or chars[key] > MAX_EXPANDED_CHARS:
                raise _Bound(f"its aliases (*name) expand it to more than {MAX_ALIAS_NODES:,} extra values or "
                             f"{MAX_EXPANDED_CHARS:,} characters; write the values out")
            continue
        if key in nodes:
            continue
        if key in on_path:
            raise _Bound(f"an alias at line {node.start_mark.line + 1} refers to a value that contains it; "
                         "remove the recursive alias")
        if isinstance(node, yaml.MappingNode):
            _no_duplicate_keys(node)
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children(node) if id(c) not in nodes)


def _no_duplicate_keys(node: yaml.MappingNode) -> None:
    """yaml keeps the last of two equal keys; a recipe field given twice is an error instead."""
    seen = set()
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            k = (key_node.tag, key_node.value)
            if k in seen:
                raise _Bound(f"key {one_line(key_node.value, 60)!r} appears twice in one mapping (line "
                             f"{key_node.start_mark.line + 1}); keep one")
            seen.add(k)


def parse_yaml(text: str, where: str) -> Any:
    """YAML text -> Python data, with the bounds above; every failure is a MergeError."""
    loader = None
    try:
        loader = _BoundedLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    except _Bound as e:
        raise MergeError(f"{where}: {e}") from None
    except yaml.reader.ReaderError as e:
        raise MergeError(f"{where}: character #x{e.character:04x} at position {e.position} is not allowed in YAML; "
                         "a recipe is a YAML text file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None)
        raise MergeError(f"{where}: invalid YAML{at}" + (f" ({one_line(problem)})" if problem else "") +
                         "; fix the syntax there") from None
    except Exception as e:  # noqa: BLE001 - SafeLoader runs no user code: any other failure is a bad value
        # a value yaml recognises but cannot build: a date like 2024-13-45, an int of too many digits, `!!int ''`
        raise MergeError(f"{where}: invalid YAML value ({type(e).__name__}: {one_line(e)}); quote it or fix it") \
            from None
    finally:
        if loader is not None:
            loader.dispose()


def load_recipe(path: str | os.PathLike) -> Recipe:
    p = Path(path)
    text = read_recipe_text(p)
    data = parse_yaml(text, f"recipe {p}")
    recipe = parse_recipe(data, f"recipe {p}").resolve_paths(p.parent)
    return recipe.model_copy(update={"source_text": text})  # the model card keeps the user's own text


# mergekit 0.1.5's recipes; what each method means in native parameters is its Method.mergekit
# (methods/base.py MergekitForm)
# mergekit parameters that are set per input model (ParameterScope.INPUT / NON_BASE)
_MERGEKIT_PER_MODEL = ("weight", "density", "gamma", "epsilon")
_MERGEKIT_FIELDS = {"merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype",
                    "tokenizer_source", "tokenizer", "chat_template"}
# mergekit fields this tool does not apply (yet): refused, never ignored
_MERGEKIT_NOT_IMPLEMENTED = {
    "name": "(a stage name of mergekit-multi) is not supported; remove it and merge one recipe at a time",
}
_MERGEKIT_ENTRY_FIELDS = ("model", "parameters")


def _mergekit_value(value: Any, where: str, key: str) -> Any:
    """A mergekit parameter value in the native form (methods/schedules.py): a scalar is kept; a
    gradient (a list of scalars, over the layers) becomes `{layers: [...]}`; a filter list
    `[{filter, value}, ...]` (or one such mapping) becomes `{filters: [...]}`, each value a
    scalar or a gradient."""
    def scalar_or_gradient(v: Any, at: str) -> Any:
        if isinstance(v, list) and v and all(isinstance(x, (bool, int, float, str)) for x in v):
            return {"layers": v}
        if isinstance(v, (list, dict)) or v is None:
            raise MergeError(f"{where}: parameter {at!r}: a value must be a scalar or a non-empty list of scalars "
                             "(a gradient over the layers); fix it")
        return v

    if isinstance(value, dict) or (isinstance(value, list) and value and any(isinstance(x, dict) for x in value)):
        entries = value if isinstance(value, list) else [value]
        out = []
        for i, entry in enumerate(entries):
            at = f"{key}[{i}]"
            if not isinstance(entry, dict) or "value" not in entry or set(entry) - {"filter", "value"} \
                    or not isinstance(entry.get("filter"), (str, type(None))):
                raise MergeError(f"{where}: parameter {at!r}: a filter list holds mappings {{filter: <substring of "
                                 "the tensor name>, value: <scalar or gradient>}} (`filter` may be left out); fix it")
            native = {"value": scalar_or_gradient(entry["value"], at)}
            if entry.get("filter") is not None:
                native = {"filter": entry["filter"], **native}
            out.append(native)
        return {"filters": out}
    return scalar_or_gradient(value, key)


def from_mergekit(data: dict[str, Any], where: str) -> dict[str, Any]:
    """Translate a mergekit recipe into the native form, keeping mergekit's semantics.

    As mergekit does, top-level `parameters` are the defaults of every model's own `parameters`;
    a base model is no task vector for the task-vector methods, but linear averages it with the
    others (mergekit always adds the base to the inputs), and SLERP interpolates from it.
    """
    for key in _MERGEKIT_NOT_IMPLEMENTED:
        if key in data:
            raise MergeError(f"{where}: mergekit field {key!r} is {_MERGEKIT_NOT_IMPLEMENTED[key]}")
    unknown = sorted(one_line(k, 60) for k in set(data) - _MERGEKIT_FIELDS)
    if unknown:
        raise MergeError(f"{where}: unknown mergekit field(s) {', '.join(unknown)}; remove them")
    if "merge_method" not in data:  # a mergekit `slices:` recipe without it
        raise MergeError(f"{where}: required field 'merge_method' is missing; add it (e.g. `merge_method: passthrough`)")
    name = data["merge_method"]
    if not isinstance(name, str):
        raise MergeError(f"{where}: `merge_method` must be a method name such as ties; fix its value")
    method, form = mergekit_form(name)
    vocabulary = _mergekit_vocabulary(data, where)
    top = {k: _mergekit_value(v, where, k) for k, v in _mergekit_params(data.get("parameters"), where,
                                                                        "parameters").items()}
    # a name mergekit scopes per model in some methods and shared in others (`epsilon`: della's
    # per model, ram's shared) follows the native method: shared where it takes it only once
    shared_names = {f.alias or k for k, f in method.params.model_fields.items()} - method.params.per_model
    per_model_keys = {k for k in _MERGEKIT_PER_MODEL if form.per_model_renames.get(k, k) not in shared_names}
    model_defaults = {k: v for k, v in top.items() if k in per_model_keys}
    params: dict[str, Any] = dict(form.defaults)
    # a filter list that matches nothing leaves mergekit's default, as in mergekit
    params.update({k: schedules.with_fallback(v, params[k]) if k in params else v
                   for k, v in top.items() if k not in per_model_keys})
    base = data.get("base_model")
    if base is not None:
        base = mergekit_reference(base, where, "base_model")
    if "modules" in data:  # per-module merges of a multi-module model: engine/mergekit_modules.py
        return vocabulary | modules_from_mergekit(data, where, from_mergekit) | output_fields(data, base, where)
    if "slices" in data:  # layer stacking: engine/slices.py
        return vocabulary | slices_from_mergekit(data, where, method, form, base, top, reference=mergekit_reference,
                                    value=_mergekit_value, shared=method_params_from_mergekit)
    if not isinstance(data.get("models") or [], list):
        raise MergeError(f"{where}: `models` must be a list of `- model: path` entries; fix it")
    base_is_input = base is not None and (form.base_is_input or method.base == "forbidden")
    entries = []
    for i, entry in enumerate(data.get("models") or []):
        entry = {"model": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "model" not in entry:
            raise MergeError(f"{where}: models[{i}] has no `model`; add `model: path/to/model` to it")
        entry = {**entry, "model": mergekit_reference(entry["model"], where, f"models[{i}].model")}
        extra = [one_line(k, 60) for k in entry if k not in _MERGEKIT_ENTRY_FIELDS]
        if extra:
            raise MergeError(f"{where}: models[{i}] has unknown field {extra[0]!r}; a mergekit model entry has "
                             "`model` and `parameters` only")
        entry = {**entry, "parameters": _mergekit_params(entry.get("parameters"), where, f"models[{i}].parameters")}
        entries.append(entry)
    if base_is_input and base not in [e["model"] for e in entries]:
        entries.append({"model": base})  # linear averages the base too
    if base_is_input and method.base == "forbidden" and not form.base_is_input:
        # SLERP interpolates from mergekit's base_model: it is the first endpoint (a method whose
        # form says base_is_input, e.g. karcher, keeps mergekit's order: the base appended last)
        entries.sort(key=lambda e: e["model"] != base)
    models, unweighted = [], []
    for entry in entries:
        if base is not None and entry["model"] == base and not base_is_input:
            continue  # the base listed among the models is no task vector
        mp = dict(model_defaults)
        for k, v in (entry.get("parameters") or {}).items():
            v = _mergekit_value(v, where, f"{entry['model']}.{k}")
            # mergekit: a model's filter list that matches nothing falls back to the global value
            mp[k] = schedules.with_fallback(v, mp[k]) if k in mp else v
        if form.weight_required and "weight" not in mp:
            unweighted.append(one_line(entry["model"], 60))
        weight = mp.pop("weight", 1.0)
        models.append({"path": entry["model"], "weight": weight, "params": per_model_params_from_mergekit(form, mp)})
    if unweighted:  # mergekit would stop here; a weight of 1 is what a user almost always means
        warnings.warn(Note(f"{where}: mergekit's {form.name} requires a `weight` for every input and stops without "
                           f"one; using weight 1.0 for {', '.join(map(repr, unweighted))}"), stacklevel=2)
    native = {"method": method.name, "base": None if base_is_input else base, "models": models,
              "source_format": "mergekit", "params": method_params_from_mergekit(form, params, where)}
    return native | output_fields(data, base, where) | vocabulary


def _mergekit_vocabulary(data: dict[str, Any], where: str) -> dict[str, Any]:
    """mergekit's `tokenizer_source`, `tokenizer` and `chat_template`, model references translated."""
    out = {k: data[k] for k in ("tokenizer_source", "chat_template") if data.get(k) is not None}
    if out.get("tokenizer_source") not in (None, "union", "base"):
        out["tokenizer_source"] = mergekit_reference(out["tokenizer_source"], where, "tokenizer_source")
    if data.get("tokenizer") is not None:
        out["tokenizer"] = settings_from_mergekit(data["tokenizer"], where, mergekit_reference)
    return out


_REFERENCE_FORMS = ("a model path or hub id, `model+lora_path`, or a mapping {model: {path: ...}, "
                    "lora: {path: ...}}")


def mergekit_reference(value: Any, where: str, key: str) -> str:
    """mergekit's ModelReference as the native reference string (checkpoint/hub.py): a string
    `path[@revision][+lora[@revision]]` is kept; a mapping {model, lora} (each a string or
    {path, revision}) is written in that form."""
    if isinstance(value, str) and value:
        return value
    if not isinstance(value, dict):
        raise MergeError(f"{where}: `{key}` must be {_REFERENCE_FORMS}; fix its value")
    unknown = [one_line(k, 60) for k in value if k not in ("model", "lora", "override_architecture")]
    if unknown:
        # mergekit too refuses `model: {path: X}`: its mapping form is {model: {path: X}, lora: ...}
        raise MergeError(f"{where}: `{key}` must be {_REFERENCE_FORMS}; it has unknown field {unknown[0]!r}")
    if value.get("override_architecture") is not None:
        raise MergeError(f"{where}: `{key}.override_architecture` is not supported (the architecture is read from "
                         "the model's config.json); remove it")
    if "model" not in value:
        raise MergeError(f"{where}: `{key}` has no `model`; add `model: {{path: path/to/model}}`")
    text = _mergekit_model_path(value["model"], where, f"{key}.model")
    if value.get("lora") is not None:
        text += "+" + _mergekit_model_path(value["lora"], where, f"{key}.lora")
    return text


def _mergekit_model_path(value: Any, where: str, key: str) -> str:
    """mergekit's ModelPath: `path[@revision]`, or {path, revision}."""
    if isinstance(value, str) and value:
        return value
    if (isinstance(value, dict) and set(value) <= {"path", "revision"} and isinstance(value.get("path"), str)
            and value["path"] and (value.get("revision") is None or isinstance(value["revision"], str))):
        return value["path"] + (f"@{value['revision']}" if value.get("revision") else "")
    raise MergeError(f"{where}: `{key}` must be a path or hub id, or a mapping {{path: ..., revision: ...}}; fix it")


def _mergekit_params(value: Any, where: str, key: str) -> dict[str, Any]:
    """A mergekit `parameters` mapping: {name: value}, names being strings."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise MergeError(f"{where}: `{key}` must be a mapping of parameter names to values; fix it")
    return value


def mergekit_form(name: str) -> tuple[Method, MergekitForm]:
    """The method a mergekit `merge_method` stands for, and its mergekit form."""
    method = mergekit_method(name)
    return method, next(f for f in method.mergekit if f.name == name)


def method_params_from_mergekit(form: MergekitForm | str, params: dict[str, Any], where: str = "recipe"
                                ) -> dict[str, Any]:
    """mergekit's shared parameters → native ones with the same semantics (`form`: the method's
    MergekitForm, or mergekit's name of the method).

    TIES: mergekit trims per tensor keeping at least one entry (`k = max(1, int(density·n))`);
    its elections send exact zero sums to +1; `normalize` divides by the weights of the agreeing
    models (native `aggregate: mean` with weights) or not at all (`sum`).
    """
    if isinstance(form, str):
        form = mergekit_form(form)[1]
    params = dict(params)
    for flag in ("int8_mask", "normalize", "rescale"):
        if flag in params and not isinstance(params[flag], bool):
            raise MergeError(f"{where}: parameter {flag!r} must be true or false; fix its value")
    params.pop("int8_mask", None)  # a memory option of mergekit's, no effect on the result
    out: dict[str, Any] = {}
    normalize = params.pop("normalize", None)
    if form.electing:
        out["aggregate"] = "mean" if normalize in (None, True) else "sum"
        out["tie"] = "positive"
    elif normalize is not None:
        out["normalize"] = normalize
    if "rescale" in params:
        rescale = params.pop("rescale")
        if form.rescale:
            out["rescale"] = "l1" if rescale else "none"  # mergekit rescales to the L1 norm, not 1/p
        elif rescale:
            raise MergeError(f"{where}: `rescale: true` is not supported for mergekit method {form.name!r}")
    out.update(form.native)
    out.update(per_model_params_from_mergekit(form, params))
    return out


def per_model_params_from_mergekit(form: MergekitForm, params: dict[str, Any]) -> dict[str, Any]:
    """Renames of mergekit's per-model (tensor) parameters; also applied to the global ones."""
    return {form.per_model_renames.get(k, k): v for k, v in params.items()}
