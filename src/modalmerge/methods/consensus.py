"""Consensus merging (spec 6): keep the entries of τ_MTL that at least `min_agree` TALL masks
keep, dropping "selfish" (one task) and "catastrophic" (no task) weights; one model out.

θ = θ_0 + α·(1{Σ_t m_t ≥ k} ⊙ τ_MTL), with the TALL masks m_t of `task_masks.py` (same λ).
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..errors import MergeError
from .base import Merged, Method, Stats, TensorGroup
from .task_masks import TallParams, shared_chunkable, shared_statistics, shared_vector, tall_masks

# α without validation data (spec 6): 1.0 on a TIES vector; 0.3-0.4 on a plain sum, where we take
# 0.3, task arithmetic's default λ here, since both scale the same summed task vectors.
DEFAULT_ALPHA = {"ties": 1.0, "sum": 0.3}


class ConsensusParams(TallParams):
    min_agree: int = Field(2, ge=1, description="keep entries that at least this many task masks keep")
    alpha: float | None = Field(None, description="scale of the kept vector (default 1.0 with shared: ties, "
                                                  "0.3 with shared: sum)")

    @property
    def scale(self) -> float:
        return DEFAULT_ALPHA[self.shared] if self.alpha is None else self.alpha


def consensus(group: TensorGroup, p: ConsensusParams, stats: Stats) -> Merged:
    if p.min_agree > group.num_models:
        raise MergeError(f"consensus: min_agree {p.min_agree} is more than the {group.num_models} models, so "
                         f"every entry of tensor {group.name!r} would be dropped; lower min_agree")
    taus = group.task_vectors()
    shared = shared_vector(group, p, stats, taus)
    masks = tall_masks(taus, shared, group.per_model(p, "lambda"))
    keep = masks.sum(dim=0) >= p.min_agree
    return Merged(group.base + p.scale * (keep.to(torch.float32) * shared))


CONSENSUS = Method(
    "consensus", consensus, ConsensusParams,
    summary="Consensus merging: keep the parts of the summed (or TIES) task vector that several TALL masks keep.",
    min_models=2,
    statistics=shared_statistics,
    chunkable=shared_chunkable,
)
