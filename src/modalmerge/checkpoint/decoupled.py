"""Reading a decoupled merge (TALL, EMR, MMER) and materialising one task's model from it.

Layout of a decoupled output folder (written by engine/sinks.py FolderSink):

    model*.safetensors (+ index)     W_text = θ_0 + c̄ ⊙ shared, what transformers loads
    config.json, tokenizer…, README.md
    decoupled/manifest.json          format, method, params, tasks [{name, path, scalar}],
                                     tensors (the merged names), mask_key "{task}::{tensor}"
    decoupled/shared*.safetensors    the shared vector, one tensor per merged name, W_text's dtype
    decoupled/masks*.safetensors     per task and merged tensor, uint8 [ceil(numel / 8)]:
                                     the flat mask, 1 bit per element, little-endian in a byte

with c_t = scalar_t · mask_t and c̄ the mean of c_t over all tasks. Task t's model is
θ_0 + c_t ⊙ shared = W_text + (c_t − c̄) ⊙ shared, computed in float32 and cast to W_text's
dtype; tensors that were not merged are W_text's own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch

from ..errors import MergeError
from ..ops import unpack_bits
from .output import AtomicFolder, ShardedWriter, copy_aux_files
from .safetensors_io import TensorMeta, check_regular
from .sources import SafetensorsSource, TensorSource, open_source, read_weight_map, shard_path

FORMAT = "modalmerge-decoupled/1"
DECOUPLED_DIR = "decoupled"
MANIFEST = "manifest.json"
TEXT_WEIGHTS = "mean over all tasks of scalar_t * mask_t"
# elements reconstructed at once (a multiple of 8, so mask reads stay byte aligned)
BLOCK_ELEMS = 1 << 24

POPCOUNT = _POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)
SPARSE_STEM = "shared_sparse"


def _stem_files(folder: Path, stem: str) -> list[Path]:
    index = folder / f"{stem}.safetensors.index.json"
    if os.path.lexists(index):  # shards must be regular files inside the folder, as for a model
        fix = "the decoupled part is incomplete or corrupt, re-run the merge"
        return [shard_path(folder, index, s, fix) for s in dict.fromkeys(read_weight_map(index, fix).values())]
    single = folder / f"{stem}.safetensors"
    if single.exists():
        return [single]
    raise MergeError(f"{folder}: no {stem}.safetensors (or index); the decoupled part is incomplete, re-run the merge")


class DecoupledFolder:
    """A decoupled merge folder: its text weights, shared vector, masks and per-task scalars."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise MergeError(f"{self.path} is not a folder; give the output folder of a decoupled merge")
        ddir = self.path / DECOUPLED_DIR
        manifest_path = ddir / MANIFEST
        if not manifest_path.exists():
            raise MergeError(f"{self.path} is not a decoupled merge (no {DECOUPLED_DIR}/{MANIFEST}); merge with a "
                             "task-conditional method (tall, emr, mmer) to get per-task models")
        try:
            check_regular(manifest_path, "decoupled merge manifest")
            self.manifest = json.loads(manifest_path.read_text())
            fmt = self.manifest["format"]
            self.tasks = [(str(t["name"]), float(t.get("scalar", 1.0))) for t in self.manifest["tasks"]]
            self.tensors = list(self.manifest["tensors"])
        except (OSError, ValueError, KeyError, TypeError):
            raise MergeError(f"{manifest_path}: corrupt manifest (needs format, tasks, tensors); "
                             "re-run the merge") from None
        if fmt != FORMAT:
            raise MergeError(f"{manifest_path}: format {fmt!r} is not supported (this modalmerge reads {FORMAT}); "
                             "upgrade modalmerge or re-run the merge")
        text_weights = self.manifest.get("text_weights", TEXT_WEIGHTS)
        if text_weights != TEXT_WEIGHTS:
            raise MergeError(f"{manifest_path}: text weights {text_weights!r} are not supported "
                             f"(only {TEXT_WEIGHTS!r}); upgrade modalmerge")
        if not self.tasks:
            raise MergeError(f"{manifest_path}: no tasks; re-run the merge")
        self.mask_key = self.manifest.get("mask_key", "{task}::{tensor}")
        self.text = open_source(self.path, label=self.path.name)
        shared = SafetensorsSource(_stem_files(ddir, self.manifest.get("shared", "shared")), "shared", ddir)
        self.shared = SparseShared(shared, self.text) if self.manifest.get("shared_format") == "sparse" else shared
        self.masks = SafetensorsSource(_stem_files(ddir, self.manifest.get("masks", "masks")), "masks", ddir)
        for name in self.tensors:
            if name not in self.text:
                raise MergeError(f"{self.path}: merged tensor {name!r} of the manifest is not in the model's "
                                 "weights; the folder is incomplete, re-run the merge")
            if name not in self.shared:
                raise MergeError(f"{ddir}: tensor {name!r} is missing from the shared vector; the folder is "
                                 "incomplete, re-run the merge")
        self._merged = set(self.tensors)

    # -- tasks -----------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return [n for n, _ in self.tasks]

    @property
    def method(self) -> str:
        return str(self.manifest.get("method", "?"))

    def check_task(self, task: str) -> int:
        for i, (name, _) in enumerate(self.tasks):
            if name == task:
                return i
        raise MergeError(f"{self.path}: no task {task!r}; its tasks are: {', '.join(self.task_names)}")

    # -- pieces ----------------------------------------------------------------------------
    def _mask_name(self, task: str, tensor: str) -> str:
        key = self.mask_key.format(task=task, tensor=tensor)
        if key not in self.masks:
            raise MergeError(f"{self.path}: the mask of task {task!r} for tensor {tensor!r} is missing from "
                             f"{DECOUPLED_DIR}/; the folder is incomplete, re-run the merge")
        return key

    def mask(self, task: str, tensor: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Task's mask of a merged tensor: the whole (shaped) mask, or flat elements [start, stop)."""
        self.check_task(task)
        key = self._mask_name(task, tensor)
        meta = self.text.meta(tensor)
        if self.masks.meta(key).numel != (meta.numel + 7) // 8:
            raise MergeError(f"{self.path}: the mask of task {task!r} for tensor {tensor!r} has "
                             f"{self.masks.meta(key).numel} bytes, the tensor needs {(meta.numel + 7) // 8}; "
                             "the folder is corrupt, re-run the merge")
        whole = start == 0 and stop is None
        stop = meta.numel if stop is None else stop
        first, last = start // 8, (stop + 7) // 8
        bits = unpack_bits(self.masks.read(key, first, last), ((last - first) * 8,))
        flat = bits[start - first * 8: stop - first * 8]
        return flat.reshape(meta.shape) if whole else flat

    def coefficients(self, tensor: str, start: int = 0, stop: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(c_t per task, c̄) over flat elements [start, stop) of a merged tensor, float32."""
        c = [scalar * self.mask(name, tensor, start, stop).reshape(-1).to(torch.float32) for name, scalar in self.tasks]
        mean = torch.stack(c).mean(dim=0)
        return c, mean

    # -- per-task models -------------------------------------------------------------------
    def read(self, task: str, tensor: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """One tensor of task's model (or its flat elements [start, stop)), in the folder's dtype."""
        i = self.check_task(task)
        text = self.text.read(tensor, start, stop)
        if tensor not in self._merged:
            return text
        meta = self.text.meta(tensor)
        end = meta.numel if stop is None else stop
        c, mean = self.coefficients(tensor, start, end)
        shared = self.shared.read(tensor, start, end).reshape(-1).to(torch.float32)
        value = text.reshape(-1).to(torch.float32) + (c[i] - mean) * shared
        value = value.to(meta.dtype)
        return value.reshape(meta.shape) if (start == 0 and stop is None) else value

    def reconstruct(self, task: str) -> Iterator[tuple[str, torch.Tensor]]:
        """Task's whole model, one tensor at a time: (name, tensor) in the folder's order."""
        self.check_task(task)
        for name in self.text.names():
            yield name, self.read(task, name)

    def source(self, task: str) -> TensorSource:
        """Task's model as a TensorSource (an input to another merge, without writing it out)."""
        return TaskSource(self, task)

    # -- composed (MMER) folders -----------------------------------------------------------
    def task_entry(self, task: str) -> dict:
        return dict(self.manifest["tasks"][self.check_task(task)])

    def llm_names(self, task: str) -> dict[str, str]:
        """Merged-model name → the task's own model's name, where they differ (MMER composed)."""
        return dict(self.task_entry(task).get("llm_names") or {})

    def modality_source(self, task: str) -> TensorSource | None:
        """The task's encoder/projector tensors (MMER composed), or None for a text-only task."""
        entry = self.task_entry(task).get("modality")
        if not entry:
            return None
        folder = self.path / entry["dir"]
        if not folder.is_dir():
            raise MergeError(f"{self.path}: the modality folder {entry['dir']} of task {task!r} is missing; the "
                             "folder is incomplete, re-run the merge")
        return open_source(folder, label=f"{self.path.name}[{task}]")

    # -- reporting -------------------------------------------------------------------------
    def mask_density(self, task: str) -> float:
        """Fraction of the merged parameters that task's mask keeps."""
        self.check_task(task)
        ones = total = 0
        for name in self.tensors:
            ones += int(_POPCOUNT[self.masks.read(self._mask_name(task, name)).long()].sum())
            total += self.text.meta(name).numel
        return ones / total if total else 0.0

    def storage(self) -> dict[str, int]:
        """Bytes on disk: text weights, shared vector, masks, and T standalone models."""
        def size(files) -> int:
            return sum(f.stat().st_size for f in files)
        ddir = self.path / DECOUPLED_DIR
        text = size(self.path.glob("*.safetensors"))
        shared = size(ddir.glob(f"{self.manifest.get('shared', 'shared')}*.safetensors"))
        masks = size(ddir.glob(f"{self.manifest.get('masks', 'masks')}*.safetensors"))
        return {"text": text, "shared": shared, "masks": masks, "decoupled": shared + masks,
                "standalone": len(self.tasks) * text}


class SparseShared(TensorSource):
    """The shared vector stored sparse: per tensor `{name}::index` (flat positions, ascending)
    and `{name}::value`; read back dense, any flat range."""

    def __init__(self, stored: SafetensorsSource, like: TensorSource):
        self.stored, self.like = stored, like
        self.label, self.path = stored.label, stored.path
        self._names = [n[:-len("::index")] for n in stored.names() if n.endswith("::index")]

    def names(self):
        return list(self._names)

    def meta(self, name):
        return self.like.meta(name)

    def read(self, name, start=0, stop=None):
        meta = self.like.meta(name)
        end = meta.numel if stop is None else stop
        index = self.stored.read(f"{name}::index").long()
        lo, hi = (int(i) for i in torch.searchsorted(index, torch.tensor([start, end])))
        out = torch.zeros(end - start, dtype=meta.dtype)
        out[index[lo:hi] - start] = self.stored.read(f"{name}::value")[lo:hi].to(meta.dtype)
        return out.reshape(meta.shape) if (start == 0 and stop is None) else out


def sparsify_shared(ddir: Path, manifest: dict) -> str:
    """Store the dense shared vector of a finished decoupled part sparse when that is smaller
    (a TIES trim leaves τ* mostly zero); updates manifest["shared"]. Returns "sparse" or "dense"."""
    stem = manifest.get("shared", "shared")
    files = _stem_files(ddir, stem)
    dense = SafetensorsSource(files, "shared", ddir)
    names = list(manifest["tensors"])
    counts, dense_bytes, sparse_bytes = {}, 0, 0
    for name in names:
        meta = dense.meta(name)
        counts[name] = int(torch.count_nonzero(dense.read(name)))
        idx_bytes = 4 if meta.numel < 2**31 else 8
        dense_bytes += meta.nbytes
        sparse_bytes += counts[name] * (idx_bytes + meta.dtype.itemsize)
    if sparse_bytes >= dense_bytes:
        return "dense"
    entries = []
    for name in names:
        meta = dense.meta(name)
        idx_dtype = torch.int32 if meta.numel < 2**31 else torch.int64
        entries += [(f"{name}::index", TensorMeta((counts[name],), idx_dtype)),
                    (f"{name}::value", TensorMeta((counts[name],), meta.dtype))]
    writer = ShardedWriter(ddir, entries, stem=SPARSE_STEM)
    for name in names:
        flat = dense.read(name).reshape(-1)
        index = torch.nonzero(flat).reshape(-1)
        if index.numel():
            writer.write(f"{name}::index", index.to(torch.int32 if flat.numel() < 2**31 else torch.int64))
            writer.write(f"{name}::value", flat[index])
    writer.close()
    del dense
    for f in files:
        f.unlink()
    index_file = ddir / f"{stem}.safetensors.index.json"
    if index_file.exists():
        index_file.unlink()
    manifest["shared"] = SPARSE_STEM
    return "sparse"


class TaskSource(TensorSource):
    """One task's reconstructed model, read lazily, tensor by tensor."""

    def __init__(self, folder: DecoupledFolder, task: str):
        folder.check_task(task)
        self._decoupled, self.task = folder, task
        self.label, self.path = f"{folder.path.name}[{task}]", folder.path

    def names(self):
        return self._decoupled.text.names()

    def meta(self, name):
        return self._decoupled.text.meta(name)

    def read(self, name, start=0, stop=None):
        return self._decoupled.read(self.task, name, start, stop)


def extract_task(folder: str | os.PathLike, task: str, output: str | os.PathLike, *, overwrite: bool = False,
                 max_shard_bytes: int | None = None, progress: bool = False) -> Path:
    """Write task's standalone model folder (weights, config, tokenizer files), atomically."""
    from tqdm import tqdm

    d = DecoupledFolder(folder)
    d.check_task(task)
    names = d.text.names()
    own = d.llm_names(task)
    modality = d.modality_source(task)
    # the LLM under the model's own names, then its encoder/projector tensors unchanged
    entries = [(own.get(n, n), TensorMeta(d.text.meta(n).shape, d.text.meta(n).dtype)) for n in names]
    copied = [(n, modality.meta(n)) for n in modality.names()] if modality is not None else []
    out = AtomicFolder(output, overwrite, inputs=[("decoupled merge", str(folder))])  # never over its input
    try:
        with out.writing():  # a full or read-only disk: one line
            kwargs = {"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}
            writer = ShardedWriter(out.tmp, entries + copied, **kwargs)
            total = sum(m.numel for _, m in entries)
            with tqdm(total=total, desc=f"extract {task}", unit="param", unit_scale=True, disable=not progress,
                      leave=False, dynamic_ncols=True) as bar:
                for name, (target, meta) in zip(names, entries):
                    for start in range(0, max(meta.numel, 1), BLOCK_ELEMS):
                        stop = min(start + BLOCK_ELEMS, meta.numel)
                        writer.write(target, d.read(task, name, start, stop), start)
                        bar.update(stop - start)
            for name, _ in copied:
                writer.write(name, modality.read(name))
            writer.close()
            # a modality's own config (the multimodal model's), else the merged folder's
            if modality is not None:
                copy_aux_files(modality.folder, out.tmp)
            copy_aux_files(d.path, out.tmp)
            (out.tmp / "README.md").write_text(
                f"---\ntags: [merge, modalmerge]\n---\n# Task `{task}` extracted with modalmerge\n\n"
                f"From the {d.method} merge in `{d.path}`: the merged weights plus this task's mask of the shared "
                f"vector (scalar {d.tasks[d.check_task(task)][1]:g}).\n")
            return out.commit()
    except BaseException:
        out.abort()
        raise
