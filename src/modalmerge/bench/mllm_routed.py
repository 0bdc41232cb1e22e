"""FALLBACK routed forward for the mini-MLLM benchmark: per-group MATERIALISED weights.

This is not the library's routed runtime (`modalmerge.runtime`, spec 7 step 5 / DESIGN "The routed
runtime"), which keeps the text weight dense and adds per-group masked deltas from the bit masks.
It exists so the benchmark can score mixed-modality inputs before that runtime lands: every
Linear / LayerNorm / Embedding of a copy of the model holds one full weight per group, and each
token is mapped by its own group's weight. Attention is shared by all tokens, as in MMER. It costs
G x the memory of the model and is only meant for this benchmark's small language model.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MergeError


class Router:
    """Holds the group id of every token of the current batch, [B, L] int64."""

    def __init__(self):
        self.groups: torch.Tensor | None = None


class _Routed(nn.Module):
    def __init__(self, router: Router, params: dict[str, torch.Tensor]):
        super().__init__()
        self.router = router
        for k, v in params.items():
            self.register_buffer(k, v, persistent=False)

    def _route(self, x: torch.Tensor, out_dim: int, fn) -> torch.Tensor:
        g = self.router.groups
        if g is not None and x.dim() == 2 and x.shape[0] == g.shape[0]:
            g = g[:, 0]                  # a pooler reading the first token of each sequence
        if g is None or g.shape != x.shape[:-1]:
            raise MergeError("routed forward: group ids must be set for every token of the batch")
        out = x.new_empty(*x.shape[:-1], out_dim)
        for k in torch.unique(g).tolist():
            sel = g == k
            out[sel] = fn(x[sel], k)
        return out


class RoutedLinear(_Routed):
    def forward(self, x):
        b = getattr(self, "bias", None)
        return self._route(x, self.weight.shape[1], lambda v, k: F.linear(v, self.weight[k],
                                                                           None if b is None else b[k]))


class RoutedLayerNorm(_Routed):
    def __init__(self, router, params, eps, shape):
        super().__init__(router, params)
        self.eps, self.shape = eps, shape

    def forward(self, x):
        return self._route(x, x.shape[-1], lambda v, k: F.layer_norm(v, self.shape, self.weight[k],
                                                                     self.bias[k], self.eps))


class RoutedEmbedding(_Routed):
    def forward(self, ids):
        g = self.router.groups
        ids = ids.expand(g.shape)        # BERT passes position ids as [1, L]
        out = self.weight.new_empty(*ids.shape, self.weight.shape[-1])
        for k in torch.unique(g).tolist():
            sel = g == k
            out[sel] = F.embedding(ids[sel], self.weight[k])
        return out


def routed_copy(model: nn.Module, groups: list[dict[str, torch.Tensor]],
                plain: dict[str, torch.Tensor] | None = None) -> tuple[nn.Module, Router]:
    """A copy of `model` whose Linear/LayerNorm/Embedding layers map each token by its group's
    weights (`groups[k]` a full state dict for group k). Parameters named in `plain` are loaded
    as ordinary (unrouted) weights: here the word embeddings, which only text tokens read."""
    plain = plain or {}
    out = copy.deepcopy(model)
    router = Router()
    covered = set(plain)
    for name, mod in list(out.named_modules()):
        if not isinstance(mod, (nn.Linear, nn.LayerNorm, nn.Embedding)):
            continue
        keys = {p: f"{name}.{p}" for p, v in mod.named_parameters(recurse=False) if v is not None}
        if all(k in plain for k in keys.values()):
            continue
        stacked = {p: torch.stack([g[k].to(torch.float32) for g in groups]) for p, k in keys.items()}
        covered.update(keys.values())
        if isinstance(mod, nn.Linear):
            new = RoutedLinear(router, stacked)
        elif isinstance(mod, nn.LayerNorm):
            new = RoutedLayerNorm(router, stacked, mod.eps, mod.normalized_shape)
        else:
            new = RoutedEmbedding(router, stacked)
        parent, _, attr = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, attr, new)
    missing = [k for k, _ in model.named_parameters() if k not in covered]
    if missing:
        raise MergeError(f"routed forward: parameters {missing[:3]} are in no routable layer; "
                         "this fallback handles Linear, LayerNorm and Embedding only")
    if plain:
        out.load_state_dict(plain, strict=False)
    return out, router
