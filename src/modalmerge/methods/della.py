"""DELLA / MAGPRUNE (spec 3): magnitude-ranked random drop per row, then TIES election.

Per row of each task vector (the whole tensor for 1-D), rank |τ| ascending, r ∈ [0, 1] the
normalised rank; keep with probability p_i = (density − ε) + 2ε·r, so larger entries survive
more often; survivors ÷ p_i. `della` then elects signs and takes the disjoint merge;
`della_linear` (mergekit's) adds the weighted sum instead.

Rows are independent, so a tensor of 2 or more dimensions may be cut into row blocks; the random
draws come from `TensorGroup.uniform` and do not depend on the cut.
"""

from typing import Literal

import torch
from pydantic import Field, ValidationInfo, field_validator

from .base import Merged, MergekitForm, Method, Params, Stats, TensorGroup
from .combine import elected_merge, linear_merge
from .drop_rescale import Rescale, rescale_survivors


class _MagpruneParams(Params):
    per_model = frozenset({"density", "epsilon"})

    density: float = Field(0.5, gt=0, le=1, description="mean kept fraction of each task vector (1: keep all)")
    # validate_default: the range check below must also run when only density is given
    epsilon: float = Field(0.15, ge=0, lt=1, validate_default=True,
                           description="keep probabilities spread over density ± epsilon by rank")
    rescale: Rescale = Field("inverse", description="survivors × 1/p_i (inverse, the paper), match each tensor's "
                                                    "L1 norm (l1, current mergekit), or none")

    @field_validator("epsilon")
    @classmethod
    def _inside_unit_interval(cls, v: float, info: ValidationInfo) -> float:
        density = info.data.get("density")
        # density 1 keeps everything (mergekit's default), whatever epsilon says
        if density is not None and density < 1 and not (density - v > 0 and density + v < 1):
            raise ValueError(f"density ± epsilon must lie inside (0, 1), got density {density} and epsilon {v}; "
                             "lower epsilon or move density towards 0.5")
        return v


class DellaParams(_MagpruneParams):
    aggregate: Literal["mean", "sum", "max"] = Field("mean", description="disjoint mean, sum or max of agreeing values")
    tie: Literal["tensor", "positive"] = Field("tensor", description="sign where the sum is exactly 0: the "
                                               "tensor total's, or + (mergekit)")
    lam: float = Field(1.0, alias="lambda", description="scale of the merged task vector")


class DellaLinearParams(_MagpruneParams):
    lam: float = Field(0.3, alias="lambda", description="scale of the summed task vectors")
    normalize: bool = Field(False, description="divide the weights by their sum first")


def row_ranks(mag: torch.Tensor) -> torch.Tensor:
    """Ascending rank of each entry within its row, normalised to [0, 1] (ties in index order).

    A one-entry row gets the middle rank 0.5, so it is kept with probability `density`.
    """
    n = mag.shape[-1]
    if n == 1:
        return torch.full_like(mag, 0.5)
    order = torch.argsort(mag, dim=-1, stable=True)
    ranks = torch.empty_like(mag)
    ranks.scatter_(-1, order, torch.arange(n, dtype=mag.dtype, device=mag.device).expand(mag.shape).contiguous())
    return ranks / (n - 1)


def magprune(group: TensorGroup, deltas: torch.Tensor, p: _MagpruneParams) -> torch.Tensor:
    """MAGPRUNE on each task vector (in place)."""
    rows = deltas.shape[1] if len(group.info.shape) >= 2 else 1  # 1-D and scalars: one row
    for t, (density, eps) in enumerate(zip(group.per_model(p, "density"), group.per_model(p, "epsilon"))):
        if density >= 1:
            continue
        tau = deltas[t].reshape(rows, -1)
        keep_prob = (density - eps) + 2 * eps * row_ranks(tau.abs())
        keep = group.uniform(t).reshape(rows, -1) < keep_prob
        pruned = rescale_survivors(tau * keep, tau, keep_prob, p.rescale)
        deltas[t] = pruned.reshape(deltas[t].shape)
    return deltas


def della(group: TensorGroup, p: DellaParams, stats: Stats) -> Merged:
    return elected_merge(group, magprune(group, group.task_vectors(), p), p.lam, p.aggregate, p.tie)


def della_linear(group: TensorGroup, p: DellaLinearParams, stats: Stats) -> Merged:
    return linear_merge(group, magprune(group, group.task_vectors(), p), p.lam, p.normalize)


def _chunkable(p: _MagpruneParams, info) -> bool:
    # rows are ranked on their own; a 1-D tensor is one row, and an L1 rescale needs whole tensors
    return len(info.shape) >= 2 and p.rescale != "l1"


DELLA = Method(
    "della", della, DellaParams,
    summary="Drop task-vector entries at random, larger ones less often (per row), then TIES's election.",
    chunkable=_chunkable,
    mergekit=(MergekitForm("della", defaults={"normalize": True, "lambda": 1.0, "density": 1.0, "epsilon": 0.15,
                                              "rescale": True}, electing=True, rescale=True,
                           weight_required=True),),
)

DELLA_LINEAR = Method(
    "della_linear", della_linear, DellaLinearParams,
    summary="DELLA's magnitude-ranked random drop, then the weighted sum of the task vectors.",
    chunkable=_chunkable,
    mergekit=(MergekitForm("della_linear", defaults={"normalize": False, "lambda": 1.0, "density": 1.0,
                                                     "epsilon": 0.15, "rescale": True}, rescale=True,
                           weight_required=True),),
)
