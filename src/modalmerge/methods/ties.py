"""TIES-merging (spec 2): trim each task vector, elect signs by mass, disjoint-merge, scale."""

from typing import Literal

import torch
from pydantic import Field

from .. import ops
from .base import Merged, Method, Params, TensorGroup
from .statistics import TaskMagnitudes, trim_global, trim_per_tensor


class TiesParams(Params):
    per_model = frozenset({"density"})

    density: float = Field(0.2, gt=0, le=1, description="kept fraction of each task vector")
    scope: Literal["global", "tensor"] = Field("global", description="trim threshold over the whole model or per tensor")
    aggregate: Literal["mean", "sum", "max"] = Field("mean", description="disjoint mean, sum or max of agreeing values")
    lam: float = Field(1.0, alias="lambda", description="scale of the merged task vector")
    # mergekit's conventions, set when a mergekit recipe is translated
    tie: Literal["tensor", "positive"] = Field("tensor", description="sign where the sum is exactly 0: the tensor total's, or + (mergekit)")
    keep_min: int = Field(0, ge=0, description="scope tensor: keep at least this many entries per task vector (mergekit: 1)")


def trimmed_weighted_deltas(group: TensorGroup, p: TiesParams, stats: dict) -> torch.Tensor:
    """w_t · trim(τ_t), stacked: the input of TIES's election (shared with DARE-TIES, MMER, ...)."""
    deltas = group.task_vectors()
    densities = group.per_model(p, "density")
    if all(d >= 1 for d in densities):
        pass
    elif p.scope == "global":
        trim_global(deltas, stats["magnitudes"].thresholds)
    else:
        deltas = trim_per_tensor(deltas, densities, p.keep_min)
    return deltas * group.weights.reshape((-1,) + (1,) * (deltas.dim() - 1))


def tie_sign(group: TensorGroup, weighted: torch.Tensor) -> float:
    """Sign for exact zero sums: the sign of the tensor's total (spec 0), ties to +."""
    total = group.tensor_total if group.tensor_total is not None else ops.deterministic_sum(weighted)
    return 1.0 if total >= 0 else -1.0


def ties_vector(group: TensorGroup, p: TiesParams, stats: dict) -> torch.Tensor:
    """The merged task vector τ_m before λ."""
    weighted = trimmed_weighted_deltas(group, p, stats)
    tie = 1.0 if p.tie == "positive" else tie_sign(group, weighted)
    return ops.elect_and_merge(weighted, p.aggregate, tie, group.weights)


def ties(group: TensorGroup, p: TiesParams, stats: dict) -> Merged:
    return Merged(group.base + p.lam * ties_vector(group, p, stats))


def ties_prepass(group: TensorGroup, p: TiesParams, stats: dict) -> float:
    return ops.deterministic_sum(trimmed_weighted_deltas(group, p, stats))


def ties_statistics(p: TiesParams) -> list:
    return [TaskMagnitudes()] if p.scope == "global" else []


TIES = Method(
    "ties", ties, TiesParams,
    summary="Trim each task vector, elect signs by mass, average the agreeing values.",
    statistics=ties_statistics,
    prepass=lambda group, p, stats: ties_prepass(group, p, stats) if p.tie == "tensor" else 0.0,
    chunkable=lambda p, info: p.scope == "global",
    mergekit_names=("ties",),
)
