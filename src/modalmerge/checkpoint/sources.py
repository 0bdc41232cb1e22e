"""Where input tensors come from: a Hugging Face folder (single file or sharded), one
safetensors file, a PEFT/LoRA adapter densified on top of its base, an in-memory state dict,
or (only when the user allows it) a pickled PyTorch checkpoint.

Every source answers the same three questions: which tensor names it has, each one's shape and
dtype, and the values of a tensor or of a flat range of its elements.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch

from ..errors import MergeError
from .safetensors_io import SafetensorsFile, TensorMeta


class TensorSource:
    """A read-only, lazily read set of named tensors."""

    label: str = "?"
    path: Path | None = None

    def names(self) -> list[str]:
        raise NotImplementedError

    def meta(self, name: str) -> TensorMeta:
        raise NotImplementedError

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The whole tensor, or its flat elements [start, stop) as a 1-D tensor."""
        raise NotImplementedError

    def __contains__(self, name: str) -> bool:
        cached = self.__dict__.get("_name_set")
        if cached is None:
            cached = self.__dict__["_name_set"] = set(self.names())
        return name in cached

    @property
    def folder(self) -> Path | None:
        """The folder holding config/tokenizer files, when there is one."""
        if self.path is None:
            return None
        return self.path if self.path.is_dir() else self.path.parent


class StateDictSource(TensorSource):
    def __init__(self, tensors: dict[str, torch.Tensor], label: str = "state_dict"):
        self._tensors = {k: v.detach() for k, v in tensors.items()}
        self.label = label

    def names(self):
        return list(self._tensors)

    def meta(self, name):
        t = self._tensors[name]
        return TensorMeta(tuple(t.shape), t.dtype)

    def read(self, name, start=0, stop=None):
        t = self._tensors[name]
        if start == 0 and stop is None:
            return t
        return t.reshape(-1)[start:stop]


class SafetensorsSource(TensorSource):
    """One or more safetensors files (a sharded folder is several), read lazily."""

    def __init__(self, files: list[Path], label: str, path: Path):
        self.label, self.path = label, path
        self._where: dict[str, SafetensorsFile] = {}
        for f in files:
            sf = SafetensorsFile(f)
            for n in sf.names():
                if n in self._where:
                    raise MergeError(f"{label}: tensor {n!r} appears in both {self._where[n].path.name} and "
                                     f"{f.name}; remove the duplicate shard")
                self._where[n] = sf

    def names(self):
        return list(self._where)

    def meta(self, name):
        return self._where[name].meta(name)

    def read(self, name, start=0, stop=None):
        return self._where[name].read(name, start, stop)


class PickleSource(StateDictSource):
    """A pickled `.bin` checkpoint, loaded with `weights_only=True` (arbitrary code cannot run)."""

    def __init__(self, files: list[Path], label: str, path: Path):
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            try:
                loaded = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises many types for a bad pickle
                raise MergeError(f"{f}: cannot load pickled checkpoint ({type(e).__name__}); "
                                 "convert it to safetensors") from None
            if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
                loaded = loaded["state_dict"]
            if not isinstance(loaded, dict):
                raise MergeError(f"{f}: not a state dict; convert it to safetensors")
            tensors.update({k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)})
        super().__init__(tensors, label)
        self.path = path


class PeftSource(TensorSource):
    """A PEFT LoRA adapter folder seen as a full model: base tensors plus B·A·scale, per tensor.

    Nothing is densified until a tensor is read; only the tensor asked for is materialised.
    """

    def __init__(self, adapter_dir: Path, base: TensorSource, label: str):
        self.label, self.path, self.base = label, adapter_dir, base
        cfg_path = adapter_dir / "adapter_config.json"
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as e:
            raise MergeError(f"{cfg_path}: cannot read adapter config ({e}); re-save the adapter") from None
        if cfg.get("peft_type", "LORA") != "LORA":
            raise MergeError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported, only LORA; "
                             "merge the adapter into its base with peft first")
        if cfg.get("use_dora"):
            raise MergeError(f"{cfg_path}: DoRA adapters are not supported; merge it into its base with "
                             "peft (merge_and_unload) first")
        self._cfg = cfg
        files = sorted(adapter_dir.glob("adapter_model*.safetensors"))
        if files:
            weights = SafetensorsSource(files, label, adapter_dir)
        elif (adapter_dir / "adapter_model.bin").exists():
            raise MergeError(f"{adapter_dir}: adapter weights are pickled (adapter_model.bin); "
                             "pass --allow-pickle or re-save them as safetensors")
        else:
            raise MergeError(f"{adapter_dir}: no adapter_model.safetensors; is this a PEFT adapter folder?")
        self._weights = weights
        base_names = set(base.names())
        self._lora: dict[str, tuple[str, str, str, bool]] = {}  # target -> (A key, B key, module, embedding)
        self._replace: dict[str, str] = {}                         # target -> adapter key
        self._bias: dict[str, str] = {}
        for key in weights.names():
            short = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
            if "lora_magnitude_vector" in short:
                raise MergeError(f"{adapter_dir}: DoRA adapters are not supported; merge it first")
            m = re.match(r"(.+)\.lora_A(?:\.[^.]+)?\.weight$", short)
            if m:
                module = m.group(1)
                b_key = key.replace(".lora_A", ".lora_B")
                self._lora[f"{module}.weight"] = (key, b_key, module, False)
                continue
            m = re.match(r"(.+)\.lora_embedding_A(?:\.[^.]+)?$", short)
            if m:
                module = m.group(1)
                self._lora[f"{module}.weight"] = (key, key.replace("lora_embedding_A", "lora_embedding_B"),
                                                   module, True)
                continue
            if ".lora_B" in short or ".lora_embedding_B" in short:
                if short.endswith(".bias"):
                    self._bias[re.sub(r"\.lora_B(?:\.[^.]+)?\.bias$", ".bias", short)] = key
                continue
            target = short.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
            self._replace[target] = key
        for target in list(self._lora) + list(self._replace) + list(self._bias):
            if target not in base_names:
                raise MergeError(f"{label}: adapter tensor for {target!r} has no tensor of that name in the base "
                                 f"model {base.label}; is this adapter for another base?")

    def _scale(self, module: str, rank: int) -> float:
        def pattern(table: dict, default):
            for pat, value in (table or {}).items():
                if re.fullmatch(rf"(.*\.)?{pat}", module):
                    return value
            return default
        r = pattern(self._cfg.get("rank_pattern"), self._cfg.get("r", rank)) or rank
        alpha = pattern(self._cfg.get("alpha_pattern"), self._cfg.get("lora_alpha", r))
        return alpha / math.sqrt(r) if self._cfg.get("use_rslora") else alpha / r

    def names(self):
        return self.base.names()

    def meta(self, name):
        return self.base.meta(name)

    def _delta(self, name: str) -> torch.Tensor | None:
        if name in self._bias:
            return self._weights.read(self._bias[name]).float()
        if name not in self._lora:
            return None
        a_key, b_key, module, embedding = self._lora[name]
        a = self._weights.read(a_key).float()
        b = self._weights.read(b_key).float()
        delta = (b @ a) * self._scale(module, a.shape[0] if not embedding else a.shape[0])
        if embedding or self._cfg.get("fan_in_fan_out"):
            delta = delta.T
        return delta

    def read(self, name, start=0, stop=None):
        if name in self._replace:
            return self._weights.read(self._replace[name], start, stop)
        value = self.base.read(name, start, stop)
        delta = self._delta(name)
        if delta is None:
            return value
        if delta.shape != tuple(self.meta(name).shape):
            raise MergeError(f"{self.label}: LoRA delta for {name!r} has shape {list(delta.shape)}, the base "
                             f"tensor {list(self.meta(name).shape)}; is this adapter for another base?")
        if not (start == 0 and stop is None):
            delta = delta.reshape(-1)[start:stop]
        return (value.float() + delta).to(value.dtype)


def _is_adapter(path: Path) -> bool:
    return path.is_dir() and (path / "adapter_config.json").exists()


def adapter_base_path(path: Path) -> str | None:
    """The base model an adapter folder names in its config, if any."""
    try:
        return json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None


def open_source(path: str | os.PathLike, *, label: str | None = None, allow_pickle: bool = False,
                base: TensorSource | None = None) -> TensorSource:
    """Open a model folder or file; an adapter folder needs the `base` it was trained on."""
    p = Path(path)
    label = label or p.name
    if not p.exists():
        raise MergeError(f"model {label!r}: {p} does not exist; check the path in the recipe")
    if _is_adapter(p):
        if base is None:
            raise MergeError(f"model {label!r}: {p} is a LoRA adapter; give the recipe a `base` (the model it was "
                             "trained on) so it can be densified")
        return PeftSource(p, base, label)
    if p.is_file():
        if p.suffix == ".safetensors":
            return SafetensorsSource([p], label, p)
        if p.suffix in (".bin", ".pt", ".pth"):
            return _pickled([p], label, p, allow_pickle)
        raise MergeError(f"model {label!r}: {p} is neither a safetensors file nor a model folder")
    index = p / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            raise MergeError(f"{index}: corrupt index (no weight_map); re-save the model") from None
        files = []
        for shard in dict.fromkeys(weight_map.values()):
            f = p / shard
            if not f.exists():
                raise MergeError(f"{index}: shard {shard} is missing; re-download the model")
            files.append(f)
        source = SafetensorsSource(files, label, p)
        missing = [n for n in weight_map if n not in source._where]
        if missing:
            raise MergeError(f"{index}: tensor {missing[0]!r} is listed but not in its shard; re-download the model")
        return source
    single = p / "model.safetensors"
    if single.exists():
        return SafetensorsSource([single], label, p)
    candidates = sorted(p.glob("*.safetensors"))
    if len(candidates) == 1:
        return SafetensorsSource(candidates, label, p)
    bins = sorted(p.glob("pytorch_model*.bin"))
    if bins:
        return _pickled(bins, label, p, allow_pickle)
    raise MergeError(f"model {label!r}: no model.safetensors (or index) in {p}; is this a model folder?")


def _pickled(files: list[Path], label: str, path: Path, allow_pickle: bool) -> TensorSource:
    if not allow_pickle:
        raise MergeError(f"model {label!r}: {files[0]} is a pickled checkpoint, which can run code when loaded; "
                         "pass --allow-pickle to load it with weights_only, or convert it to safetensors")
    return PickleSource(files, label, path)
