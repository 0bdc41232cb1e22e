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
from .base import Merged, MergekitForm, Method, Params, Stats, TensorGroup
from .combine import elected_merge, linear_merge
from .drop_rescale import Rescale, drop_and_rescale
from .statistics import TaskMagnitudes


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


def dare_linear(group: TensorGroup, p: DareLinearParams, stats: Stats) -> Merged:
    deltas = drop_and_rescale(group, group.task_vectors(), group.per_model(p, "density"), p.rescale)
    return linear_merge(group, deltas, p.lam, p.normalize)


def dare_ties_deltas(group: TensorGroup, p: DareTiesParams, stats: Stats) -> torch.Tensor:
    """The sparse task vectors DARE-TIES elects on: optional TIES trim, then the random drop."""
    deltas = group.task_vectors()
    if p.trim:
        trim_densities = group.per_model(p, "trim_density")
        if all(d >= 1 for d in trim_densities):
            pass
        elif p.scope == "global":
            ops.trimmed_merge.trim_(deltas, stats.get(TaskMagnitudes).thresholds)
        else:
            deltas = ops.trimmed_merge.trim_per_tensor_(deltas, trim_densities)
    return drop_and_rescale(group, deltas, group.per_model(p, "density"), p.rescale)


def dare_ties(group: TensorGroup, p: DareTiesParams, stats: Stats) -> Merged:
    return elected_merge(group, dare_ties_deltas(group, p, stats), p.lam, p.aggregate, p.tie)


DARE_LINEAR = Method(
    "dare_linear", dare_linear, DareLinearParams,
    summary="Drop task-vector entries at random, rescale the rest, add their weighted sum to the base.",
    # an L1 rescale needs each whole tensor's norms
    chunkable=lambda p, info: p.rescale != "l1",
    mergekit=(MergekitForm("dare_linear", defaults={"normalize": False, "lambda": 1.0, "density": 1.0,
                                                    "rescale": True}, rescale=True, weight_required=True),),
)

DARE_TIES = Method(
    "dare_ties", dare_ties, DareTiesParams,
    summary="DARE's random drop and rescale, then TIES's sign election and disjoint merge.",
    statistics=lambda p: [TaskMagnitudes("trim_density")] if p.trim and p.scope == "global" else [],
    chunkable=lambda p, info: p.rescale != "l1" and not (p.trim and p.scope == "tensor"),
    mergekit=(MergekitForm("dare_ties", defaults={"normalize": False, "lambda": 1.0, "density": 1.0,
                                                  "rescale": True}, electing=True, rescale=True,
                          weight_required=True),),
)
