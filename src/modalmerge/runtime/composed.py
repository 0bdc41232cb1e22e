"""Serving a composed (MMER) model: one LLM, several modalities in one forward pass.

The LLM is loaded once with the text weights W_t = θ_0 + m̄ ⊙ τ*. For a token of group g the
merged parameters are W_g = θ_0 + m_g ⊙ τ* = W_t + (m_g − m̄) ⊙ τ* (DESIGN.md, "The routed
runtime"): inside `with composed.route(group_ids):` every module holding merged parameters
(linear maps, embeddings, norms, biases) adds, for the tokens of each group, the output of the
correction (m_g − m̄) ⊙ τ*, built for that layer from the bit-packed mask and τ*, used and
dropped. Attention and everything else is shared: only per-token maps differ. Text tokens use
m̄ over all tasks (the stored weights, no correction), or over the groups present
(`text_mask="present"`). When every token maps to one weight set (one modality with
`text_mask="present"`, or one task), the weights are patched in place for the duration of the
context: the whole prompt runs on one dense weight at the plain model's speed.
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
from ..ops import unpack_bits

TEXT = -1


@dataclass
class _Routed:
    module: nn.Module
    name: str                        # module path in the LLM
    params: dict[str, str]           # parameter attribute (weight, bias) → merged tensor name


class ComposedModel:
    """A composed folder loaded for inference: `llm` (an ordinary HF module holding W_t), the
    modalities' encoder/projector tensors, and token routing."""

    def __init__(self, folder: DecoupledFolder, llm: nn.Module, device: torch.device):
        self.folder = folder
        self.llm = llm
        self.device = device
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
        # with unit scalars (MMER, TALL) the mean mask over all tasks is count / N: keep the count
        # per tensor (1 byte a parameter) instead of unpacking every task's mask on every call
        self._counts: dict[str, torch.Tensor] | None = {} if all(v == 1.0 for v in self.scalars.values()) \
            and len(self.tasks) < 256 else None
        self.last_unrouted: set[str] = set()

    def resident_bytes(self) -> dict[str, int]:
        """What serving holds: the LLM's parameters, τ*, the packed masks and (once built) the
        per-tensor mask counts."""
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

    # -- coefficients ----------------------------------------------------------------------
    def _mask(self, task: str, tensor: str) -> torch.Tensor:
        numel = self.shared[tensor].numel()
        c = unpack_bits(self.masks[(task, tensor)], (numel,)).to(self.shared[tensor].dtype)
        return c.mul_(self.scalars[task]) if self.scalars[task] != 1.0 else c

    def _mean(self, tasks: list[str], tensor: str) -> torch.Tensor:
        if self._counts is not None and len(tasks) == len(self.tasks):
            if tensor not in self._counts:
                numel = self.shared[tensor].numel()
                count = torch.zeros(numel, dtype=torch.uint8, device=self.shared[tensor].device)
                for t in self.tasks:
                    count += unpack_bits(self.masks[(t, tensor)], (numel,))
                self._counts[tensor] = count
            return self._counts[tensor].float().div_(len(tasks))
        total = self._mask(tasks[0], tensor).float()
        for t in tasks[1:]:
            total += self._mask(t, tensor).float()
        return total / len(tasks)

    def delta(self, key: tuple, tensor: str) -> torch.Tensor:
        """W_key − W_t for one merged tensor: (c − c̄) ⊙ τ*, c = the group's mask (key ("task", i))
        or the mean mask over some tasks (key ("mean", tasks))."""
        kind, what = key
        shared = self.shared[tensor]
        if kind == "task":
            coef = self._mask(self.tasks[what], tensor).float()
        else:
            coef = self._mean([self.tasks[i] for i in what], tensor)
        coef -= self._mean(self.tasks, tensor)
        return (coef.to(shared.dtype) * shared.reshape(-1)).reshape(shared.shape)

    # -- routing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def route(self, group_ids: torch.Tensor, text_mask: str = "all", present: list[str] | None = None,
              cache: bool = False) -> Iterator["ComposedModel"]:
        """Run forward passes with per-token weights. group_ids [batch, seq] ints: -1 text,
        i the i-th task (see `tasks`). text_mask: "all" (m̄ over every task: the stored weights)
        or "present" (m̄ over the tasks in group_ids, or in `present`). cache keeps the built
        corrections for the whole context (several forward passes over one prompt)."""
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
        state.active, state.slot, state.keys, state.bypass = True, slot, merged_keys, False
        state.cache = {} if cache else None
        handles = [r.module.register_forward_hook(self._hook(r), with_kwargs=True) for r in self._routed]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            state.active, state.slot, state.keys, state.cache = False, None, None, None

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

    def _deltas(self, r: _Routed, k: int) -> dict[str, torch.Tensor]:
        state = self._state
        key = state.keys[k]
        if state.cache is not None and (r.name, k) in state.cache:
            return state.cache[(r.name, k)]
        out = {attr: self.delta(key, tensor) for attr, tensor in r.params.items()}
        if state.cache is not None:
            state.cache[(r.name, k)] = out
        return out

    def _hook(self, r: _Routed):
        def hook(module, args, kwargs, output):
            state = self._state
            if state.bypass or not isinstance(output, torch.Tensor):
                return None
            x = args[0] if args else next(iter(kwargs.values()))
            slot = state.slot
            b, s = slot.shape
            integer = not torch.is_floating_point(x)
            lead = x.shape if integer else x.shape[:-1]
            if len(lead) != 2 or lead[1] != s or lead[0] not in (1, b):
                # not a [batch, seq] token layout (a pooler on the first token, a sliced last
                # position): treated as text tokens
                self.last_unrouted.add(r.name)
                slot_here = None
            else:
                slot_here = slot
                if lead[0] != b:  # broadcast over the batch (BERT's position embeddings)
                    x = x.expand((b,) + tuple(x.shape[1:]))
                    output = output.expand((b,) + tuple(output.shape[1:]))
            if slot_here is None:
                if state.keys[0] is None:
                    return None
                return output + self._correction(r, module, x, 0, output)
            out = output.clone()
            flat_slot = slot_here.reshape(-1)
            flat_x = x.reshape((b * s,) + (() if integer else (x.shape[-1],)))
            flat_out = out.reshape(b * s, -1)
            flat_y = output.reshape(b * s, -1)
            for k in torch.unique(flat_slot).tolist():
                if state.keys[k] is None:
                    continue
                idx = (flat_slot == k).nonzero().reshape(-1)
                corr = self._correction(r, module, flat_x[idx], k, flat_y[idx])
                flat_out.index_add_(0, idx, corr.reshape(idx.numel(), -1).to(out.dtype))
            return out
        return hook

    def _correction(self, r: _Routed, module: nn.Module, x: torch.Tensor, k: int, y: torch.Tensor) -> torch.Tensor:
        """f(x; W_t + D) − f(x; W_t) for the tokens x, with y = f(x; W_t) already computed."""
        d = self._deltas(r, k)
        # modules linear in their parameters: the correction is the module applied with D
        if isinstance(module, nn.Linear):
            return F.linear(x, d["weight"] if "weight" in d else torch.zeros_like(module.weight), d.get("bias"))
        if isinstance(module, nn.Embedding):
            if "weight" not in d:
                return torch.zeros_like(y)
            return F.embedding(x, d["weight"])
        if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            w = d.get("weight", torch.zeros_like(module.weight))
            bias = d.get("bias") if module.bias is not None else None
            if bias is None and module.bias is not None:
                bias = torch.zeros_like(module.bias)
            return F.layer_norm(x, module.normalized_shape, w, bias, module.eps)
        # any other per-token module (RMSNorm, Conv1D…): the difference of two evaluations
        params = {attr: getattr(module, attr) + delta for attr, delta in d.items()}
        state = self._state
        state.bypass = True
        try:
            new = torch.func.functional_call(module, params, (x,))
        finally:
            state.bypass = False
        return new - y.reshape(new.shape)


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
    """Load a composed (MMER) folder: the LLM with `model_cls.from_pretrained` (default
    transformers.AutoModel) from the text weights, τ* and the masks for routing. A folder whose
    config names custom modelling code (auto_map) is refused unless `trust_remote_code`."""
    from ..procedures.calibration import check_remote_code

    if model_cls is None:
        from transformers import AutoModel as model_cls  # noqa: N813
    d = DecoupledFolder(folder)
    check_remote_code(d.path, f"composed model {d.path}", trust_remote_code)
    kwargs = dict(from_pretrained_kwargs, trust_remote_code=trust_remote_code)
    if dtype is not None:
        kwargs["dtype"] = dtype
    llm = model_cls.from_pretrained(str(d.path), **kwargs).to(device).eval()
    return ComposedModel(d, llm, torch.device(device))
