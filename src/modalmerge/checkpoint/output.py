"""Output folders, written atomically: everything goes into a hidden temporary folder beside the
destination, which is renamed into place only when the whole merge has succeeded. A failed or
interrupted merge removes the temporary folder and never touches the destination.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..errors import MergeError
from .safetensors_io import SafetensorsStreamWriter, TensorMeta

# Files that make a folder loadable by transformers, besides the weights.
AUX_PATTERNS = (
    "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "vocab*",
    "merges.txt", "added_tokens.json", "spiece.model", "sentencepiece*.model", "*.tiktoken",
    "preprocessor_config.json", "processor_config.json", "chat_template*", "image_processor*.json",
    "video_preprocessor*.json", "feature_extractor*.json", "modules.json", "sentence_bert_config.json",
    "config_sentence_transformers.json", "1_Pooling", "2_Normalize",
)

DEFAULT_SHARD_BYTES = 5 * 1024**3


class AtomicFolder:
    """A temporary folder that becomes `final` on commit() and disappears on abort()."""

    def __init__(self, final: str | os.PathLike, overwrite: bool = False):
        self.final = Path(final).absolute()
        if self.final.exists() and not overwrite:
            raise MergeError(f"output {self.final} already exists; choose another --output or pass --overwrite")
        if self.final.exists() and not self.final.is_dir():
            raise MergeError(f"output {self.final} exists and is not a folder; choose another --output")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.final.parent / f".{self.final.name}.partial-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()

    def commit(self) -> Path:
        old = None
        if self.final.exists():
            old = self.final.parent / f".{self.final.name}.old-{os.getpid()}"
            os.rename(self.final, old)
        os.rename(self.tmp, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class ShardedWriter:
    """Streams planned tensors into one or more safetensors shards, with an index when sharded."""

    def __init__(self, folder: Path, entries: list[tuple[str, TensorMeta]], stem: str = "model",
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: dict[str, str] | None = None):
        shards: list[list[tuple[str, TensorMeta]]] = [[]]
        size = 0
        for name, meta in entries:
            if shards[-1] and size + meta.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, meta))
            size += meta.nbytes
        n = len(shards)
        self._writers: dict[str, SafetensorsStreamWriter] = {}
        self._files: list[SafetensorsStreamWriter] = []
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"{stem}.safetensors" if n == 1 else f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"
            writer = SafetensorsStreamWriter(folder / fname, shard, metadata)
            self._files.append(writer)
            for name, _ in shard:
                self._writers[name] = writer
                weight_map[name] = fname
        if n > 1:
            total = sum(m.nbytes for _, m in entries)
            (folder / f"{stem}.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

    def write(self, name: str, tensor: torch.Tensor, start: int = 0) -> None:
        self._writers[name].write(name, tensor, start)

    def close(self) -> None:
        for w in self._files:
            w.close()


def copy_aux_files(src: Path | None, dst: Path) -> list[str]:
    """Copy config, tokenizer and processor files from the chosen model's folder."""
    if src is None or not src.is_dir():
        return []
    copied = []
    for pattern in AUX_PATTERNS:
        for f in sorted(src.glob(pattern)):
            target = dst / f.name
            if target.exists():
                continue
            if f.is_dir():
                shutil.copytree(f, target)
            else:
                shutil.copy2(f, target)
            copied.append(f.name)
    return copied
