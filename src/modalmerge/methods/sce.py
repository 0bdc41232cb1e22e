"""SCE (Select, Calculate, Erase; arXiv 2408.07990), as mergekit 0.1.5's `sce` computes it.

For each tensor, with task vectors τ_t = θ_t − θ_0 (the recipe's model weights are not used):
  select     with `select_topk` < 1, keep the entries whose variance over the models (population
             variance) is among the top int(select_topk · n) of the n entries of non-zero
             variance, in every τ_t; zero the rest;
  calculate  w_t = mean(τ_t²) / Σ_s mean(τ_s²) over the whole tensor; equal weights 1/T when
             the sum is below 1e-6 (mergekit's rule, so tiny task vectors are averaged);
  erase      elect the sign of Σ_t τ_t per entry and drop the values of the other sign;
  θ = θ_0 + Σ_agree w_t τ_t / max(Σ_agree w_t, 1e-6).

The selection and the weights need the whole tensor, so a tensor is never cut into row blocks.
Variances tied with the k-th largest are all kept (mergekit's top-k then keeps an arbitrary k of
them). `tie`: the sign where Σ_t τ_t is exactly 0: the tensor total's (spec 0) or +
(mergekit's, set when a mergekit recipe is translated).
"""

from typing import Literal

import torch
from pydantic import Field

from .. import ops
from .base import Merged, MergekitForm, Method, Params, Stats, TensorGroup

# mergekit's floors: the weights' sum below which they are equal, the agreeing weights' divisor
_WEIGHT_SUM_FLOOR = 1e-6
_DIVISOR_FLOOR = 1e-6


class SceParams(Params):
    select_topk: float = Field(1.0, ge=0, le=1, description="fraction of entries kept, those of largest variance "
                                                            "over the models (1: all)")
    tie: Literal["tensor", "positive"] = Field("tensor", description="sign where the sum is exactly 0: the "
                                               "tensor total's, or + (mergekit)")


def variance_mask(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """1 where an entry's variance over the models is among the top int(fraction · n) of the n
    non-zero variances (ties with the k-th largest kept), else 0; shaped like one task vector."""
    if fraction >= 1:
        return torch.ones_like(deltas[0])
    if fraction <= 0:
        return torch.zeros_like(deltas[0])
    var = deltas.var(dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * fraction)
    if k == 0:
        return torch.zeros_like(var)
    flat = var.reshape(-1)
    # the k-th largest of n is the (n − k + 1)-th smallest; k ≤ the non-zero count, so it is > 0
    edge = flat.kthvalue(flat.numel() - k + 1).values
    return (var >= edge).to(var.dtype)


def sce_weights(deltas: torch.Tensor) -> torch.Tensor:
    """w_t = mean(τ_t²) / Σ_s mean(τ_s²), or 1/T each when that sum is below 1e-6."""
    energy = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = float(energy.sum())
    if abs(total) < _WEIGHT_SUM_FLOOR:
        return torch.full_like(energy, 1.0 / energy.shape[0])
    return energy / total


def sce(group: TensorGroup, p: SceParams, stats: Stats) -> Merged:
    deltas = group.task_vectors()
    if p.select_topk < 1:
        deltas.mul_(variance_mask(deltas, p.select_topk).unsqueeze(0))
    total = deltas.sum(dim=0)
    tie = 1.0 if p.tie == "positive" else group.election.tie_sign(total)
    # erase: keep the values whose sign is the elected one (zeros never agree)
    agree = (deltas.sign() == ops.elect_sign(deltas, tie, total)).to(deltas.dtype)
    weights = sce_weights(deltas).reshape((-1,) + (1,) * (deltas.dim() - 1)) * agree
    merged = (deltas * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=_DIVISOR_FLOOR)
    return Merged(group.base + merged)


SCE = Method(
    "sce", sce, SceParams,
    summary="Keep the entries the models vary most on, weight each task vector by its energy, erase minority "
            "signs, average.",
    chunkable=lambda p, info: False,  # the top-k and the weights are over the whole tensor
    weighted=False,
    mergekit=(MergekitForm("sce", defaults={"select_topk": 1.0}, native={"tie": "positive"}),),
)
