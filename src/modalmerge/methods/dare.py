"""DARE (spec 3): drop each task-vector entry at random, rescale the survivors, then merge.

`dare_linear` adds the weighted sum of the dropped-and-rescaled task vectors to the base (task
arithmetic); `dare_ties` elects signs and takes the disjoint merge (TIES steps 2-3), with TIES's
magnitude trim before the drop when `trim` is on.

`density` is the kept fraction 1 − p (p the drop probability of the paper), as in mergekit and
as `density` means everywhere else here. The random mask comes from `TensorGroup.uniform`, so it
is the same under any chunking, order or thread count.
"""

from typing import Literal

import torch
from pydantic import Field

from .. import ops
from .base import Merged, Method, Params, TensorGroup
from .statistics import TaskMagnitudes, trim_global, trim_per_tensor
from .ties import elect_merge

Rescale = Literal["inverse", "l1", "none"]

# mergekit's guard: a norm this small is not rescaled to (nothing meaningful to match)
_L1_EPS = 1e-7


class DareLinearParams(Params):
    per_model = frozenset({"density"})

    density: float = Field(0.5, gt=0, le=1, description="kept fraction of each task vector (1 − drop probability)")
    rescale: Rescale = Field("inverse", description="survivors × 1/density (inverse, the paper), match each "
                                                    "tensor's L1 norm (l1, current mergekit), or none")
    lam: float = Field(0.3, alias="lambda", description="scale of the summed task vectors")
    normalize: bool = Field(False, description="divide the weights by their sum first")


class DareTiesParams(Params):
    per_model = frozenset({"density", "trim_density"})

    density: float = Field(0.5, gt=0, le=1, description="kept fraction of each task vector (1 − drop probability)")
    rescale: Rescale = Field("inverse", description="survivors × 1/density (inverse, the paper), match each "
                                                    "tensor's L1 norm (l1, current mergekit), or none")
    aggregate: Literal["mean", "sum", "max"] = Field("mean", description="disjoint mean, sum or max of agreeing values")
    tie: Literal["tensor", "positive"] = Field("tensor", description="sign where the sum is exactly 0: the "
                                               "tensor total's, or + (mergekit)")
    lam: float = Field(1.0, alias="lambda", description="scale of the merged task vector")
    trim: bool = Field(False, description="TIES magnitude trim before the drop (FusionBench); off: mergekit's dare_ties")
    trim_density: float = Field(0.2, gt=0, le=1, description="kept fraction of the trim, when `trim` is on")
    scope: Literal["global", "tensor"] = Field("global", description="trim threshold over the whole model or per tensor")


def l1_match(pruned: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Scale `pruned` so its L1 norm equals `original`'s (whole tensor; mergekit's RescaleNorm.l1)."""
    before = ops.deterministic_sum(original.abs())
    after = ops.deterministic_sum(pruned.abs())
    if before < _L1_EPS or after < _L1_EPS:
        return pruned
    return pruned * (before / after)


def rescale_survivors(pruned: torch.Tensor, original: torch.Tensor, keep_prob, rescale: str) -> torch.Tensor:
    """Undo the shrinkage of a random drop: ÷ keep probability (a number or per element), or L1 match."""
    if rescale == "inverse":
        return pruned / keep_prob
    if rescale == "l1":
        return l1_match(pruned, original)
    return pruned


def drop_and_rescale(group: TensorGroup, deltas: torch.Tensor, densities: list[float], rescale: str) -> torch.Tensor:
    """DARE on each task vector (in place): keep with probability density, rescale the survivors."""
    for t, density in enumerate(densities):
        if density >= 1:
            continue  # nothing dropped, nothing to rescale (mergekit does the same)
        keep = group.uniform(t) < density
        deltas[t] = rescale_survivors(deltas[t] * keep, deltas[t], density, rescale)
    return deltas


def weighted(group: TensorGroup, deltas: torch.Tensor) -> torch.Tensor:
    """w_t · x_t, stacked."""
    return deltas * group.weights_like(deltas)


def linear_merge(group: TensorGroup, deltas: torch.Tensor, lam: float, normalize: bool) -> Merged:
    """θ_0 + λ Σ_t w_t x_t (weights ÷ their sum when normalising)."""
    w = group.weights / group.weights.sum() if normalize else group.weights
    return Merged(group.base + lam * ops.weighted_sum(deltas, w))


def ties_merge(group: TensorGroup, deltas: torch.Tensor, lam: float, aggregate: str, tie: str = "tensor") -> Merged:
    """θ_0 + λ · elect-and-disjoint-merge of w_t x_t (TIES steps 2-4, on already sparse vectors)."""
    return Merged(torch.add(group.base, elect_merge(group, weighted(group, deltas), aggregate, tie=tie), alpha=lam))


def dare_linear(group: TensorGroup, p: DareLinearParams, stats: dict) -> Merged:
    deltas = drop_and_rescale(group, group.task_vectors(), group.per_model(p, "density"), p.rescale)
    return linear_merge(group, deltas, p.lam, p.normalize)


def dare_ties_deltas(group: TensorGroup, p: DareTiesParams, stats: dict) -> torch.Tensor:
    """The sparse task vectors DARE-TIES elects on: optional TIES trim, then the random drop."""
    deltas = group.task_vectors()
    if p.trim:
        trim_densities = group.per_model(p, "trim_density")
        if all(d >= 1 for d in trim_densities):
            pass
        elif p.scope == "global":
            trim_global(deltas, stats["magnitudes"].thresholds)
        else:
            deltas = trim_per_tensor(deltas, trim_densities)
    return drop_and_rescale(group, deltas, group.per_model(p, "density"), p.rescale)


def dare_ties(group: TensorGroup, p: DareTiesParams, stats: dict) -> Merged:
    return ties_merge(group, dare_ties_deltas(group, p, stats), p.lam, p.aggregate, p.tie)


DARE_LINEAR = Method(
    "dare_linear", dare_linear, DareLinearParams,
    summary="Drop task-vector entries at random, rescale the rest, add their weighted sum to the base.",
    # an L1 rescale needs each whole tensor's norms
    chunkable=lambda p, info: p.rescale != "l1",
    mergekit_names=("dare_linear",),
)

DARE_TIES = Method(
    "dare_ties", dare_ties, DareTiesParams,
    summary="DARE's random drop and rescale, then TIES's sign election and disjoint merge.",
    statistics=lambda p: [TaskMagnitudes("trim_density")] if p.trim and p.scope == "global" else [],
    chunkable=lambda p, info: p.rescale != "l1" and not (p.trim and p.scope == "tensor"),
    mergekit_names=("dare_ties",),
)
