"""Which tensors of a multimodal LLM are its language model, its towers, its projectors and its head,
found from the model itself rather than from a table of families.

A folder's config.json names a transformers class (`architectures`, else the auto mappings by
`model_type`). That class is built on the meta device (no memory, no weights, no code from the
folder: a config with `auto_map` is never instantiated) and its submodules are read: the language
model is `get_decoder()` (or `language_model` / `text_model`), the head `get_output_embeddings()`,
and every other branch is a tower (vision, audio…), a projector (by its name: projector, merger,
connector…) or something else the model carries (LLaVA-NeXT's `image_newline`, Qwen2.5-Omni's
talker). A checkpoint does not always name tensors by module path: `save_pretrained` writes many
families in their original layout (`language_model.model.layers…` for LLaVA, `model.layers…` for
Qwen2-VL's LLM), so each part's saved prefixes are found by running transformers' own reversal of
its checkpoint conversion on the meta state dict. A tensor belongs to the part whose prefix (saved
or module form) is the longest one it starts with.

Where discovery fails (no config, an unknown or custom-code model type, a class that does not
build), callers fall back to the specs written as data in architectures.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# the kinds a tensor of a multimodal model can belong to; "llm" and "head" are the language model
KINDS = ("llm", "head", "encoder", "projector", "other")

# a branch outside the language model is a projector by its name, a tower by its name or class
_PROJECTOR_NAME = re.compile(r"projector|projection|merger|connector|adapter|resampler|(^|_)proj(_|$)", re.I)
_TOWER_NAME = re.compile(r"vision|visual|audio|speech|image|img|video|tower|encoder|patch", re.I)
_TOWER_CLASS = re.compile(r"Vision|Visual|Audio|Speech|Image|Video|Whisper|Siglip|CLIP|Clip|Encoder")
# inside a tower, a child that maps its output into the LLM (Qwen2-VL's `visual.merger`)
_TOWER_PROJECTOR = re.compile(r"merger|projector|projection|(^|_)proj(_|$)", re.I)
# the auto mappings searched for a model type without a known `architectures` class, in order
_AUTO_MAPPINGS = ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES",
                  "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
                  "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "MODEL_MAPPING_NAMES")


@dataclass(frozen=True)
class Part:
    """One part of a model: a module path and the name prefixes of its tensors in a checkpoint
    (the saved layout first, then the module path; a prefix without a trailing dot is one tensor)."""

    kind: str
    module: str
    prefixes: tuple[str, ...]
    cls: str = ""

    def matches(self, name: str) -> str | None:
        """The longest of this part's prefixes `name` is under, else None."""
        best = None
        for p in self.prefixes:
            if (name.startswith(p) if p.endswith(".") else name == p) and (best is None or len(p) > len(best)):
                best = p
        return best


@dataclass(frozen=True)
class FamilyLayout:
    """The parts of one model family as found in a folder: `source` is "discovered" (read from the
    model built on the meta device) or "spec" (architectures.py)."""

    model_type: str
    architecture: str
    source: str
    parts: tuple[Part, ...]

    @property
    def multimodal(self) -> bool:
        return any(p.kind == "encoder" for p in self.parts)

    def of_kind(self, *kinds: str) -> list[Part]:
        return [p for p in self.parts if p.kind in kinds]

    def locate(self, name: str) -> tuple[Part, str] | None:
        """(the part `name` belongs to, the rest of the name after its prefix), by the longest
        prefix over all parts; None for a name under no part."""
        best: tuple[Part, str] | None = None
        for part in self.parts:
            p = part.matches(name)
            if p is not None and (best is None or len(p) > len(best[1])):
                best = (part, p)
        return None if best is None else (best[0], name[len(best[1]):])

    def llm_prefixes(self) -> tuple[str, ...]:
        """Every prefix of the language model's tensors (saved layout first)."""
        return tuple(p for part in self.of_kind("llm") for p in part.prefixes)

    def head_prefixes(self) -> tuple[str, ...]:
        return tuple(p for part in self.of_kind("head") for p in part.prefixes)

    def describe(self) -> list[str]:
        """Lines for `modalmerge inspect`: each part with its saved prefix and class."""
        label = {"llm": "language model", "head": "head", "encoder": "tower", "projector": "projector",
                 "other": "other"}
        lines = [f"{self.model_type} ({self.architecture}): parts {'found by discovery' if self.source == 'discovered' else 'from the spec in engine/architectures.py'}"]
        for part in self.parts:
            shown = part.prefixes[0].rstrip(".") + (".*" if part.prefixes[0].endswith(".") else "")
            alias = [p.rstrip(".") for p in part.prefixes[1:]]
            lines.append(f"  {label[part.kind]:<15} {shown}" + (f"  (module {', '.join(alias)})" if alias else "")
                         + (f"  [{part.cls}]" if part.cls else ""))
        return lines


def read_config(folder: str | Path | None) -> dict | None:
    if folder is None:
        return None
    path = Path(folder) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def discover(folder: str | Path | None) -> FamilyLayout | None:
    """The parts of the model in `folder`, read from its transformers class built on the meta
    device; None when that cannot be done (see the module docstring)."""
    cfg = read_config(folder)
    if cfg is None or not isinstance(cfg.get("model_type"), str) or cfg.get("auto_map"):
        return None  # custom modelling code is never instantiated: the specs decide
    return _discover_cached(json.dumps(cfg, sort_keys=True))


@contextlib.contextmanager
def quiet():
    """transformers' warnings about a config's token ids or unused keys are not the user's business here."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@lru_cache(maxsize=64)
def _discover_cached(config_text: str) -> FamilyLayout | None:
    try:
        with quiet():
            model = _meta_model(json.loads(config_text))
            if model is None:
                return None
            return _layout(model)
    except Exception:  # noqa: BLE001 - any class that does not build from this config: the specs decide
        return None


def _model_class(cfg: dict):
    import transformers
    from transformers.models.auto import modeling_auto

    for arch in cfg.get("architectures") or []:
        cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        if cls is not None and hasattr(cls, "_from_config"):
            return cls
    for mapping in _AUTO_MAPPINGS:
        name = getattr(modeling_auto, mapping, {}).get(cfg["model_type"])
        if isinstance(name, str) and getattr(transformers, name, None) is not None:
            return getattr(transformers, name)
    return None


def _meta_model(cfg: dict):
    import torch
    from transformers import AutoConfig

    cls = _model_class(cfg)
    if cls is None:
        return None
    fields = {k: v for k, v in cfg.items() if k not in ("model_type", "transformers_version")}
    config = AutoConfig.for_model(cfg["model_type"], **fields)
    with torch.device("meta"):
        return cls(config)


def _decoder_and_head(model):
    """(decoder module, head module or None): the language model of the branch that holds
    one (Qwen2.5-Omni's `thinker`), inside a causal-LM wrapper where there is one (Llama 4)."""

    def decoder_of(m):
        try:
            d = m.get_decoder()
        except Exception:  # noqa: BLE001 - many classes raise NotImplementedError or AttributeError
            d = None
        if d is None or d is m:
            d = getattr(m, "language_model", None) or getattr(m, "text_model", None)
        return d if d is not m else None

    def head_of(m):
        try:
            return m.get_output_embeddings()
        except Exception:  # noqa: BLE001
            return None

    owner = model
    decoder = decoder_of(owner)
    if decoder is None:
        for _, child in model.named_children():
            if decoder_of(child) is not None:
                owner, decoder = child, decoder_of(child)
                break
    if decoder is None:
        return None, None
    head = head_of(owner)
    if head_of(decoder) is not None:
        # a causal LM inside (Llama 4's language_model): its head, and the branch holding its
        # input embeddings as the language model
        head = head or head_of(decoder)
        try:
            embeddings = decoder.get_input_embeddings()
        except Exception:  # noqa: BLE001
            embeddings = None
        inner = next((c for _, c in decoder.named_children() if any(m is embeddings for m in c.modules())), None)
        decoder = inner if inner is not None else decoder
    return decoder, head


def _is_model(module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(module, PreTrainedModel)


def _holds_model(module) -> bool:
    """Whether a strict submodule is a transformers model of its own (a tower)."""
    return any(_is_model(m) for m in module.modules() if m is not module)


def _layout(model) -> FamilyLayout | None:
    decoder, head = _decoder_and_head(model)
    if decoder is None:
        return None
    found: list[tuple[str, str, str]] = []        # (kind, module path, class)

    def add(kind: str, path: str, module):
        found.append((kind, path, type(module).__name__))

    def direct_tensors(module, path):
        for n, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            found.append(("other", f"{path}.{n}" if path else n, ""))

    def side(name: str, path: str, module):
        """A branch outside the language model."""
        if _PROJECTOR_NAME.search(name):
            add("projector", path, module)
        elif _TOWER_NAME.search(name) or _TOWER_CLASS.search(type(module).__name__):
            if any(_is_model(c) for c in module.children()):
                # towers and projectors side by side (Phi-4-multimodal's image_embed)
                walk_branches(module, path)
                return
            add("encoder", path, module)
            for n, c in module.named_children():  # its merger: the projector, at the end of the tower
                if _TOWER_PROJECTOR.search(n):
                    add("projector", f"{path}.{n}", c)
        elif not _is_model(module) and _holds_model(module):
            walk_branches(module, path)
        else:
            add("other", path, module)  # a model of its own that is no tower (Qwen2.5-Omni's talker)

    def walk_branches(module, path):
        direct_tensors(module, path)
        for n, child in module.named_children():
            side(n, f"{path}.{n}" if path else n, child)

    def walk(module, path):
        direct_tensors(module, path)
        for n, child in module.named_children():
            cpath = f"{path}.{n}" if path else n
            if child is decoder:
                add("llm", cpath, child)
                # towers inside the language model (Phi-4-multimodal's embed_tokens_extend)
                for n2, c2 in child.named_children():
                    if _holds_model(c2) or _is_model(c2):
                        side(n2, f"{cpath}.{n2}", c2)
            elif head is not None and child is head:
                add("head", cpath, child)
            elif any(m is decoder or m is head for m in child.modules()):
                walk(child, cpath)
            else:
                side(n, cpath, child)

    walk(model, "")
    # only parts that hold tensors of a checkpoint (not a dropout or a pooling layer)
    state = list(model.state_dict())
    found = [(k, p, c) for k, p, c in found if any(n == p or n.startswith(p + ".") for n in state)]
    saved = _saved_prefixes(model, [p for _, p, _ in found])
    parts = tuple(Part(kind, path, tuple(dict.fromkeys(saved.get(path, []) + [_as_prefix(model, path)])), cls)
                  for kind, path, cls in found)
    return FamilyLayout(model.config.model_type, type(model).__name__, "discovered", parts)


def _as_prefix(model, path: str) -> str:
    """A module path as a name prefix ("x." for a module, "x" for one tensor)."""
    try:
        model.get_submodule(path)
        return path + "."
    except AttributeError:
        return path


def _saved_prefixes(model, paths: list[str]) -> dict[str, list[str]]:
    """For each module path, the prefixes its tensors get in a checkpoint written by save_pretrained
    (transformers reverts its load-time renaming when it saves)."""
    from transformers.core_model_loading import revert_weight_conversion

    state = dict(model.state_dict())
    origin = {id(t): n for n, t in state.items()}
    try:
        reverted = revert_weight_conversion(model, dict(state))
    except Exception:  # noqa: BLE001 - a conversion that cannot run on meta tensors: module names only
        return {}
    # the part of each tensor: the longest module path it is under
    ordered = sorted(paths, key=len, reverse=True)
    out: dict[str, list[str]] = {}
    for saved_name, tensor in reverted.items():
        name = origin.get(id(tensor))
        if name is None:
            continue
        path = next((p for p in ordered if name == p or name.startswith(p + ".")), None)
        if path is None:
            continue
        rest = name[len(path):]  # "" for a part that is one tensor, else ".x…"
        if rest and saved_name.endswith(rest):
            prefix = saved_name[:len(saved_name) - len(rest)] + "."
        elif not rest:
            prefix = saved_name
        else:
            continue
        if prefix not in out.setdefault(path, []):
            out[path].append(prefix)
    return out
