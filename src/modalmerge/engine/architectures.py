"""Architecture knowledge as data: which tensors are neurons along which axis, which block a
tensor belongs to, and which part of a multimodal model (LLM, encoder, projector) it is.

A spec is a list of (name pattern, property) rules matched in order; the generic fallback
decides by shape and common names. Methods read the result (TensorInfo), never names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..methods.base import TensorInfo


@dataclass(frozen=True)
class ArchSpec:
    name: str
    model_types: tuple[str, ...] = ()
    # tensors used as x @ W: their neurons are columns
    column_neurons: tuple[str, ...] = ()
    # multimodal parts, by name pattern (regex, matched at the start of the name)
    parts: tuple[tuple[str, str], ...] = ()
    layer_pattern: str = r"(?:^|\.)(?:layers|layer|h|blocks|block|resblocks)\.(\d+)\."
    embeddings: tuple[str, ...] = (r"embed", r"wte\.", r"wpe\.", r"lm_head\.", r"word_embeddings", r"shared\.weight")
    # multimodal layouts: the name segment that marks the LLM's tensors; without it they are the
    # plain LLM's names (`language_model.model.layers.0.x` / `model.language_model.layers.0.x`
    # -> `model.layers.0.x`)
    llm_marker: str = ""
    # alignment (procedures/align.py, Git Re-Basin weight matching): the family of permutation rules
    # its tensors follow (a key of align.PERMUTATION_RULES; "" for none), and the model types of
    # this spec whose checkpoints those rules do not cover
    permutation: str = ""
    not_permutable: tuple[str, ...] = ()


GENERIC = ArchSpec("generic")

SPECS: tuple[ArchSpec, ...] = (
    # phi3 fuses qkv_proj and gate_up_proj, which the llama permutation rules do not split
    ArchSpec("llama", ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"),
             permutation="llama", not_permutable=("phi3",)),
    # distilbert and mpnet name their tensors otherwise than the bert permutation rules expect
    ArchSpec("bert", ("bert", "roberta", "distilbert", "xlm-roberta", "electra", "mpnet"),
             permutation="bert", not_permutable=("distilbert", "mpnet")),
    ArchSpec("gpt2", ("gpt2",), column_neurons=(r".*\.(c_attn|c_proj|c_fc)\.weight$",)),
    ArchSpec("clip", ("clip", "open_clip"), column_neurons=(r"^visual\.proj$", r"^text_projection$")),
    ArchSpec("t5", ("t5", "mt5")),
    # multimodal parts by name: the fallback where engine/family_parts.py cannot build the model
    # from its config (custom code, a config transformers refuses); MMER and `inspect` try that first
    ArchSpec("llava", ("llava", "llava_next", "llava_onevision"), parts=(
        (r"(model\.)?vision_tower\.", "encoder"),
        (r"(model\.)?multi_modal_projector\.", "projector"),
        (r"(model\.)?language_model\.|lm_head\.", "llm"),
    ), llm_marker="language_model."),
    ArchSpec("qwen2_vl", ("qwen2_vl", "qwen2_5_vl"), parts=(
        (r"(model\.)?visual\.merger\.", "projector"),
        (r"(model\.)?visual\.", "encoder"),
        (r"(model\.)?language_model\.|model\.|lm_head\.", "llm"),
    ), llm_marker="language_model."),
    ArchSpec("qwen2_audio", ("qwen2_audio",), parts=(
        (r"(model\.)?audio_tower\.", "encoder"),
        (r"(model\.)?multi_modal_projector\.", "projector"),
        (r"(model\.)?language_model\.|lm_head\.", "llm"),
    ), llm_marker="language_model."),
)


def spec_for(model_type: str | None) -> ArchSpec:
    for spec in SPECS:
        if model_type in spec.model_types:
            return spec
    return GENERIC


def permutation_rules(model_type: str | None) -> str:
    """The family of alignment permutation rules for a config.json model_type ("" for none)."""
    spec = spec_for(model_type)
    return "" if model_type in spec.not_permutable else spec.permutation


def permutable_model_types() -> tuple[str, ...]:
    """The model types alignment can permute, in the order of SPECS."""
    return tuple(t for spec in SPECS if spec.permutation for t in spec.model_types if t not in spec.not_permutable)


@dataclass
class Describer:
    spec: ArchSpec = GENERIC
    parts: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # recipe's own, first

    def describe(self, name: str, shape: tuple[int, ...]) -> TensorInfo:
        m = re.search(self.spec.layer_pattern, name)
        layer = int(m.group(1)) if m else None
        part = "all"
        for pattern, value in self.parts + self.spec.parts:
            if re.match(pattern, name):
                part = value
                break
        if len(shape) <= 1:
            return TensorInfo(name, shape, "point", None, layer, part)
        if any(re.fullmatch(p, name) for p in self.spec.column_neurons):
            return TensorInfo(name, shape, "linear", 1, layer, part)
        if len(shape) > 2:
            return TensorInfo(name, shape, "conv", 0, layer, part)
        if any(re.search(p, name) for p in self.spec.embeddings):
            return TensorInfo(name, shape, "embedding", 0, layer, part)
        return TensorInfo(name, shape, "linear", 0, layer, part)


@dataclass(frozen=True)
class ModuleLayout:
    """One module of a multi-module model, as mergekit's `modules:` recipes name it (mergekit 0.1.5's
    `_data/architectures/*.json`, prefixes included): the tensor-name prefixes it owns (a tensor
    belongs to the module with the longest prefix it starts with), the regex of its layer index
    (group 1; "" when it has no layers), the non-layer tensors that follow its layers (taken from a
    module's last slice, as mergekit's post-weights; the others precede them, from the first) and
    the config.json key (dotted into a sub-config) of its layer count ("" when none)."""

    name: str
    prefixes: tuple[str, ...]
    layer_pattern: str = ""
    post: str = ""
    layer_count_key: str = ""


_QWEN3_VL_MODULES = (
    ModuleLayout("text_decoder", ("model.language_model.", "lm_head."), r"^model\.language_model\.layers\.(\d+)\.",
                 r"^model\.language_model\.norm\.|^lm_head\.", "text_config.num_hidden_layers"),
    ModuleLayout("multi_modal_projector", ("model.visual.merger.", "model.visual.deepstack_merger_list."),
                 r"^model\.visual\.deepstack_merger_list\.(\d+)\."),
    ModuleLayout("vision_tower", ("model.visual.",), r"^model\.visual\.blocks\.(\d+)\.", "",
                 "vision_config.depth"),
)
# model_type -> its modules: mergekit's definitions whose tensor names transformers 5 writes unchanged
# (checked on tiny models against mergekit; qwen2_vl's, qwen3_vl_moe's and gemma3's are left out until they are)
MODULE_LAYOUTS: dict[str, tuple[ModuleLayout, ...]] = {
    "qwen3_vl": _QWEN3_VL_MODULES,
    "mistral3": (
        ModuleLayout("text_decoder", ("language_model.",), r"^language_model\.model\.layers\.(\d+)\.",
                     r"^language_model\.model\.norm\.|^language_model\.lm_head\.", "text_config.num_hidden_layers"),
        ModuleLayout("multi_modal_projector", ("multi_modal_projector.",)),
        ModuleLayout("vision_tower", ("vision_tower.",), r"^vision_tower\.transformer\.layers\.(\d+)\.", "",
                     "vision_config.num_hidden_layers"),
    ),
}
