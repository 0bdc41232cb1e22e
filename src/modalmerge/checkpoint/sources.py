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

from ..errors import MergeError, one_line
from .hub import local_model_path, split_lora
from .safetensors_io import SafetensorsFile, TensorMeta, check_regular, read_regular

_MAX_JSON = 100_000_000  # an index or adapter config larger than this is not one


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
            check_regular(f, "pickled checkpoint")  # torch.load would block on a FIFO
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


def load_json(path: Path, what: str, fix: str):
    """A small JSON file from a model folder (config, index, adapter config), or one line saying
    why not: a FIFO or device in its place is refused instead of blocking the read forever."""
    raw = read_regular(path, _MAX_JSON, what)
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise MergeError(f"{path}: not valid JSON; {fix}") from None


def _adapter_config(cfg_path: Path) -> dict:
    """adapter_config.json, with the types of every field the densifying uses checked."""
    fix = "re-save the adapter with peft (save_pretrained)"
    cfg = load_json(cfg_path, "PEFT adapter config", fix)
    if not isinstance(cfg, dict):
        raise MergeError(f"{cfg_path}: not a PEFT adapter config (not a JSON object); {fix}")

    def number(v) -> bool:
        return type(v) in (int, float) and math.isfinite(v)

    def bad(field: str, want: str):
        return MergeError(f"{cfg_path}: `{field}` is {cfg.get(field)!r:.60}, not {want}; {fix}")

    for field in ("r", "lora_alpha"):
        if field not in cfg:
            raise MergeError(f"{cfg_path}: no `{field}` (needed for the LoRA scale lora_alpha / r); {fix}")
    if type(cfg["r"]) is not int or cfg["r"] < 1:
        raise bad("r", "a positive integer")
    if not number(cfg["lora_alpha"]):
        raise bad("lora_alpha", "a number")
    if not isinstance(cfg.get("peft_type", "LORA"), str):
        raise bad("peft_type", "a string")
    for field in ("use_rslora", "fan_in_fan_out"):
        if cfg.get(field) not in (None, True, False):
            raise bad(field, "true or false")
    for field, ok, want in (("alpha_pattern", number, "numbers"),
                            ("rank_pattern", lambda v: type(v) is int and v >= 1, "positive integers")):
        table = cfg.get(field)
        if table is None:
            continue
        if not isinstance(table, dict) or not all(ok(v) for v in table.values()):
            raise bad(field, f"a map of module patterns to {want}")
        for pat in table:
            try:
                re.compile(rf"(.*\.)?({pat})$")
            except re.error:
                raise MergeError(f"{cfg_path}: `{field}` key {pat!r:.60} is not a valid pattern; {fix}") from None
    return cfg


class PeftSource(TensorSource):
    """A PEFT LoRA adapter folder seen as a full model: base tensors plus B·A·scale, per tensor.

    Nothing is densified until a tensor is read, and a read of a row range computes only those
    rows of B·A, so chunked reads of a large adapted tensor stay O(chunk).
    """

    def __init__(self, adapter_dir: Path, base: TensorSource, label: str, files_from_base: bool = False):
        self.label, self.path, self.base = label, adapter_dir, base
        # `model+lora`: the model is the base with the adapter applied, so its config and
        # tokenizer files are the base's (mergekit saves the merged model with the base's)
        self._files_from_base = files_from_base
        cfg_path = adapter_dir / "adapter_config.json"
        cfg = _adapter_config(cfg_path)
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

    @property
    def folder(self) -> Path | None:
        return self.base.folder if self._files_from_base else super().folder

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
    """The base model an adapter folder names in its config, if any (a bad config is reported
    when the adapter itself is opened)."""
    try:
        cfg = load_json(path / "adapter_config.json", "PEFT adapter config", "")
    except MergeError:
        return None
    named = cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None
    return named if isinstance(named, str) and named else None


def open_source(path: str | os.PathLike, *, label: str | None = None, allow_pickle: bool = False,
                base: TensorSource | None = None) -> TensorSource:
    """Open a model folder or file; an adapter folder needs the `base` it was trained on.

    `path` may also be a reference as mergekit takes it (checkpoint/hub.py): a Hugging Face hub
    id (`org/name[@revision]`) that is no local path, or `model+lora`, the model with a LoRA
    adapter applied (densified per tensor as it is read; `base` is then the model before '+')."""
    p = Path(path)
    label = label or p.name
    if not p.exists():
        model, lora = split_lora(str(path))
        if lora is not None:
            base = open_source(model, label=f"{label} (base of {lora})", allow_pickle=allow_pickle)
            adapter = local_model_path(lora, label, allow_pickle)
            if not _is_adapter(adapter):
                raise MergeError(f"model {label!r}: {adapter} (after '+' in {one_line(str(path), 200)}) is not a "
                                 "PEFT LoRA adapter folder (no adapter_config.json); give `model+adapter_folder`")
            return PeftSource(adapter, base, label, files_from_base=True)
        p = local_model_path(str(path), label, allow_pickle)
        if not p.exists():  # a dangling link
            raise MergeError(f"model {label!r}: {p} does not exist; check the path in the recipe")
    if not p.is_dir() and not p.is_file():  # a FIFO, device or socket: reading it would block or never end
        check_regular(p, "model folder or .safetensors file")
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
    if os.path.lexists(index):
        weight_map = read_weight_map(index)
        files = [shard_path(p, index, shard) for shard in dict.fromkeys(weight_map.values())]
        source = SafetensorsSource(files, label, p)
        for name, shard in weight_map.items():
            if name not in source._where or source._where[name].path != p / shard:
                raise MergeError(f"{index}: tensor {name!r} is listed in {shard} but is not in it; re-download "
                                 "the model")
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


def read_weight_map(index: Path, fix: str = "re-save or re-download the model") -> dict[str, str]:
    """The `weight_map` of a `*.safetensors.index.json`: tensor name -> shard file name."""
    data = load_json(index, "shard index", fix)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                                   for k, v in weight_map.items()):
        raise MergeError(f"{index}: corrupt index (needs a `weight_map` of tensor names to shard files); {fix}")
    return weight_map


def _containment_root(folder: Path) -> Path:
    """Where a model folder's files may live: the folder, or for a Hugging Face cache snapshot
    (models--org--name/snapshots/<rev>/, whose files are links into ../../blobs) the whole repo."""
    real = folder.resolve()
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        return real.parent.parent
    return real


def shard_path(folder: Path, index: Path, shard: str, fix: str = "re-download the model") -> Path:
    """The file an index entry names, which must lie in the model folder (an index from someone
    else must not make the tool read /etc/passwd or a neighbour's weights)."""
    rel = Path(shard)
    if rel.is_absolute() or ".." in rel.parts:
        raise MergeError(f"{index}: shard {shard!r:.80} is outside the model folder; shards must be files in "
                         f"{folder}, {fix}")
    f = folder / rel
    if not os.path.lexists(f):
        raise MergeError(f"{index}: shard {shard!r:.80} is missing; {fix}")
    try:
        real = f.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        raise MergeError(f"{index}: shard {shard!r:.80} is a symlink loop; {fix}") from None
    if not real.is_relative_to(_containment_root(folder)):
        raise MergeError(f"{index}: shard {shard!r:.80} is a link to {real}, outside the model folder; copy the "
                         f"file into {folder} or {fix}")
    return f


def _pickled(files: list[Path], label: str, path: Path, allow_pickle: bool) -> TensorSource:
    if not allow_pickle:
        raise MergeError(f"model {label!r}: {files[0]} is a pickled checkpoint, which can run code when loaded; "
                         "pass --allow-pickle to load it with weights_only, or convert it to safetensors")
    return PickleSource(files, label, path)
