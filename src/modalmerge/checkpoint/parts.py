"""One part of a model under other names: the LLM of a multimodal model seen as a plain LLM.

A multimodal checkpoint names its LLM tensors with a prefix (`language_model.model.layers.0…`
in LLaVA-1.5's layout, `model.language_model.layers.0…` in transformers 5's) while the base LLM
has the plain names (`model.layers.0…`). PartView exposes a chosen set of a source's tensors
under canonical names, so the LLM merge is an ordinary merge of same-named tensors.
"""

from __future__ import annotations

import re

from .sources import TensorSource


class PartView(TensorSource):
    """`names` maps canonical name → the source's own name; only those tensors are visible."""

    def __init__(self, source: TensorSource, names: dict[str, str], label: str | None = None):
        self.source = source
        self.original = dict(names)
        self.label = label or source.label
        self.path = source.path

    def names(self):
        return list(self.original)

    def meta(self, name):
        return self.source.meta(self.original[name])

    def read(self, name, start=0, stop=None):
        return self.source.read(self.original[name], start, stop)


def strip_marker(name: str, marker: str) -> str:
    """The name without its first `marker` segment run (`model.language_model.x` → `model.x`,
    `language_model.lm_head.weight` → `lm_head.weight`); unchanged when it has none."""
    if not marker:
        return name
    m = re.search(rf"(?:^|(?<=\.)){re.escape(marker)}", name)
    if m is None:
        return name
    return name[:m.start()] + name[m.end():]
