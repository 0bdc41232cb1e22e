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


# LoRA variants and PEFT features whose merged weight is not base + B·A·scale (or that change
# the model's structure): peft itself must merge these.
_UNSUPPORTED_PEFT = {
    "use_dora": "DoRA", "velora_config": "VeLoRA", "alora_invocation_tokens": "aLoRA",
    "monteclora_config": "MonteCLoRA", "use_bdlora": "BD-LoRA", "arrow_config": "Arrow",
    "kasa_config": "KaSA", "use_qalora": "QALoRA", "layer_replication": "layer_replication",
    "target_parameters": "target_parameters", "trainable_token_indices": "trainable_token_indices",
}


class PeftSource(TensorSource):
    """A PEFT LoRA adapter folder seen as a full model: base tensors plus B·A·scale, per tensor.

    Nothing is densified until a tensor is read, and a read of a row range computes only those
    rows of B·A, so chunked reads of a large adapted tensor stay O(chunk).
    """

    def __init__(self, adapter_dir: Path, base: TensorSource, label: str):
        self.label, self.path, self.base = label, adapter_dir, base
        cfg_path = adapter_dir / "adapter_config.json"
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as e:
            raise MergeError(f"{cfg_path}: cannot read adapter config ({e}); re-save the adapter") from None
        if not isinstance(cfg, dict):
            raise MergeError(f"{cfg_path}: not a PEFT adapter config (not a JSON object); re-save the adapter")
        if cfg.get("peft_type", "LORA") != "LORA":
            raise MergeError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported, only LORA; "
                             "merge the adapter into its base with peft (merge_and_unload) and use that folder")
        used = [name for key, name in _UNSUPPORTED_PEFT.items() if cfg.get(key)]
        if cfg.get("init_lora_weights") == "mica":
            used.append("MiCA")
        if used:
            raise MergeError(f"{cfg_path}: {used[0]} adapters are not supported; merge the adapter into its base "
                             "with peft (merge_and_unload) and use that folder")
        self._cfg = cfg
        files = sorted(adapter_dir.glob("adapter_model*.safetensors"))
        if not files:
            if (adapter_dir / "adapter_model.bin").exists():
                raise MergeError(f"{adapter_dir}: adapter weights are pickled (adapter_model.bin); re-save them "
                                 "as safetensors (peft save_pretrained(safe_serialization=True))")
            raise MergeError(f"{adapter_dir}: no adapter_model.safetensors; is this a PEFT adapter folder?")
        self._weights = weights = SafetensorsSource(files, label, adapter_dir)
        base_names = set(base.names())
        # target tensor -> (A key, B key, module, kind); kind: linear | embedding | conv
        self._lora: dict[str, tuple[str, str, str, str]] = {}
        self._replace: dict[str, str] = {}           # target -> adapter key holding its new value
        self._bias: dict[str, tuple[str, str]] = {}  # target bias -> (lora_B bias key, weight target)
        keys = set(weights.names())
        for key in weights.names():
            short = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
            if "lora_magnitude_vector" in short:
                raise MergeError(f"{adapter_dir}: DoRA adapters are not supported; merge the adapter into its "
                                 "base with peft (merge_and_unload) and use that folder")
            m = (re.match(r"(.+)\.lora_A((?:\.[^.]+)?)\.weight$", short)
                 or re.match(r"(.+)\.lora_embedding_A((?:\.[^.]+)?)$", short))
            if m:
                module = m.group(1)
                embedding = ".lora_embedding_A" in short
                b_key = key.replace(".lora_embedding_A", ".lora_embedding_B") if embedding else \
                    key.replace(".lora_A", ".lora_B")
                if b_key not in keys:
                    raise MergeError(f"{adapter_dir}: adapter has {key!r} but not its {b_key!r}; re-save the adapter")
                kind = "embedding" if embedding else ("conv" if len(weights.meta(key).shape) > 2 else "linear")
                self._lora[f"{module}.weight"] = (key, b_key, module, kind)
                continue
            m = re.match(r"(.+)\.lora_B((?:\.[^.]+)?)\.bias$", short)
            if m:
                self._bias[f"{m.group(1)}.bias"] = (key, f"{m.group(1)}.weight")
                continue
            if ".lora_B" in short or ".lora_embedding_B" in short:
                continue
            # base_layer values (saved embedding layers, bias="all") and modules_to_save copies
            target = short.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".") \
                .replace(".modules_to_save.", ".")
            self._replace[target] = key
        for target, (bias_key, weight) in self._bias.items():
            if weight not in self._lora:
                raise MergeError(f"{adapter_dir}: adapter has {bias_key!r} but no lora_A for {weight!r}; "
                                 "re-save the adapter")
        for target in list(self._lora) + list(self._replace) + list(self._bias):
            if target not in base_names:
                raise MergeError(f"model {label!r}: adapter {adapter_dir} changes tensor {target!r}, which the base "
                                 f"model {base.label!r} does not have; give the base the adapter was trained on")
        for target, key in self._replace.items():
            if weights.meta(key).shape != base.meta(target).shape:
                raise MergeError(f"model {label!r}: adapter tensor {key!r} has shape {list(weights.meta(key).shape)}, "
                                 f"the base's {target!r} {list(base.meta(target).shape)}; give the base the "
                                 "adapter was trained on")

    def _scale(self, module: str, rank: int) -> float:
        # peft's own rule (utils.other.get_pattern_key): the first pattern matching the module's end
        def pattern(table: dict | None, default):
            for pat, value in (table or {}).items():
                if re.match(rf"(.*\.)?({pat})$", module):
                    return value
            return default
        alpha = pattern(self._cfg.get("alpha_pattern"), self._cfg.get("lora_alpha", 8))
        return alpha / math.sqrt(rank) if self._cfg.get("use_rslora") else alpha / rank

    def names(self):
        return self.base.names()

    def meta(self, name):
        return self.base.meta(name)

    def _delta_rows(self, name: str, r0: int, r1: int) -> torch.Tensor | None:
        """Rows [r0, r1) (first axis) of what the adapter adds to tensor `name`, in float32."""
        if name in self._bias:
            bias_key, weight = self._bias[name]
            a_key, _, module, _ = self._lora[weight]
            rank = self._weights.meta(a_key).shape[0]
            return self._weights.read(bias_key).float()[r0:r1] * self._scale(module, rank)
        if name not in self._lora:
            return None
        a_key, b_key, module, kind = self._lora[name]
        a = self._weights.read(a_key).float()
        b = self._weights.read(b_key).float()
        scale = self._scale(module, a.shape[0])
        shape = tuple(self.meta(name).shape)
        try:
            if kind == "conv":
                if tuple(b.shape[2:]) != (1,) * (b.dim() - 2) or b.dim() != len(shape):
                    raise ValueError
                if all(k == 1 for k in a.shape[2:]):
                    delta = (b[r0:r1].flatten(1) @ a.flatten(1)).reshape((r1 - r0,) + shape[1:])
                else:
                    conv = (torch.nn.functional.conv1d, torch.nn.functional.conv2d,
                            torch.nn.functional.conv3d)[a.dim() - 3]
                    delta = conv(a.transpose(0, 1), b[r0:r1]).transpose(0, 1)
            elif kind == "embedding" or self._cfg.get("fan_in_fan_out"):
                delta = (b @ a[:, r0:r1]).T      # stored transposed: the tensor's rows are A's columns
            else:
                delta = b[r0:r1] @ a
        except (RuntimeError, ValueError, IndexError):
            delta = None
        if delta is None or tuple(delta.shape[1:]) != shape[1:] or delta.shape[0] != min(r1, shape[0]) - r0:
            raise MergeError(f"model {self.label!r}: LoRA factors {list(a.shape)} and {list(b.shape)} for {name!r} "
                             f"do not fit the base tensor's shape {list(shape)}; give the base the adapter was "
                             "trained on")
        return delta * scale

    def read(self, name, start=0, stop=None):
        if name in self._replace:
            value = self._weights.read(self._replace[name], start, stop)
        else:
            value = self.base.read(name, start, stop)
        if name not in self._lora and name not in self._bias:
            return value
        shape = tuple(self.meta(name).shape)
        numel = self.meta(name).numel
        if start == 0 and stop is None:
            delta = self._delta_rows(name, 0, shape[0])
            return (value.float() + delta).to(value.dtype)
        row = numel // shape[0] if shape[0] else 1
        r0, r1 = start // row, -(-stop // row)
        delta = self._delta_rows(name, r0, r1).reshape(-1)[start - r0 * row: stop - r0 * row]
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
        raise MergeError(f"model {label!r}: {p} is neither a safetensors file nor a model folder; "
                         "give the path of a model folder or of a .safetensors file")
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
