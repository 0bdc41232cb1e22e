"""RAM and RAM+ (Reinforced Agent Merging, arXiv 2601.13572), as mergekit 0.1.5's `ram` and
`ramplus_tl` compute them: average task vectors only where they overlap.

With task vectors τ_t = θ_t − θ_0, an entry of τ_t counts when |τ_t| > `epsilon` (others are
dropped), and c = the number of models that count there:
  ram         θ = θ_0 + Σ_t τ_t·1{counts} / max(c, 1): an entry only one model changed keeps that
              model's change whole; where several did, their mean; the recipe weights are not used.
  ramplus_tl  the same, but model t's unique entries (c = 1) are scaled by
              λ_t = 1 + r·clamp(ρ_t, 0, α), ρ_t = (its shared entries, c > 1) / max(its unique
              entries, epsilon), counted over the whole tensor ("tensor-local"): a model whose
              changes mostly overlap others' has its few unique ones amplified, by up to 1 + r·α.

ram is elementwise, so a tensor may be cut into row blocks; ramplus_tl's counts are over the
whole tensor, so it is not. The arithmetic is mergekit's, step for step, in float32.
"""

import torch
from pydantic import Field

from .base import Merged, MergekitForm, Method, Params, Stats, TensorGroup


class RamParams(Params):
    epsilon: float = Field(1e-5, description="an entry of a task vector counts when its |value| exceeds this")


class RamPlusParams(Params):
    r: float = Field(0.1, description="gain on the unique entries' amplification: λ = 1 + r·clamp(ρ, 0, alpha)")
    alpha: float = Field(0.2, description="cap on ρ, a model's shared / unique entry ratio")
    # > 0: it also floors the unique count ρ divides by (0 would give NaN for an unchanged tensor)
    epsilon: float = Field(1e-5, gt=0, description="an entry of a task vector counts when its |value| exceeds "
                                                   "this; also the floor of the unique count")


def overlap_masks(deltas: torch.Tensor, epsilon: float):
    """For task vectors flattened [T, n]: which entries count (|τ| > epsilon), how many models
    count at each entry [1, n], and where that is more than one model (overlap) or one (unique)."""
    counts_here = deltas.abs() > epsilon
    contributors = counts_here.sum(dim=0, keepdim=True)
    return counts_here, contributors, contributors > 1, contributors == 1


def ram(group: TensorGroup, p: RamParams, stats: Stats) -> Merged:
    deltas = group.task_vectors().reshape(group.num_models, -1)
    counts_here, contributors, overlap, unique = overlap_masks(deltas, p.epsilon)
    kept = deltas * counts_here
    merged = ((kept * unique) + (kept * overlap / contributors.clamp(min=1))).sum(dim=0, keepdim=True)
    return Merged(group.base + merged.reshape_as(group.base))


def ramplus_tl(group: TensorGroup, p: RamPlusParams, stats: Stats) -> Merged:
    deltas = group.task_vectors().reshape(group.num_models, -1)
    # two passes over column blocks of the task vectors, so that the masks and products are
    # [T, block], not [T, n] each (a 32k-vocabulary embedding of 8 models is 1 GB per such
    # temporary); the counts are exact integers and the rest is elementwise: the same result
    blocks = [slice(start, start + _BLOCK) for start in range(0, deltas.shape[1], _BLOCK)]
    shared_entries = torch.zeros(group.num_models, dtype=torch.int64, device=deltas.device)
    unique_entries = torch.zeros_like(shared_entries)
    for block in blocks:
        counts_here, _, overlap, unique = overlap_masks(deltas[:, block], p.epsilon)
        shared_entries += (counts_here & overlap).sum(dim=1)
        unique_entries += (counts_here & unique).sum(dim=1)
    ratio = shared_entries / unique_entries.clamp(min=p.epsilon)
    amplification = (1 + p.r * ratio.clamp(min=0, max=p.alpha)).unsqueeze(-1)
    merged = torch.empty(deltas.shape[1], dtype=deltas.dtype, device=deltas.device)
    for block in blocks:
        counts_here, contributors, overlap, unique = overlap_masks(deltas[:, block], p.epsilon)
        kept = deltas[:, block] * counts_here
        merged[block] = ((kept * unique * amplification) + (kept * overlap / contributors.clamp(min=1))).sum(dim=0)
    return Merged(group.base + merged.reshape_as(group.base))


# entries per model in one step of ramplus_tl's passes
_BLOCK = 1 << 22


RAM = Method(
    "ram", ram, RamParams,
    summary="Per entry, the mean of the task vectors that change it by more than epsilon (one model's change "
            "kept whole), added to the base.",
    weighted=False,
    mergekit=(MergekitForm("ram"),),
)

RAMPLUS_TL = Method(
    "ramplus_tl", ramplus_tl, RamPlusParams,
    summary="RAM with each model's unique changes scaled up by 1 + r*clamp(shared/unique, 0, alpha), counted per "
            "tensor.",
    weighted=False,
    chunkable=lambda p, info: False,  # the shared / unique counts are over the whole tensor
    mergekit=(MergekitForm("ramplus_tl"),),
)
