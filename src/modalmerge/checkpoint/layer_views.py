"""Layer views: a model made of other models' layer ranges, renumbered (mergekit's `slices`).

A `LayerStack` is a TensorSource whose decoder blocks are pieces of other sources: block range
[a, b) of one model shown as output blocks [o, o + b − a), the next piece after it, and so on. The
tensors outside the blocks come from the first piece's model when they sit before the blocks
(embeddings) and from the last piece's model otherwise (final norm, LM head), as mergekit takes its
pre-weights from the first slice and its post-weights from the last. Nothing is read or copied
until the engine reads a tensor: a view only maps names.

The layer index of a name is found with a regex (the architecture spec's `layer_pattern`, group 1
the index); which non-block tensors come before the blocks, with `pre_pattern`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MergeError
from .safetensors_io import TensorMeta
from .sources import TensorSource

# tensors before the first block: token and position embeddings (not the LM head, which comes after)
PRE_PATTERN = r"embed|(^|\.)wte\.|(^|\.)wpe\.|word_embeddings|(^|\.)shared\.weight$"


@dataclass(frozen=True)
class Piece:
    """Blocks [start, stop) of `source`, shown from output block `out_start` on."""

    source: TensorSource
    start: int
    stop: int
    out_start: int


def layer_of(name: str, pattern: re.Pattern) -> int | None:
    m = pattern.search(name)
    return int(m.group(1)) if m else None


def renumbered(name: str, pattern: re.Pattern, index: int) -> str:
    m = pattern.search(name)
    return name[:m.start(1)] + str(index) + name[m.end(1):]


def block_count(source: TensorSource, pattern: re.Pattern) -> int:
    """How many blocks `source` has (1 + the highest block index in its names), refusing a model
    with blocks under more than one prefix (a vision tower's layers besides the LLM's): layer
    ranges there would be ambiguous."""
    prefixes: dict[str, str] = {}
    top = -1
    for name in source.names():
        m = pattern.search(name)
        if m:
            prefixes.setdefault(name[:m.start(1)], name)
            top = max(top, int(m.group(1)))
    if len(prefixes) > 1:
        shown = ", ".join(sorted(repr(p) for p in prefixes)[:3])
        raise MergeError(f"model {source.label!r} has blocks in several modules ({shown}); layer slices need a "
                         "model with one stack of layers; slice one module's layers under `modules:`")
    return top + 1


class LayerStack(TensorSource):
    """The pieces' blocks, renumbered, with the first piece's pre-block tensors and the last
    piece's post-block ones. `path` (and so `folder`, the config files) is the first piece's."""

    def __init__(self, pieces: list[Piece], label: str, layer_pattern: str, pre_pattern: str = PRE_PATTERN):
        if not pieces:
            raise MergeError(f"{label}: a layer stack needs at least one slice")
        self.label = label
        self.pieces = pieces
        self.path = pieces[0].source.path
        self._folder = pieces[0].source.folder
        self._layer = re.compile(layer_pattern)
        self._pre = re.compile(pre_pattern)
        self._where: dict[str, tuple[TensorSource, str]] = {}
        first, last = pieces[0].source, pieces[-1].source
        pre = [(first, n) for n in first.names() if layer_of(n, self._layer) is None and self._pre.search(n)]
        post = [(last, n) for n in last.names() if layer_of(n, self._layer) is None and not self._pre.search(n)]
        blocks = []
        for piece in pieces:
            for n in piece.source.names():
                i = layer_of(n, self._layer)
                if i is not None and piece.start <= i < piece.stop:
                    blocks.append((piece.out_start + i - piece.start, n, piece.source))
        blocks.sort(key=lambda x: x[0])  # stable: within a block, the source's own order
        for src, n in pre:
            self._where[n] = (src, n)
        for out, n, src in blocks:
            self._where[renumbered(n, self._layer, out)] = (src, n)
        for src, n in post:
            self._where[n] = (src, n)

    @property
    def folder(self) -> Path | None:
        return self._folder

    def is_pre(self, name: str) -> bool:
        """Whether output tensor `name` sits before the blocks (taken from the first piece's model)."""
        return layer_of(name, self._layer) is None and bool(self._pre.search(name))

    def origin(self, name: str) -> tuple[TensorSource, str]:
        """The source and the name there of output tensor `name`."""
        return self._where[name]

    def names(self):
        return list(self._where)

    def meta(self, name) -> TensorMeta:
        src, n = self._where[name]
        return src.meta(n)

    def read(self, name, start=0, stop=None) -> torch.Tensor:
        src, n = self._where[name]
        return src.read(n, start, stop)
