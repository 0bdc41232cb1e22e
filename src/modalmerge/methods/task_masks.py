"""TALL masks (spec 6), shared by TALL, consensus merging and MMER's decoupling: a shared vector
τ_MTL and per task a binary mask m_t = 1{|τ_t| ≥ λ_t·|τ_MTL − τ_t|}."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from .. import ops
from .base import Merged, Params, Statistic, Stats, TensorGroup
from .sign_election import TiesParams, ties_vector
from .statistics import TaskMagnitudes


class TallParams(Params):
    per_model = frozenset({"lambda", "density"})

    lam: float = Field(0.6, alias="lambda", ge=0,
                       description="mask threshold λ_t (per model; 0.2-0.6 tuned on validation, 0.6 without)")
    shared: Literal["sum", "ties"] = Field("sum", description="shared vector: sum of task vectors, or unscaled "
                                                              "TIES with disjoint sum")
    density: float = Field(0.2, gt=0, le=1, description="shared: ties only: kept fraction of each task vector")
    scope: Literal["global", "tensor"] = Field("global", description="shared: ties only: trim threshold scope")


def ties_params(p: TallParams) -> TiesParams:
    """The TIES settings of a `shared: ties` vector: unscaled, disjoint sum."""
    return TiesParams.model_validate({"density": p.density, "scope": p.scope, "aggregate": "sum", "lambda": 1.0})


def shared_vector(group: TensorGroup, p: TallParams, stats: Stats, taus: torch.Tensor) -> torch.Tensor:
    """τ_MTL for this chunk, from the task vectors `taus` (left unchanged)."""
    if p.shared == "sum":
        return ops.weighted_sum(taus, group.weights)
    return ties_vector(group, ties_params(p), stats, deltas=taus.clone())


def tall_masks(taus: torch.Tensor, shared: torch.Tensor, lambdas: list[float]) -> torch.Tensor:
    """m_t = 1{|τ_t| ≥ λ_t·|τ_MTL − τ_t|}, stacked [T, ...] bool."""
    lam = torch.tensor(lambdas, dtype=taus.dtype, device=taus.device).reshape((-1,) + (1,) * (taus.dim() - 1))
    return taus.abs() >= lam * (shared.unsqueeze(0) - taus).abs()


def masked_merge(group: TensorGroup, taus: torch.Tensor, shared: torch.Tensor, lambdas: list[float]) -> Merged:
    """TALL masks of `shared` (MMER's decoupling too): text weights θ_0 + m̄ ⊙ shared, the shared
    vector, and one mask per model."""
    masks = tall_masks(taus, shared, lambdas)
    mean_mask = masks.to(torch.float32).mean(dim=0)
    return Merged(group.base + mean_mask * shared, shared=shared,
                  masks={name: masks[t] for t, name in enumerate(group.model_names)})


def shared_statistics(p: TallParams) -> list[Statistic]:
    if p.shared == "ties" and p.scope == "global":
        return [TaskMagnitudes()]
    return []


def shared_chunkable(p: TallParams, info) -> bool:
    # a per-tensor TIES trim needs the whole tensor; everything else is element-wise
    return p.shared == "sum" or p.scope == "global"
