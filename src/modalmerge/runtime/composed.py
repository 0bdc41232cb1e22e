"""Serving a composed (MMER) model: one LLM, several modalities in one forward pass.

The LLM is loaded once with the text weights W_t = θ_0 + m̄ ⊙ τ*. For a token of group g the
merged parameters are W_g = θ_0 + m_g ⊙ τ* = W_t + (m_g − m̄) ⊙ τ* (DESIGN.md, "The routed
runtime"): inside `with composed.route(group_ids):` the forward of every module holding merged
parameters (linear maps, embeddings, norms, biases) is replaced by one that runs each group's
tokens once, on that group's own weights: W_g is built for the layer from the bit-packed mask,
the per-element mask count and τ* (one table lookup, one subtraction and one multiply-add over
the matrix), used for the group's gathered tokens and dropped. So a routed prefill costs the
plain model's matmuls plus a few elementwise passes per group and layer; embeddings build only
the rows the tokens look up. Attention and everything else is shared: only per-token maps
differ. Text tokens use m̄ over all tasks (the stored weights, run as they are), or over the
groups present (`text_mask="present"`). When every token maps to one weight set (one modality
with `text_mask="present"`, or one task), the weights are patched in place for the duration of
the context: the whole prompt runs on one dense weight at the plain model's speed. Decoding
after the prefill runs outside route() on the stored weights: the plain model.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.decoupled import DecoupledFolder
from ..errors import MergeError
from ..ops import unpack_bits, unpack_bits_scaled
from .generate import TEXT, Generation, generate
from .multimodal import Modality, default_model_class, modality_of


@dataclass
class _Routed:
    module: nn.Module
    name: str                        # module path in the LLM
    params: dict[str, str]           # parameter attribute (weight, bias) → merged tensor name


class ComposedModel:
    """A composed folder loaded for inference: `llm` (an ordinary HF module holding W_t), the
    modalities' encoder/projector tensors, and token routing."""

    def __init__(self, folder: DecoupledFolder, llm: nn.Module, device: torch.device,
                 trust_remote_code: bool = False):
        self.folder = folder
        self.llm = llm
        self.device = device
        self.trust_remote_code = trust_remote_code  # whether a modality's processor/config may run its folder's code
        self.loaded_modalities: dict[str, Modality] = {}   # built on first use (modality())
        self.text_tokenizer: Any = None                      # loaded on first use (generate())
        self.tasks: list[str] = folder.task_names
        param_dtype = next(llm.parameters()).dtype
        names = dict(llm.named_parameters())
        prefix = getattr(llm, "base_model_prefix", "") or ""
        self._routed: list[_Routed] = []
        self.unused: list[str] = []      # merged tensors the loaded module does not have (a head)
        by_module: dict[str, _Routed] = {}
        for tensor in folder.tensors:
            param = _find_param(tensor, names, prefix)
            if param is None:
                self.unused.append(tensor)
                continue
            mod_name, _, attr = param.rpartition(".")
            if mod_name not in by_module:
                by_module[mod_name] = _Routed(llm.get_submodule(mod_name), mod_name, {})
            by_module[mod_name].params[attr] = tensor
        self._routed = list(by_module.values())
        # τ* in the model's dtype and the packed masks, resident on the device; 1/32 of the
        # model per task for the masks
        self.shared = {t: folder.shared.read(t).to(device=device, dtype=param_dtype)
                       for r in self._routed for t in r.params.values()}
        self.masks = {(task, t): folder.masks.read(folder._mask_name(task, t)).to(device)
                      for task in self.tasks for r in self._routed for t in r.params.values()}
        self.scalars = {name: s for name, s in folder.tasks}
        self._state = threading.local()
        # with unit scalars (MMER, TALL) the mean mask over all tasks is count / N: the count per
        # element (1 byte a parameter) is built once here, so a group's weights need its own mask
        # only, never every task's
        self._counts: dict[str, torch.Tensor] | None = None
        if all(v == 1.0 for v in self.scalars.values()) and len(self.tasks) < 256:
            self._counts = {}
            for tensor in self.shared:
                numel = self.shared[tensor].numel()
                count = torch.zeros(numel, dtype=torch.uint8, device=device)
                for task in self.tasks:
                    count += unpack_bits(self.masks[(task, tensor)], (numel,))
                self._counts[tensor] = count
        self.last_unrouted: set[str] = set()

    def resident_bytes(self) -> dict[str, int]:
        """What serving holds: the LLM's parameters, τ*, the packed masks and the per-element
        mask counts (unit scalars; 1 byte a merged parameter). Transient during a routed forward:
        one module's weights per group at a time (all of them with route(cache=True))."""
        return {"model": sum(p.numel() * p.element_size() for p in self.llm.parameters()),
                "tau*": sum(t.numel() * t.element_size() for t in self.shared.values()),
                "masks": sum(t.numel() * t.element_size() for t in self.masks.values()),
                "mask counts": sum(t.numel() * t.element_size() for t in (self._counts or {}).values())}

    # -- modalities ------------------------------------------------------------------------
    def task_index(self, task: str) -> int:
        return self.folder.check_task(task)

    def modality_tensors(self, task: str) -> dict[str, torch.Tensor]:
        """The task's encoder/projector (and other non-LLM) tensors under its model's own names
        ({} for a text-only task), on the device."""
        src = self.folder.modality_source(task)
        if src is None:
            return {}
        return {n: src.read(n).to(self.device) for n in src.names()}

    def modality_folder(self, task: str) -> Path | None:
        """The folder with the task's encoder/projector weights and its model's config files."""
        entry = self.folder.task_entry(task).get("modality")
        return self.folder.path / entry["dir"] if entry else None

    # -- multimodal serving (runtime/multimodal.py, runtime/generate.py) --------------------
    def modality(self, task: str, with_model: bool = True) -> Modality:
        """The task's processor and (with_model) its towers and projectors as modules, built on
        first use and kept."""
        return modality_of(self, task, with_model)

    def generate(self, text: str = "", images=(), audios=(), **options) -> Generation:
        """Generate from one prompt holding text, images and audio clips: each modality's tokens
        routed through its own weights in the prefill, decoding on the text weights with the KV
        cache (runtime/generate.py has the options)."""
        return generate(self, text, images, audios, **options)

    # -- coefficients ----------------------------------------------------------------------
    def _bits(self, task: str, tensor: str, positions: torch.Tensor | None = None, value: float = 1.0) -> torch.Tensor:
        """value × the task's mask of `tensor`, float32 and flat: every element, or the flat
        `positions` only (an embedding's looked-up rows)."""
        return unpack_bits_scaled(self.masks[(task, tensor)], self.shared[tensor].numel(), value, positions)

    def _coef(self, key: tuple, tensor: str, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """(c, s) with W_key − W_t = s · c ⊙ τ* for one merged tensor, c flat float32 (every element
        or the flat `positions`); key ("task", i), or ("mean", tasks) for the mean mask over tasks."""
        kind, what = key
        chosen = [self.tasks[what]] if kind == "task" else [self.tasks[i] for i in what]
        n = len(self.tasks)
        if self._counts is not None:
            # unit scalars: mean over `chosen` of m − count / N, kept in small integers until the
            # multiply-add, (N · Σ m − |chosen| · count) / (N · |chosen|)
            c = self._bits(chosen[0], tensor, positions, value=n)
            for task in chosen[1:]:
                c += self._bits(task, tensor, positions, value=n)
            count = self._counts[tensor] if positions is None else self._counts[tensor][positions]
            return c.sub_(count, alpha=len(chosen)), 1.0 / (n * len(chosen))
        # any scalars: c = mean over `chosen` of λ m − mean over all tasks of λ m
        c = self._bits(chosen[0], tensor, positions, value=self.scalars[chosen[0]] / len(chosen))
        for task in chosen[1:]:
            c += self._bits(task, tensor, positions, value=self.scalars[task] / len(chosen))
        for task in self.tasks:
            c -= self._bits(task, tensor, positions, value=self.scalars[task] / n)
        return c, 1.0

    def delta(self, key: tuple, tensor: str) -> torch.Tensor:
        """W_key − W_t for one merged tensor: (c − c̄) ⊙ τ*, c = the group's mask (key ("task", i))
        or the mean mask over some tasks (key ("mean", tasks))."""
        shared = self.shared[tensor]
        c, scale = self._coef(key, tensor)
        return (c.mul_(scale).to(shared.dtype) * shared.reshape(-1)).reshape(shared.shape)

    def _weight(self, key: tuple, tensor: str, text_weight: torch.Tensor) -> torch.Tensor:
        """W_key = W_t + s · c ⊙ τ* for one merged tensor, given its text weight W_t: one
        multiply-add over the matrix."""
        shared = self.shared[tensor]
        c, scale = self._coef(key, tensor)
        return torch.addcmul(text_weight, c.reshape(shared.shape).to(shared.dtype), shared, value=scale)

    def _rows(self, key: tuple, tensor: str, ids: torch.Tensor) -> torch.Tensor:
        """(W_key − W_t)[ids] for an embedding table: only the rows looked up."""
        shared = self.shared[tensor]
        width = shared.shape[-1]
        # each distinct row once (positions repeat in every sequence)
        distinct, where = torch.unique(ids, return_inverse=True)
        positions = (distinct.reshape(-1, 1) * width + torch.arange(width, device=ids.device)).reshape(-1)
        c, scale = self._coef(key, tensor, positions)
        rows = (c.mul_(scale).to(shared.dtype) * shared.reshape(-1)[positions]).reshape(-1, width)
        return rows[where]

    # -- routing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def route(self, group_ids: torch.Tensor, text_mask: str = "all", present: list[str] | None = None,
              cache: bool = False) -> Iterator["ComposedModel"]:
        """Run forward passes with per-token weights. group_ids [batch, seq] ints: -1 text,
        i the i-th task (see `tasks`). text_mask: "all" (m̄ over every task: the stored weights)
        or "present" (m̄ over the tasks in group_ids, or in `present`). cache keeps each group's built
        weights for the whole context (several forward passes over one prompt; memory: one set
        of merged weights per group)."""
        if text_mask not in ("all", "present"):
            raise MergeError(f"text_mask {text_mask!r}: use 'all' or 'present'")
        if group_ids.dim() != 2:
            raise MergeError(f"group_ids must be [batch, seq], got shape {list(group_ids.shape)}")
        group_ids = group_ids.to(self.device)
        ids = sorted(int(i) for i in torch.unique(group_ids))
        bad = [i for i in ids if i < TEXT or i >= len(self.tasks)]
        if bad:
            raise MergeError(f"group id {bad[0]} is not a task: use -1 for text or 0..{len(self.tasks) - 1} "
                             f"({', '.join(self.tasks)})")
        groups = [i for i in ids if i != TEXT]
        if present is not None:
            text_tasks = tuple(sorted(self.task_index(t) for t in present))
        else:
            text_tasks = tuple(groups)
        text_key = ("mean", text_tasks) if text_mask == "present" and text_tasks else None
        if text_key is not None and len(text_tasks) == len(self.tasks):
            text_key = None  # the mean over all tasks: the stored weights
        if text_key is not None and len(text_tasks) == 1:
            text_key = ("task", text_tasks[0])
        # token → key index; key None = the stored text weights
        keys: list[tuple | None] = [text_key] + [("task", g) for g in groups]
        slot = torch.zeros_like(group_ids, dtype=torch.long)
        for k, g in enumerate(groups, start=1):
            slot[group_ids == g] = k
        # groups whose weights are the text weights share its slot (no correction)
        merged_keys: list[tuple | None] = []
        remap = []
        for k in keys:
            if k in merged_keys:
                remap.append(merged_keys.index(k))
            else:
                remap.append(len(merged_keys))
                merged_keys.append(k)
        slot = torch.tensor(remap, device=slot.device)[slot]
        used = sorted(int(s) for s in torch.unique(slot))
        state = self._state
        if getattr(state, "active", False):
            raise MergeError("route() contexts cannot be nested")
        self.last_unrouted = set()
        if len(used) == 1:
            key = merged_keys[used[0]]
            if key is None:
                yield self       # all tokens on the stored weights
                return
            with self._patched(key):
                yield self
            return
        flat_slot = slot.reshape(-1)
        state.active, state.slot, state.keys, state.bypass = True, slot, merged_keys, False
        # each used slot's flat token positions, found once for every module of the forward
        state.tokens = [(k, (flat_slot == k).nonzero().reshape(-1)) for k in used]
        state.spans = _shared_spans(slot, used)
        state.cache, state.gathered = ({} if cache else None), None
        # the modules' own forwards, replaced for the context (an instance attribute, as
        # accelerate's hooks set, is put back as it was)
        replaced = [(r.module, r.module.__dict__.get("forward")) for r in self._routed]
        for r in self._routed:
            r.module.forward = self._forward(r, r.module.forward)
        try:
            yield self
        finally:
            for module, own in reversed(replaced):
                if own is None:
                    module.__dict__.pop("forward", None)
                else:
                    module.forward = own
            state.active, state.slot, state.keys, state.cache, state.tokens = False, None, None, None, None
            state.gathered = state.spans = None

    @contextlib.contextmanager
    def _patched(self, key: tuple):
        """Every merged parameter set to W_key in place; the stored values are put back after."""
        done = []
        try:
            with torch.no_grad():
                for r in self._routed:
                    for attr, tensor in r.params.items():
                        p = getattr(r.module, attr)
                        p.add_(self.delta(key, tensor).to(p.dtype))
                        done.append((p, tensor))
            yield
        finally:
            with torch.no_grad():
                for p, tensor in done:   # exact restore from the stored text weights
                    p.copy_(self.folder.text.read(tensor).to(device=p.device, dtype=p.dtype))

    @contextlib.contextmanager
    def task(self, task: str):
        """The whole model as one task's model (θ_0 + m_task ⊙ τ*), patched in place."""
        with self._patched(("task", self.task_index(task))):
            yield self

    def _weights(self, r: _Routed, k: int) -> dict[str, torch.Tensor]:
        """The merged parameters of r's module for slot k: W_key, built now (or kept for the
        context with cache=True)."""
        state = self._state
        if state.cache is not None and (r.name, k) in state.cache:
            return state.cache[(r.name, k)]
        key = state.keys[k]
        out = {attr: self._weight(key, tensor, getattr(r.module, attr)) for attr, tensor in r.params.items()}
        if state.cache is not None:
            state.cache[(r.name, k)] = out
        return out

    def _forward(self, r: _Routed, original):
        """r.module's forward inside route(): the tokens of each slot gathered, run once on the
        slot's own weights, and put back in place."""
        def forward(*args, **kwargs):
            state = self._state
            if not getattr(state, "active", False) or state.bypass or not (args or kwargs):
                return original(*args, **kwargs)   # another thread, or inside a module's own run
            x = args[0] if args else next(iter(kwargs.values()))
            if not isinstance(x, torch.Tensor):
                return original(*args, **kwargs)
            b, s = state.slot.shape
            lead = x.shape if not torch.is_floating_point(x) else x.shape[:-1]
            if len(lead) != 2 or lead[1] != s or lead[0] not in (1, b):
                # not a [batch, seq] token layout (a pooler on the first token, a sliced last
                # position): treated as text tokens
                self.last_unrouted.add(r.name)
                if state.keys[0] is None:
                    return original(*args, **kwargs)
                y = self._run(r, original, 0, x)
                return original(*args, **kwargs) if y is None else y
            out = None
            for i, ((k, idx), part) in enumerate(zip(state.tokens, self._gathered(x))):
                y = self._run(r, original, k, part)
                if y is None:    # not a per-token module after all: the text weights
                    self.last_unrouted.add(r.name)
                    return original(*args, **kwargs)
                if out is None:
                    out = y.new_empty((b, s) + tuple(y.shape[1:]))
                if state.spans is None:
                    out.view((b * s,) + tuple(y.shape[1:])).index_put_((idx,), y)
                    continue
                # the same positions in every sequence: strided copies, faster than a scatter
                per_sequence = y.view((b, -1) + tuple(y.shape[1:]))
                at = 0
                for start, stop in state.spans[i]:
                    out[:, start:stop].copy_(per_sequence[:, at:at + stop - start])
                    at += stop - start
            return out
        return forward

    def _gathered(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x's tokens of each used slot, gathered; the last input's are kept, so modules that read
        one tensor (query, key and value maps; gate and up) gather it once."""
        state = self._state
        last = state.gathered
        if last is not None and last[0] is x and last[1] == x._version:
            return last[2]
        b, s = state.slot.shape
        tokens = x if x.shape[0] == b else x.expand((b,) + tuple(x.shape[1:]))  # broadcast (positions)
        flat = tokens.reshape((b * s,) + tuple(tokens.shape[2:]))
        parts = [flat.index_select(0, idx) for _, idx in state.tokens]
        state.gathered = (x, x._version, parts)
        return parts

    def _run(self, r: _Routed, original, k: int, x: torch.Tensor) -> torch.Tensor | None:
        """r's module on the tokens x of slot k, with the slot's weights (None: its output is not
        a tensor)."""
        state = self._state
        key = state.keys[k]
        module = r.module
        if key is None:
            y = original(x)
        elif type(module) is nn.Embedding and module.max_norm is None and set(r.params) == {"weight"}:
            # only the rows looked up: a vocabulary-sized table is never built per group
            y = original(x) + self._rows(key, r.params["weight"], x)
        else:
            w = self._weights(r, k)
            if type(module) is nn.Linear:
                y = F.linear(x, w.get("weight", module.weight), w.get("bias", module.bias))
            elif type(module) is nn.LayerNorm:
                y = F.layer_norm(x, module.normalized_shape, w.get("weight", module.weight),
                                 w.get("bias", module.bias), module.eps)
            else:
                # any other per-token module (RMSNorm, Conv1D…): its own forward with the slot's
                # weights swapped in; modules inside it run on their stored weights
                saved = {attr: module._parameters[attr] for attr in w}
                state.bypass = True
                try:
                    module._parameters.update(w)
                    y = original(x)
                finally:
                    module._parameters.update(saved)
                    state.bypass = False
        return y if isinstance(y, torch.Tensor) else None


def _shared_spans(slot: torch.Tensor, used: list[int], most: int = 8) -> list[list[tuple[int, int]]] | None:
    """When every sequence of the batch has the same slot at each position (prompts built from
    one template), each used slot's runs of positions [start, stop); None otherwise, or when a
    slot has more than `most` runs (a scatter is then cheaper than many small copies)."""
    if not bool((slot == slot[:1]).all()):
        return None
    row = slot[0].tolist()
    spans = []
    for k in used:
        runs: list[tuple[int, int]] = []
        for j, v in enumerate(row):
            if v != k:
                continue
            if runs and runs[-1][1] == j:
                runs[-1] = (runs[-1][0], j + 1)
            else:
                runs.append((j, j + 1))
        if len(runs) > most:
            return None
        spans.append(runs)
    return spans


def _find_param(tensor: str, names: dict[str, Any], prefix: str) -> str | None:
    """The loaded module's parameter holding merged tensor `tensor` (HF may drop or add the
    base model prefix: `bert.encoder…` vs `encoder…`)."""
    if tensor in names:
        return tensor
    if prefix and tensor.startswith(prefix + ".") and tensor[len(prefix) + 1:] in names:
        return tensor[len(prefix) + 1:]
    if prefix and f"{prefix}.{tensor}" in names:
        return f"{prefix}.{tensor}"
    return None


def load_composed(folder: str | Path, model_cls: Any = None, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None, trust_remote_code: bool = False,
                  **from_pretrained_kwargs) -> ComposedModel:
    """Load a composed (MMER) folder: the LLM with `model_cls.from_pretrained` from the text
    weights (default: transformers.AutoModelForCausalLM, so there are logits; AutoModel for a
    base with no causal-LM class), τ* and the masks for routing. Each modality's towers,
    projectors and processor (copied into the folder by the merge) are built on first use:
    `composed.modality(task)`, `composed.generate(text=…, images=[…], audios=[…])`. A folder
    whose config names custom modelling code (auto_map) is refused unless `trust_remote_code`."""
    from ..procedures.calibration import check_remote_code

    d = DecoupledFolder(folder)
    if model_cls is None:
        model_cls = default_model_class(d.path)
    check_remote_code(d.path, f"composed model {d.path}", trust_remote_code)
    kwargs = dict(from_pretrained_kwargs, trust_remote_code=trust_remote_code)
    if dtype is not None:
        kwargs["dtype"] = dtype
    llm = model_cls.from_pretrained(str(d.path), **kwargs).to(device).eval()
    return ComposedModel(d, llm, torch.device(device), trust_remote_code)
