"""Each modality of a composed (MMER) folder as modules: its towers, projectors and processor.

`modalities/<task>/` of a composed folder holds the source MLLM's non-LLM tensors under their own
names, with its config and processor files (procedures/mmer.py copies them there). To run them,
the source family's transformers class is built from that config on the meta device, its
language model and head are replaced by a stand-in (they are the composed LLM's), and only what
is left (towers, projectors, whatever else the family holds) is filled from the modality's
tensors; the saved names are mapped to module paths by the parts found from the config
(engine/family_parts.py). No code from the folder runs unless `trust_remote_code` is given, and
only transformers' own classes are built.

The features come from the family's own forward: given the processor's output for one image or
clip, it embeds the prompt, runs its towers and projectors and scatters the features at its
placeholder tokens exactly as the source model does, then hands `inputs_embeds` to its language
model, where the stand-in takes them. So every family whose forward has that shape works without
code of its own here. Families whose language model takes 3-D (mrope) positions (Qwen2-VL,
Qwen2.5-VL, Qwen3-VL, GLM-4V, Qwen2.5-Omni: an `mrope_section` or a `get_rope_index`) are
refused, their positions not being the composed LLM's; so is a family whose towers sit inside
its language model (Phi-4-multimodal): their tensors have no place once it is set aside.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..checkpoint.sources import open_source
from ..engine.family_parts import discover, quiet, read_config
from ..errors import MergeError, one_line

if TYPE_CHECKING:
    from .composed import ComposedModel

# media kind → (processor attribute that handles it, processor keyword, placeholder attribute,
# config keys of the placeholder token id)
MEDIA: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "image": ("image_processor", "images", "image_token", ("image_token_id", "image_token_index")),
    "audio": ("feature_extractor", "audio", "audio_token", ("audio_token_id", "audio_token_index")),
}
# config keys of sub-configs that say which media a family takes, when its processor is missing
_MEDIA_CONFIG = {"image": ("vision_config",), "audio": ("audio_config",)}
PROCESSOR_FILES = "processor_config.json, preprocessor_config.json and the tokenizer files"


class _Captured(Exception):
    """Raised by the stand-in language model: the family's forward has built its inputs."""

    def __init__(self, kwargs: dict[str, Any]):
        super().__init__("captured")
        self.kwargs = kwargs


class LanguageModelStandIn(nn.Module):
    """Stands where the family's language model was: embeds with the composed LLM's input
    embeddings (held, not registered: they are the composed model's) and, when the family calls
    it, raises with the inputs it was given."""

    def __init__(self, embeddings: nn.Module):
        super().__init__()
        self.__dict__["embeddings"] = embeddings

    def get_input_embeddings(self) -> nn.Module:
        return self.__dict__["embeddings"]

    @property
    def embed_tokens(self) -> nn.Module:
        return self.__dict__["embeddings"]

    def forward(self, *args, **kwargs):
        raise _Captured(kwargs)  # every family here passes inputs_embeds by name


@dataclass
class Modality:
    """One modality task of a composed model: its family module (towers and projectors, the
    language model a stand-in), its processor, and per media kind the placeholder token and id."""

    task: str
    index: int
    folder: Path
    config: Any
    processor: Any
    model: nn.Module | None = None
    placeholders: dict[str, tuple[str, int]] = field(default_factory=dict)

    def encode(self, kind: str, item: Any, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input ids [n], features [k, d], positions [n] bool) for one image or clip: the ids
        the processor writes for one placeholder (expanded to the number of feature rows), and
        the rows the family's towers and projectors put at its placeholder positions."""
        _, keyword, _, _ = MEDIA[kind]
        token, token_id = self.placeholders[kind]
        extra = {"sampling_rate": self.processor.feature_extractor.sampling_rate} if kind == "audio" else {}
        try:
            batch = self.processor(text=[token], **{keyword: [item]}, return_tensors="pt",
                                   add_special_tokens=False, **extra)
        except Exception as e:  # noqa: BLE001 - the processor's own message, on one line
            raise MergeError(f"modality {self.task!r}: its processor could not read the {kind} given "
                             f"({type(e).__name__}: {one_line(e, 120)})") from e
        ids = batch["input_ids"][0]
        inputs = {k: (v.to(dtype) if torch.is_floating_point(v) else v) if isinstance(v, torch.Tensor) else v
                  for k, v in batch.items() if k in _forward_names(self.model)}
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        try:
            with torch.no_grad():
                self.model(**inputs)
        except _Captured as c:
            embeds = c.kwargs.get("inputs_embeds")
        except Exception as e:  # noqa: BLE001 - the family's own complaint (features and tokens that differ)
            raise MergeError(f"modality {self.task!r}: {type(self.model).__name__} could not encode the {kind} "
                             f"({type(e).__name__}: {one_line(e, 120)})") from e
        else:
            embeds = None
        positions = ids == token_id
        if embeds is None or embeds.dim() != 3 or embeds.shape[1] != ids.numel():
            raise MergeError(f"modality {self.task!r}: the {type(self.model).__name__} forward did not give one "
                             f"embedding per prompt token for its {kind}; this family is not supported by generate")
        if not bool(positions.any()):
            raise MergeError(f"modality {self.task!r}: its processor wrote no {token!r} token (id {token_id}) for "
                             f"the {kind}; check {PROCESSOR_FILES} in {self.folder}")
        return ids, embeds[0][positions], positions


def _forward_names(model: nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def media_of(config: Any, processor: Any) -> list[str]:
    """The media kinds a modality takes: by its processor, else by its config's sub-configs."""
    if processor is not None:
        return [k for k, (attr, *_rest) in MEDIA.items() if getattr(processor, attr, None) is not None]
    return [k for k, keys in _MEDIA_CONFIG.items() if any(getattr(config, key, None) is not None for key in keys)]


def load_processor(folder: Path, task: str, trust_remote_code: bool) -> Any | None:
    """The modality's processor from its folder; None where the folder has none."""
    from transformers import AutoProcessor

    if not any((folder / f).is_file() for f in ("processor_config.json", "preprocessor_config.json")):
        return None
    try:
        with quiet():
            return AutoProcessor.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - a broken or partial processor: one line
        raise MergeError(f"modality {task!r}: its processor in {folder} does not load "
                         f"({type(e).__name__}: {one_line(e, 120)}); copy the source "
                         f"model's {PROCESSOR_FILES} there") from e


def load_config(folder: Path, task: str, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        with quiet():
            return AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise MergeError(f"modality {task!r}: {folder / 'config.json'} does not load as a transformers config "
                         f"({type(e).__name__}: {one_line(e, 120)})") from e


def placeholders(task: str, folder: Path, config: Any, processor: Any, kinds: list[str]) -> dict[str, tuple[str, int]]:
    """Per media kind, the processor's placeholder token and the id the model looks for."""
    out = {}
    for kind in kinds:
        _, _, token_attr, id_keys = MEDIA[kind]
        token = getattr(processor, token_attr, None)
        token_id = next((getattr(config, k) for k in id_keys if isinstance(getattr(config, k, None), int)), None)
        if token_id is None and token is not None and getattr(processor, "tokenizer", None) is not None:
            token_id = processor.tokenizer.convert_tokens_to_ids(token)
        if not isinstance(token, str) or token_id is None:
            raise MergeError(f"modality {task!r}: its processor in {folder} names no {kind} placeholder token "
                             f"({token_attr}); generate needs a processor that expands one")
        out[kind] = (token, int(token_id))
    return out


def _mrope(config: Any) -> bool:
    """Whether the family's language model takes 3-D rope positions (an `mrope_section`)."""
    thinker = getattr(config, "thinker_config", None)
    holders = [config, getattr(config, "text_config", None), thinker, getattr(thinker, "text_config", None)]
    return any(isinstance(getattr(h, key, None), dict) and "mrope_section" in getattr(h, key)
               for h in holders if h is not None for key in ("rope_parameters", "rope_scaling"))


def build_family_model(task: str, folder: Path, config: Any, embeddings: nn.Module, device: torch.device,
                       dtype: torch.dtype) -> nn.Module:
    """The family's model with its language model a stand-in and every other part filled from the
    modality's tensors (see the module docstring)."""
    import transformers

    if _mrope(config):
        raise MergeError(f"modality {task!r}: {config.model_type} positions its tokens in 3-D (mrope), which the "
                         "composed LLM does not; generate does not support this family: build inputs_embeds and "
                         "position ids yourself and run composed.llm under composed.route(group_ids)")
    cls = next((getattr(transformers, a) for a in (getattr(config, "architectures", None) or [])
                if isinstance(a, str) and hasattr(getattr(transformers, a, None), "_from_config")), None)
    layout = discover(folder)
    if cls is None or layout is None:
        raise MergeError(f"modality {task!r}: {folder / 'config.json'} names no transformers class whose parts "
                         "can be found (architectures); generate runs transformers' own multimodal classes only")
    with quiet(), torch.device("meta"):
        model = cls(config)
    if any(hasattr(m, "get_rope_index") for m in model.modules()):
        raise MergeError(f"modality {task!r}: {config.model_type} positions its tokens in 3-D (get_rope_index), "
                         "which the composed LLM does not; generate does not support this family: build "
                         "inputs_embeds and position ids yourself and run composed.llm under composed.route(group_ids)")
    for part in layout.of_kind("llm", "head"):
        parent, _, name = part.module.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, name, LanguageModelStandIn(embeddings) if part.kind == "llm" else nn.Identity())
    tensors, unplaced = _modality_tensors(task, folder, layout, model)
    if unplaced:
        raise MergeError(f"modality {task!r}: its tensor {unplaced[0]!r} has no place in {cls.__name__} once the "
                         "language model is set aside (a tower inside the language model?); generate does not "
                         "support this family")
    missing = [n for n, p in list(model.named_parameters()) + list(_persistent_buffers(model)) if n not in tensors]
    if missing:
        raise MergeError(f"modality {task!r}: {folder} lacks {len(missing)} tensor(s) of its towers and projectors, "
                         f"first {missing[0]!r}; the composed folder is incomplete, re-run the merge")
    model.load_state_dict(tensors, strict=False, assign=True)
    # buffers no checkpoint holds (position ids, rotary frequencies): allocated, then set by the
    # family's own initialisation, which leaves loaded tensors alone
    for mod in model.modules():
        for name, buf in list(mod._buffers.items()):
            if buf is not None and buf.is_meta:
                mod._buffers[name] = torch.empty_like(buf, device="cpu")
    for t in tensors.values():
        t._is_hf_initialized = True
    if hasattr(model, "initialize_weights"):
        with quiet():
            model.initialize_weights()
    model.load_state_dict(_modality_tensors(task, folder, layout, model)[0], strict=False)  # exact values back
    still = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still:
        raise MergeError(f"modality {task!r}: {type(model).__name__}'s {still[0]!r} could not be initialised")
    return model.to(device=device, dtype=dtype).eval()


def _persistent_buffers(model: nn.Module):
    for mod_name, mod in model.named_modules():
        for name, buf in mod._buffers.items():
            if buf is not None and name not in mod._non_persistent_buffers_set:
                yield (f"{mod_name}.{name}" if mod_name else name), buf


def _modality_tensors(task: str, folder: Path, layout, model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the modality's tensors under the module's state-dict names (saved prefix → module path),
    the names of those the module has no place for)."""
    src = open_source(folder, label=f"modality {task}")
    wanted = set(model.state_dict())
    out, unplaced = {}, []
    for name in src.names():
        found = layout.locate(name)
        target = name
        if found is not None and found[0].kind not in ("llm", "head"):
            part, rest = found
            target = f"{part.module}.{rest}" if rest else part.module
        if target in wanted:
            out[target] = src.read(name)
        else:
            unplaced.append(name)
    return out, unplaced


def load_modality(task: str, index: int, folder: Path, embeddings: nn.Module, device: torch.device,
                  dtype: torch.dtype, trust_remote_code: bool, with_model: bool = True) -> Modality:
    """A modality's config and processor, and (with_model) its family module."""
    from ..procedures.calibration import check_remote_code

    check_remote_code(folder, f"modality {task!r}", trust_remote_code)
    config = load_config(folder, task, trust_remote_code)
    processor = load_processor(folder, task, trust_remote_code)
    m = Modality(task, index, folder, config, processor)
    if processor is not None:
        m.placeholders = placeholders(task, folder, config, processor, media_of(config, processor))
    if with_model:
        m.model = build_family_model(task, folder, config, embeddings, device, dtype)
    return m


def default_model_class(folder: Path):
    """transformers.AutoModelForCausalLM, so that the composed LLM has logits; AutoModel where
    the base's model type has no causal-LM class (an encoder)."""
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = read_config(folder) or {}
    return AutoModelForCausalLM if config.get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else AutoModel


def modality_of(composed: "ComposedModel", task: str, with_model: bool = True) -> Modality:
    """The composed model's modality `task`, loaded once and kept on the composed model."""
    loaded = composed.loaded_modalities
    found = loaded.get(task)
    if found is not None and (found.model is not None or not with_model):
        return found
    index = composed.task_index(task)
    folder = composed.modality_folder(task)
    if folder is None:
        raise MergeError(f"task {task!r} of {composed.folder.path} has no modality (an LLM-only fine-tune): it "
                         "takes text only")
    llm = composed.llm
    loaded[task] = load_modality(task, index, folder, llm.get_input_embeddings(), composed.device,
                                 next(llm.parameters()).dtype, composed.trust_remote_code, with_model)
    return loaded[task]
