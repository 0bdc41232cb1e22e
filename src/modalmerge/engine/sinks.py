"""Where merged tensors go: a model folder on disk (written atomically) or a state dict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Collection, Iterable

import torch
import yaml

from ..checkpoint.output import AtomicFolder, ShardedWriter, copy_aux_files, output_error, set_layer_count
from ..checkpoint.safetensors_io import TensorMeta
from .plan import Plan
from .slices import layer_sources

DECOUPLED_DIR = "decoupled"
MANIFEST = "manifest.json"


def mask_name(task: str, tensor: str) -> str:
    return f"{task}::{tensor}"


class DictSink:
    """Collects the merged model (and, for decoupled methods, shared vector and masks) in memory."""

    def __init__(self, plan: Plan):
        self.tensors: dict[str, torch.Tensor] = {}
        self.shared: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.manifest: dict[str, Any] | None = None
        self._plan = {t.name: t for t in plan.tensors}

    def _buffer(self, store: dict, name: str, meta: TensorMeta) -> torch.Tensor:
        if name not in store:
            store[name] = torch.empty(meta.shape, dtype=meta.dtype)
        return store[name]

    def write(self, name: str, tensor: torch.Tensor, start: int = 0) -> None:
        t = self._plan[name]
        buf = self._buffer(self.tensors, name, TensorMeta(t.meta.shape, t.out_dtype))
        buf.view(-1)[start:start + tensor.numel()] = tensor.reshape(-1)

    def write_shared(self, name: str, tensor: torch.Tensor, start: int = 0) -> None:
        t = self._plan[name]
        buf = self._buffer(self.shared, name, TensorMeta(t.meta.shape, t.out_dtype))
        buf.view(-1)[start:start + tensor.numel()] = tensor.reshape(-1)

    def write_mask(self, task: str, name: str, packed: torch.Tensor, byte_start: int = 0) -> None:
        t = self._plan[name]
        key = mask_name(task, name)
        buf = self._buffer(self.masks, key, TensorMeta(((t.meta.numel + 7) // 8,), torch.uint8))
        buf[byte_start:byte_start + packed.numel()] = packed

    def close(self, manifest: dict[str, Any] | None = None) -> None:
        self.manifest = manifest

    def abort(self) -> None:
        pass


def plan_inputs(plan: Plan) -> list[tuple[str, str]]:
    """Every file or folder a merge of `plan` reads, as (label, path): the output may be none of
    them, lie inside none and contain none (checkpoint/output.refuse_output_over_inputs)."""
    r = plan.recipe
    found: list[tuple[str, str]] = []

    def add(label: str, path) -> None:
        if path is not None and str(path) and not str(path).startswith("<memory:"):
            found.append((label, str(path)))

    def calibration(label: str, spec) -> None:
        if isinstance(spec, dict) and isinstance(spec.get("file"), (str, Path)):
            add(label, spec["file"])

    add("base", r.base)
    add("copy_files_from folder", r.copy_files_from)
    calibration("calibration file", r.calibration)
    for m in r.models:
        add(f"model {m.label!r}", m.path)
        add(f"optimizer_state of model {m.label!r}", m.optimizer_state)
        calibration(f"calibration file of model {m.label!r}", m.calibration)
    for i, s in enumerate(r.slices):  # a layer stack's models
        for x in [*s.sources, *([s.base] if s.base else [])]:
            add(f"model {x.path!r} of slices[{i}]", x.path)
    # what was opened besides: an adapter's base, the models under an MMER part view
    for src in [plan.base, *plan.models]:
        for _ in range(4):
            if src is None:
                break
            if isinstance(getattr(src, "path", None), (str, Path)):
                add(f"input {getattr(src, 'label', '?')!r}", src.path)
            src = getattr(src, "base", None) or getattr(src, "source", None)
    return found


def output_entries(plan: Plan) -> list[tuple[str, TensorMeta]]:
    """The output's tensors, in the order and dtypes they are laid out in shards."""
    return [(t.name, TensorMeta(t.meta.shape, t.out_dtype)) for t in plan.tensors]


class FolderSink:
    """A Hugging Face model folder: sharded safetensors, config/tokenizer files, a model card,
    and a `decoupled/` part for task-conditional methods. Nothing appears at the output path
    until close() succeeds, and the output is never one of the plan's inputs (or `inputs`),
    inside one or around one. `shard_files`: the weight shards it writes itself (default all); a
    Ray merge's workers write the others into `folder.tmp` (procedures/ray_merge.py)."""

    def __init__(self, plan: Plan, output: str | Path, overwrite: bool = False,
                 max_shard_bytes: int | None = None, tool_version: str = "?",
                 inputs: Iterable[tuple[str, str]] = (), copy_tokenizer: bool = True,
                 write_model_card: bool = True, shard_files: Collection[str] | None = None):
        self.plan = plan
        self.folder = AtomicFolder(output, overwrite, inputs=[*inputs, *plan_inputs(plan)])
        try:
            self.tool_version = tool_version
            self.copy_tokenizer = copy_tokenizer
            self.write_model_card = write_model_card
            kwargs = {"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}
            self.main = ShardedWriter(self.folder.tmp, output_entries(plan), files=shard_files, **kwargs)
            self.shared = self.masks = None
            if plan.method.decoupled:
                ddir = self.folder.tmp / DECOUPLED_DIR
                ddir.mkdir()
                merged = plan.merged
                self.shared = ShardedWriter(ddir, [(t.name, TensorMeta(t.meta.shape, t.out_dtype)) for t in merged],
                                            stem="shared", **kwargs)
                self.masks = ShardedWriter(
                    ddir, [(mask_name(task, t.name), TensorMeta(((t.meta.numel + 7) // 8,), torch.uint8))
                           for task in plan.model_names for t in merged], stem="masks", **kwargs)
        except OSError as e:
            self.folder.abort()
            raise output_error(e, self.folder.final) from None
        except BaseException:
            self.folder.abort()
            raise

    def scratch(self, prefix: str) -> Path:
        """A folder for the merge's temporary data, inside the partial output folder."""
        return self.folder.scratch(prefix)

    def write(self, name, tensor, start=0):
        with self.folder.writing():
            self.main.write(name, tensor, start)

    def write_shared(self, name, tensor, start=0):
        with self.folder.writing():
            self.shared.write(name, tensor, start)

    def write_mask(self, task, name, packed, byte_start=0):
        with self.folder.writing():
            self.masks.write(mask_name(task, name), packed, byte_start)

    def close(self, manifest: dict[str, Any] | None = None) -> Path:
        try:
            with self.folder.writing():
                return self._close(manifest)
        except BaseException:
            self.folder.abort()
            raise

    def _close(self, manifest: dict[str, Any] | None) -> Path:
        for w in (self.main, self.shared, self.masks):
            if w is not None:
                w.close()
        tmp = self.folder.tmp
        vocabulary = self.plan.vocabulary  # a built tokenizer replaces the copied one (as in mergekit)
        copy_aux_files(self.plan.aux_folder, tmp, tokenizer=self.copy_tokenizer and vocabulary is None)
        if vocabulary is not None:
            vocabulary.write(tmp)
        _fix_config_dtype(tmp / "config.json", self.plan.recipe.dtype)
        if self.plan.recipe.slices:  # a layer stack: its own block count
            set_layer_count(tmp / "config.json", layer_sources(self.plan.recipe.slices))
        for key, sources in self.plan.layer_counts.items():  # a `modules:` recipe's stacked modules
            set_layer_count(tmp / "config.json", sources, key)
        if manifest is not None:
            (tmp / DECOUPLED_DIR / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if self.write_model_card:
            (tmp / "README.md").write_text(model_card(self.plan, self.tool_version))
            if self.plan.recipe.source_format == "mergekit":
                # as mergekit-yaml writes it beside its card: the recipe as the user wrote it
                (tmp / MERGEKIT_CONFIG).write_text(recipe_text(self.plan.recipe))
        return self.folder.commit()

    def abort(self) -> None:
        self.folder.abort()


def _fix_config_dtype(config: Path, dtype: str | None) -> None:
    if dtype is None or not config.exists():
        return
    try:
        data = json.loads(config.read_text())
    except ValueError:
        return
    for key in ("torch_dtype", "dtype"):
        if key in data:
            data[key] = dtype
    config.write_text(json.dumps(data, indent=2))


MERGEKIT_CONFIG = "mergekit_config.yml"


def recipe_text(recipe) -> str:
    """The recipe as the user gave it (a file's own text, or a mapping's YAML dump: engine/recipe.py);
    a native recipe object: its own dump."""
    if recipe.source_text is not None:
        return recipe.source_text
    return yaml.safe_dump(recipe.model_dump(exclude_defaults=True, exclude={"source_format"}), sort_keys=False)


def model_card(plan: Plan, version: str) -> str:
    """README.md: the method, models and parameters, the recipe as the user wrote it (a recipe
    file's own text; a mapping's YAML dump) and, for a mergekit recipe, its native translation."""
    recipe = plan.recipe.model_dump(exclude_defaults=True, exclude={"source_format"})
    native = yaml.safe_dump(recipe, sort_keys=False).rstrip()
    own = plan.recipe.source_text
    if own is None:
        recipe_lines = ["## Recipe", "", "```yaml", native, "```", ""]
    else:
        recipe_lines = ["## Recipe", "", "As written:", "", _fenced(own, "yaml"), ""]
        if plan.recipe.source_format == "mergekit":
            recipe_lines += ["## Native translation", "", "The mergekit recipe above as modalmerge runs it:", "",
                             "```yaml", native, "```", ""]
    lines = [
        "---",
        "tags: [merge, modalmerge]",
        "---",
        f"# Merged with modalmerge {version}",
        "",
        f"Method: **{plan.method.name}** — {plan.method.summary}",
        "",
        f"Base: `{plan.recipe.base}`" if plan.recipe.base else "Base: none",
        "",
        "Models:",
        *[f"- `{m.path}`" + (f" (name {m.name})" if m.name else "") for m in plan.recipe.models],
        "",
        f"Parameters (with defaults): `{json.dumps(plan.params.model_dump(by_alias=True))}`",
        "",
        *recipe_lines,
    ]
    return "\n".join(lines)


def _fenced(text: str, language: str) -> str:
    """`text` verbatim in a Markdown code block whose fence is longer than any backtick run in it."""
    run, longest_run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest_run = max(longest_run, run)
    fence = "`" * max(3, longest_run + 1)
    return f"{fence}{language}\n{text.rstrip(chr(10))}\n{fence}"
