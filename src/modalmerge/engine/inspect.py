"""`modalmerge inspect`: how a set of fine-tunes relate to their base and to each other, before
choosing a merge method. Per group of tensors (embeddings, each block, norms, head): the norm of
each model's task vector, how often the task vectors disagree in sign, and their pairwise cosine.

Models are read one tensor (or flat range of a large tensor) at a time, like a merge.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from ..checkpoint.sources import TensorSource
from ..errors import MergeError
from ..methods.base import TensorInfo
from ..ops.reduce import deterministic_dot
from ..ops.similarity import gram_matrix, sign_conflicts
from .architectures import Describer, spec_for
from .family_parts import discover
from .plan import FLOAT_DTYPES, check_no_extra, check_tensor, read_model_type, who

CHUNK_ELEMS = 1 << 22

# groups outside the blocks, in report order (blocks come right after the embeddings)
_HEAD = re.compile(r"(^|\.)(lm_head|head|heads|classifier|score|cls|pooler|qa_outputs|output_layer)(\.|$)")
_NORM = re.compile(r"norm|(^|\.)ln_?(f|\d+)?(\.|$)", re.IGNORECASE)
_ORDER = {"embeddings": 0, "layer": 1, "norms": 2, "head": 3, "other": 4}


def group_of(info: TensorInfo) -> tuple[tuple, str]:
    """(sort key, label) of the group a tensor is reported in."""
    if info.layer is not None:
        kind, label = "layer", f"layer {info.layer}"
    elif _HEAD.search(info.name):
        kind = label = "head"
    elif _NORM.search(info.name):
        kind = label = "norms"
    elif info.kind == "embedding":
        kind = label = "embeddings"
    else:
        kind = label = "other"
    if info.part != "all":
        label = f"{info.part} {label}"
    return (info.part, _ORDER[kind], info.layer or 0), label


@dataclass
class Sums:
    """Sums over the elements of a group; every reported number is a function of these."""

    tensors: int = 0
    params: int = 0
    base_sq: float = 0.0
    gram: torch.Tensor | None = None      # [T, T] float64: <τ_i, τ_j>
    conflicting: int = 0
    overlapping: int = 0

    def add(self, other: "Sums") -> None:
        self.tensors += other.tensors
        self.params += other.params
        self.base_sq += other.base_sq
        self.gram = other.gram.clone() if self.gram is None else self.gram + other.gram
        self.conflicting += other.conflicting
        self.overlapping += other.overlapping

    def report(self, names: list[str]) -> dict[str, Any]:
        diag = self.gram.diagonal().clamp_min(0).sqrt().tolist()
        cosine = []
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                denom = diag[i] * diag[j]
                value = float(self.gram[i, j]) / denom if denom > 0 else None
                cosine.append({"a": names[i], "b": names[j],
                               "value": None if value is None else max(-1.0, min(1.0, value))})
        base_norm = math.sqrt(self.base_sq)
        return {
            "tensors": self.tensors,
            "params": self.params,
            "base_norm": base_norm,
            "norms": dict(zip(names, diag)),
            "relative_norms": {n: (d / base_norm if base_norm > 0 else None) for n, d in zip(names, diag)},
            # among elements where at least two task vectors are non-zero; undefined where none are
            "sign_conflict": (self.conflicting / self.overlapping) if self.overlapping and len(names) > 1 else None,
            "cosine": cosine,
        }


@dataclass
class Inspection:
    base: str
    models: list[str]
    groups: list[tuple[str, Sums]] = field(default_factory=list)
    total: Sums = field(default_factory=Sums)
    skipped: list[str] = field(default_factory=list)   # tensors not compared (not floating point)

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "models": self.models,
            "groups": [{"group": label, **sums.report(self.models)} for label, sums in self.groups],
            "total": self.total.report(self.models),
            "skipped_tensors": self.skipped,
        }


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def inspect_models(base: TensorSource, models: list[TensorSource], include: list[str] | None = None,
                   exclude: list[str] | None = None, progress: bool = False,
                   chunk_elems: int = CHUNK_ELEMS) -> Inspection:
    """Task-vector statistics of `models` against `base`, per tensor group and in total."""
    include, exclude = include or ["*"], exclude or []
    names = [m.label for m in models]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise MergeError(f"two models are named {dupes[0]!r}; give them distinct folder names")

    def wanted(name: str) -> bool:
        return _matches(name, include) and not _matches(name, exclude)

    def fix(name: str) -> str:
        return f"pass --exclude '{name}'"

    # the same mergeability checks as a merge, all before reading any values
    selected, skipped = [], []
    for name in base.names():
        if not wanted(name):
            continue
        check_tensor(name, base, models, exclude_fix=fix(name))
        (selected if base.meta(name).dtype in FLOAT_DTYPES else skipped).append(name)
    for src in models:
        extra = [x for x in src.names() if x not in base and wanted(x)]
        if extra:
            check_no_extra(base, [src], wanted, exclude_fix=fix(extra[0]))
    if not selected:
        raise MergeError("no floating-point tensor is selected; check --include and --exclude")

    describer = Describer(spec_for(read_model_type(base.folder)))
    groups: dict[str, tuple[tuple, Sums]] = {}
    result = Inspection(base.label, names, skipped=skipped)
    total_elems = sum(base.meta(n).numel for n in selected)
    with tqdm(total=total_elems, desc="inspecting", unit="param", unit_scale=True, disable=not progress,
              leave=False, dynamic_ncols=True) as bar:
        for name in selected:
            meta = base.meta(name)
            sums = _tensor_sums(name, meta.numel, base, models, chunk_elems, bar)
            key, label = group_of(describer.describe(name, meta.shape))
            if label not in groups:
                groups[label] = (key, Sums())
            groups[label][1].add(sums)
            result.total.add(sums)
    result.groups = [(label, sums) for label, (key, sums) in sorted(groups.items(), key=lambda kv: kv[1][0])]
    return result


def _tensor_sums(name: str, numel: int, base: TensorSource, models: list[TensorSource], chunk_elems: int,
                 bar) -> Sums:
    sums = Sums(tensors=1, params=numel)
    whole = numel <= chunk_elems
    for start in range(0, max(numel, 1), chunk_elems):
        stop = min(start + chunk_elems, numel)

        def read(src: TensorSource) -> torch.Tensor:
            value = src.read(name) if whole else src.read(name, start, stop)
            value = value.reshape(-1).float()
            if not bool(torch.isfinite(value).all()):
                raise MergeError(f"model {who(src)}: tensor {name!r} contains NaN or Inf; fix the checkpoint or "
                                 f"pass --exclude '{name}'")
            return value

        b = read(base)
        tau = torch.stack([read(m) for m in models]) - b
        part = Sums(gram=gram_matrix(tau))
        part.base_sq = deterministic_dot(b, b)
        part.conflicting, part.overlapping = sign_conflicts(tau)
        sums.add(part)
        bar.update(stop - start)
    return sums


def model_parts(source: TensorSource) -> dict[str, Any]:
    """Which parts of a model folder are its language model, towers, projectors and head, and where
    that came from: "discovered" (the model's class built from its config, engine/family_parts.py),
    "spec" (the table in engine/architectures.py, where discovery fails) or "none" (no multimodal
    layout: every tensor is the language model's). Each part with the number of tensors it holds."""
    names = source.names()
    model_type = read_model_type(source.folder)
    layout = discover(source.folder)
    parts: list[dict[str, Any]] = []
    unplaced = 0
    if layout is not None and layout.multimodal:
        counts: dict[int, int] = {}
        for n in names:
            found = layout.locate(n)
            if found is None:
                unplaced += 1
            else:
                counts[id(found[0])] = counts.get(id(found[0]), 0) + 1
        for part in layout.parts:
            parts.append({"kind": part.kind, "prefix": part.prefixes[0], "module": part.module, "class": part.cls,
                          "tensors": counts.get(id(part), 0)})
        return {"model": source.label, "model_type": model_type, "architecture": layout.architecture,
                "source": "discovered", "parts": parts, "unplaced_tensors": unplaced}
    spec = spec_for(model_type)
    if spec.parts:
        describer = Describer(spec)
        by_part: dict[str, list[str]] = {}
        for n in names:
            by_part.setdefault(describer.describe(n, source.meta(n).shape).part, []).append(n)
        for kind, members in by_part.items():
            if kind == "all":
                unplaced += len(members)
                continue
            groups: dict[str, list[str]] = {}  # by the first segment (two under `model.`)
            for n in members:
                segs = n.split(".")
                groups.setdefault(".".join(segs[:2] if segs[0] == "model" else segs[:1]), []).append(n)
            for group in groups.values():
                parts.append({"kind": kind, "prefix": _common_prefix(group), "module": "", "class": "",
                              "tensors": len(group)})
        return {"model": source.label, "model_type": model_type, "architecture": "", "source": "spec",
                "parts": parts, "unplaced_tensors": unplaced}
    return {"model": source.label, "model_type": model_type, "architecture": layout.architecture if layout else "",
            "source": "none", "parts": [], "unplaced_tensors": 0}


def _common_prefix(names: list[str]) -> str:
    """The longest run of whole module segments (the tensor's own last segment left out) every
    name starts with."""
    first = names[0].split(".")[:-1]
    k = len(first)
    for n in names[1:]:
        segs = n.split(".")[:-1]
        k = next((i for i in range(min(k, len(segs))) if segs[i] != first[i]), min(k, len(segs)))
    return ".".join(first[:k]) + ("." if k else "")

