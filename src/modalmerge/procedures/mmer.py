"""MMER composition: N multimodal models on one base LLM → one composed model folder.

Each model is split into its LLM, encoder and projector tensors by the recipe's `parts`, else by
the parts found from its config (engine/family_parts.py), else by its architecture spec. The
LLMs, seen under the base LLM's names (checkpoint/parts.PartView), go through an ordinary
decoupled merge with methods/mmer.py; every model's other tensors are copied unchanged into
`modalities/<task>/` with its config files. A model without encoder (an LLM fine-tuned on a new
task) is just one more task with its own mask.

Composed folder (extends the decoupled layout of checkpoint/decoupled.py):

    model*.safetensors, config.json…   W_text = θ_0 + m̄ ⊙ τ*, under the base LLM's names, with the
                                       base's config: loads as the base LLM
    decoupled/manifest.json            + per task: "modality" {dir, encoder, projector, other} (the
                                       tensor names kept there) and "llm_names" {base name: the
                                       model's own name} where they differ; + "storage"
    decoupled/shared*.safetensors      τ* (dense), or decoupled/shared_sparse.safetensors when smaller
    decoupled/masks*.safetensors       one bit-packed mask per task and merged tensor
    modalities/<task>/model.safetensors   the task's encoder, projector (and other non-LLM) tensors
                                          under the model's own names
    modalities/<task>/config.json…     the model's config/processor files
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


from ..checkpoint.decoupled import POPCOUNT, sparsify_shared
from ..checkpoint.output import ShardedWriter, copy_aux_files
from ..checkpoint.parts import PartView, strip_marker
from ..ops import unpack_bits
from ..units import human_bytes as human
from ..checkpoint.sources import SafetensorsSource, TensorSource, adapter_base_path, open_source
from ..errors import MergeError
from ..engine.architectures import Describer, spec_for
from ..engine.family_parts import discover
from ..engine.plan import DEFAULT_CHUNK_ELEMS, Plan, build_plan, part_patterns, read_model_type
from ..engine.recipe import Recipe
from ..engine.executor import Executor
from ..engine.sinks import DECOUPLED_DIR, FolderSink

MODALITIES_DIR = "modalities"


@dataclass
class ModelParts:
    """One input model split into its LLM (under canonical names) and its other parts."""

    task: str
    source: TensorSource                 # the whole model (an adapter densified on its base)
    llm: dict[str, str]                  # canonical (base LLM) name → the model's own name
    parts: dict[str, list[str]] = field(default_factory=dict)  # encoder/projector/other → names
    folder: Path | None = None           # where its config/processor files are

    @property
    def has_modality(self) -> bool:
        return any(self.parts.values())

    def bytes(self) -> int:
        """Size of this model as a standalone checkpoint (all its tensors)."""
        return sum(self.source.meta(n).nbytes for n in self.source.names())


# the plain LLM's names for the language model and the head, in the order tried
PLAIN_LLM_PREFIXES = (("model.", ""), ("lm_head.",))

Candidates = Callable[[str], list[str]]  # a model's own LLM tensor name -> canonical names to try, in order


def _describer(folder: Path | None, recipe: Recipe) -> Describer:
    return Describer(spec_for(read_model_type(folder)), tuple(part_patterns(recipe.parts)))


def _marker(desc: Describer, recipe: Recipe) -> tuple[str, bool]:
    """(the LLM name marker, whether it is the recipe's whole literal prefix): the recipe's
    `parts.llm` literal prefix, else the spec's marker segment."""
    pattern = recipe.parts.get("llm")
    if pattern:
        literal = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
        return (literal if literal.endswith(".") else ""), True
    return desc.spec.llm_marker, False


def seen_llm_prefix(names) -> str:
    """The prefix of a checkpoint's language-model blocks (`model.text_model.` for
    `model.text_model.layers.0.x`), for an error that names the layout it saw."""
    for n in names:
        m = re.match(r"(.*?)(?:layers|h|blocks|layer)\.0\.", n)
        if m:
            return m.group(1)
    return ""


def _parts_hint(names) -> str:
    prefix = seen_llm_prefix(names)
    llm = f"{prefix}*" if prefix else "<prefix of its language-model tensors>*"
    return f"name the parts in the recipe (`parts: {{llm: \"{llm}\", encoder: ..., projector: ...}}`)"


def split_model(src: TensorSource, task: str, recipe: Recipe, folder: Path | None,
                base_prefixes=PLAIN_LLM_PREFIXES, base_names: set[str] | None = None
                ) -> tuple[list[str], dict[str, list[str]], Candidates]:
    """(LLM names, {part: names} of the rest, canonical candidates of each LLM name) of a model: by
    the recipe's `parts`, else by the parts found from its config (engine/family_parts.py), else by
    its architecture spec. base_prefixes: (language-model prefixes, head prefixes) of the names the
    LLM tensors are to take (the base's)."""
    names = src.names()
    layout = None if recipe.parts else discover(folder)
    if layout is not None and layout.multimodal:
        return _split_by_layout(names, layout, base_prefixes)
    desc = _describer(folder, recipe)
    tagged = [(n, desc.describe(n, src.meta(n).shape).part) for n in names]
    if not any(p != "all" for _, p in tagged):
        return [n for n, _ in tagged], {}, lambda n: [n]  # no multimodal layout: all of it is the LLM
    # a tensor no part names that the base holds under the same name (a top-level `lm_head` beside
    # `parts: {llm: "model.text_model.*"}`) is the LLM's
    llm = [n for n, p in tagged if p == "llm" or (p == "all" and recipe.parts and base_names and n in base_names)]
    parts: dict[str, list[str]] = {"encoder": [], "projector": [], "other": []}
    chosen = set(llm)
    for n, p in tagged:
        if n not in chosen:
            parts["encoder" if p == "encoder" else "projector" if p == "projector" else "other"].append(n)
    if not llm:
        raise MergeError(f"model {task!r}: none of its tensors is an LLM tensor by its architecture spec; "
                         + _parts_hint(names))
    marker, literal = _marker(desc, recipe)

    def candidates(n: str) -> list[str]:
        if literal and marker and n.startswith(marker):
            # the recipe's whole prefix (`model.language_model.`) replaced by the base's
            return [p + n[len(marker):] for p in base_prefixes[0]] + [n]
        return ([strip_marker(n, marker)] if marker else []) + [n]
    return llm, parts, candidates


def _split_by_layout(names: list[str], layout, base_prefixes) -> tuple[list[str], dict[str, list[str]], Candidates]:
    llm, parts, rest = [], {"encoder": [], "projector": [], "other": []}, {}
    for n in names:
        found = layout.locate(n)
        kind = found[0].kind if found else "other"
        if kind in ("llm", "head"):
            llm.append(n)
            rest[n] = (0 if kind == "llm" else 1, found[1])
        else:
            parts[kind].append(n)

    def candidates(n: str) -> list[str]:
        which, tail = rest[n]
        return [p + tail for p in base_prefixes[which]]
    return llm, parts, candidates


def _base_prefixes(folder: Path | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The prefixes of a plain base LLM's language model and head, found from its config."""
    layout = discover(folder)
    if layout is None or layout.multimodal or not layout.llm_prefixes():
        return PLAIN_LLM_PREFIXES
    return layout.llm_prefixes(), layout.head_prefixes() or PLAIN_LLM_PREFIXES[1]


def _canonical(task: str, names: list[str], llm: list[str], candidates: Candidates, base_names: set[str],
               base_label: str) -> dict[str, str]:
    """canonical → own name: for each LLM tensor, the first of its candidate names the base has."""
    mapping: dict[str, str] = {}
    for n in llm:
        options = candidates(n)
        found = next((c for c in options if c in base_names), None)
        if found is None:
            raise MergeError(f"model {task!r}: its LLM tensor {n!r} (as {options[0]!r}) is not in the base "
                             f"{base_label!r}; give the base LLM the model was fine-tuned from, or "
                             + _parts_hint(names))
        if found in mapping:
            raise MergeError(f"model {task!r}: its tensors {mapping[found]!r} and {n!r} both map to the base's "
                             f"{found!r}; " + _parts_hint(names))
        mapping[found] = n
    return mapping


def _open_model(entry, base: TensorSource, allow_pickle: bool) -> TensorSource:
    """A model; an adapter is densified on the model its config names (for an MLLM: the MLLM
    it was trained on), else on the recipe's base."""
    p = Path(entry.path)
    if p.is_dir() and (p / "adapter_config.json").exists():
        named = adapter_base_path(p)
        if named and Path(named).exists() and Path(named).absolute() != Path(base.path or "").absolute():
            return open_source(p, label=entry.label, base=open_source(named, label=f"{entry.label} base",
                                                                        allow_pickle=allow_pickle))
    return open_source(p, label=entry.label, allow_pickle=allow_pickle, base=base)


def _folder_of(src: TensorSource) -> Path | None:
    # an adapter's config files are its base model's (the MLLM it was trained on)
    base = getattr(src, "base", None)
    if base is not None and (src.folder is None or not (src.folder / "config.json").exists()):
        return base.folder
    return src.folder


def plan_composed(recipe: Recipe, *, allow_pickle: bool = False, chunk_elems: int = DEFAULT_CHUNK_ELEMS,
                  preloaded: dict[str, TensorSource] | None = None) -> Plan:
    """Open the base and the models, split each into LLM and modality parts, plan the LLM merge;
    the parts are the plan's `composition` (a list of ModelParts, one per model)."""
    if recipe.base is None:
        raise MergeError("method mmer needs a base model (the LLM the models were fine-tuned from): add `base: "
                         "path/to/base` to the recipe")
    preloaded = preloaded or {}
    base_src = preloaded.get(recipe.base) or open_source(recipe.base, label="base", allow_pickle=allow_pickle)
    base_llm, base_parts, base_candidates = split_model(
        base_src, "base", recipe, base_src.folder, base_names={n for n in base_src.names() if n.startswith("lm_head.")})
    # a multimodal base: its LLM under the plain names
    base_view = PartView(base_src, {base_candidates(n)[0]: n for n in base_llm}, "base") \
        if base_parts else base_src
    base_names = set(base_view.names())
    prefixes = PLAIN_LLM_PREFIXES if base_parts else _base_prefixes(base_src.folder)
    models = []
    for entry in recipe.models:
        src = preloaded.get(entry.path) or _open_model(entry, base_src, allow_pickle)
        folder = _folder_of(src)
        llm, parts, candidates = split_model(src, entry.label, recipe, folder, prefixes, base_names)
        mapping = _canonical(entry.label, src.names(), llm, candidates, base_names, base_src.label)
        models.append(ModelParts(entry.label, src, mapping, parts, folder))
    views = [PartView(m.source, m.llm, m.task) for m in models]
    plan = build_plan(recipe, base_view, views, chunk_elems)
    plan.composition = models
    return plan


def _safe_dir(task: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", task) or "task"


class ComposedSink(FolderSink):
    """FolderSink + every model's modality part, the extended manifest and the storage report."""

    def __init__(self, plan: Plan, output, overwrite: bool = False,
                 max_shard_bytes: int | None = None, tool_version: str = "?"):
        super().__init__(plan, output, overwrite, max_shard_bytes, tool_version)
        self.parts: list[ModelParts] = plan.composition
        self.max_shard_bytes = max_shard_bytes
        self.storage: dict[str, Any] | None = None

    def _write_modality(self, m: ModelParts, dirname: str) -> None:
        folder = self.folder.tmp / MODALITIES_DIR / dirname
        folder.mkdir(parents=True)
        names = [n for part in ("encoder", "projector", "other") for n in m.parts.get(part, [])]
        kwargs = {"max_shard_bytes": self.max_shard_bytes} if self.max_shard_bytes else {}
        writer = ShardedWriter(folder, [(n, m.source.meta(n)) for n in names], **kwargs)
        for n in names:
            writer.write(n, m.source.read(n))
        writer.close()
        # the config, processor and tokenizer files: generate loads them from here. A LoRA
        # adapter's own folder first (a processor saved with it), then the model it was trained on
        for src in dict.fromkeys(f for f in (m.source.folder, m.folder) if f is not None):
            copy_aux_files(src, folder)

    def close(self, manifest: dict[str, Any] | None = None) -> Path:
        try:
            with self.folder.writing():  # a full or read-only disk: one line
                return self._compose(manifest)
        except BaseException:
            self.folder.abort()
            raise

    def _compose(self, manifest: dict[str, Any] | None) -> Path:
        for w in (self.main, self.shared, self.masks):
            w.close()
        manifest = dict(manifest or {})
        tasks = []
        for entry, m in zip(manifest.get("tasks", []), self.parts):
            entry = dict(entry)
            if m.has_modality:
                dirname = f"{MODALITIES_DIR}/{_safe_dir(m.task)}"
                self._write_modality(m, _safe_dir(m.task))
                entry["modality"] = {"dir": dirname, **{k: v for k, v in m.parts.items()}}
            renamed = {c: o for c, o in m.llm.items() if c != o}
            if renamed:
                entry["llm_names"] = renamed
            tasks.append(entry)
        manifest["tasks"] = tasks
        ddir = self.folder.tmp / DECOUPLED_DIR
        densities = mask_densities(ddir, manifest)  # reads the dense τ*: before sparsifying it
        manifest["shared_format"] = sparsify_shared(ddir, manifest)
        self.storage = storage_report(self.folder.tmp, manifest, self.parts, densities)
        manifest["storage"] = self.storage
        return super()._close(manifest)


def _size(files) -> int:
    return sum(f.stat().st_size for f in files)


def mask_densities(ddir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Per task, the fraction of merged parameters its mask keeps, and of τ*'s non-zeros (where
    τ* is 0 the mask is 1 but changes nothing: the paper's "kept 2.2% of τ*" is the latter)."""
    masks = SafetensorsSource(sorted(ddir.glob("masks*.safetensors")), "masks", ddir)
    shared = SafetensorsSource(sorted(ddir.glob("shared*.safetensors")), "shared", ddir)
    merged = manifest["tensors"]
    total = sum(shared.meta(n).numel for n in merged)
    support = {n: (shared.read(n).reshape(-1) != 0) for n in merged}
    nnz = sum(int(s.sum()) for s in support.values())
    of_all, of_shared = {}, {}
    for t in manifest["tasks"]:
        ones = kept = 0
        for n in merged:
            packed = masks.read(f"{t['name']}::{n}")
            ones += int(POPCOUNT[packed.long()].sum())
            kept += int((unpack_bits(packed, (support[n].numel(),)) & support[n]).sum())
        of_all[t["name"]] = ones / total if total else 0.0
        of_shared[t["name"]] = kept / nnz if nnz else 0.0
    return {"mask_density": of_all, "mask_density_of_shared": of_shared,
            "shared_density": nnz / total if total else 0.0, "merged_parameters": total}


def storage_report(folder: Path, manifest: dict[str, Any], parts: list[ModelParts],
                   densities: dict[str, Any]) -> dict[str, Any]:
    """Bytes of each part of the composed folder against the separate models, and mask densities."""
    ddir = folder / DECOUPLED_DIR
    text = _size(folder.glob("*.safetensors"))
    shared = _size(ddir.glob("shared*.safetensors"))
    masks = _size(ddir.glob("masks*.safetensors"))
    modalities = _size((folder / MODALITIES_DIR).rglob("*.safetensors")) if (folder / MODALITIES_DIR).exists() else 0
    separate = sum(m.bytes() for m in parts)
    composed_bytes = text + shared + masks + modalities
    return {
        "text_weights": text, "shared": shared, "shared_format": manifest.get("shared_format", "dense"),
        "masks": masks, "modalities": modalities, "composed": composed_bytes, "separate_models": separate,
        "ratio": composed_bytes / separate if separate else None, **densities,
    }


def compose(plan: Plan, output, *, device: str = "cpu", overwrite: bool = False, exact_stats: bool = False,
            progress: bool = False, max_shard_bytes: int | None = None, tool_version: str = "?"):
    """Run a composition planned by plan_composed into `output`; returns (Report, storage report)."""
    sink = ComposedSink(plan, output, overwrite=overwrite, max_shard_bytes=max_shard_bytes,
                        tool_version=tool_version)
    report = Executor(plan, device=device, exact_stats=exact_stats, progress=progress).run(sink)
    return report, sink.storage



def storage_lines(s: dict[str, Any]) -> list[str]:
    """The storage report as printed after `modalmerge merge` and by `extract --list`."""
    lines = [f"storage: text weights {human(s['text_weights'])} + tau* {human(s['shared'])} ({s['shared_format']}) "
             f"+ masks {human(s['masks'])} + encoders/projectors {human(s['modalities'])} = "
             f"{human(s['composed'])}, against {human(s['separate_models'])} for the separate models"
             + (f" ({100 * s['ratio']:.1f}%)" if s.get("ratio") else "")]
    lines.append(f"  tau* is non-zero on {100 * s['shared_density']:.2f}% of {s['merged_parameters']:,} merged parameters")
    for task, d in s["mask_density"].items():
        lines.append(f"  mask {task}: keeps {100 * s['mask_density_of_shared'][task]:.2f}% of tau*'s non-zeros "
                     f"({100 * d:.2f}% of all merged parameters)")
    return lines

