"""TIES's machinery (spec 2), shared by every method that trims and elects: the trim (global
thresholds from a statistics pass, or per tensor), sign election with the tensor-level tie rule,
and the disjoint merge. TIES, DARE-TIES, DELLA, TALL and consensus (shared: ties), NeuroMerging
and MMER use it; the arithmetic is ops.trimmed_merge's and ops.election's.
"""

from typing import Literal

import torch
from pydantic import Field

from .. import ops
from .base import Params, Statistic, Stats, TensorGroup
from .statistics import TaskMagnitudes


class TiesParams(Params):
    per_model = frozenset({"density"})

    density: float = Field(0.2, gt=0, le=1, description="kept fraction of each task vector")
    scope: Literal["global", "tensor"] = Field("global", description="trim threshold over the whole model or per tensor")
    aggregate: Literal["mean", "sum", "max"] = Field("mean", description="disjoint mean, sum or max of agreeing values")
    lam: float = Field(1.0, alias="lambda", description="scale of the merged task vector")
    # mergekit's conventions, set when a mergekit recipe is translated
    tie: Literal["tensor", "positive"] = Field("tensor", description="sign where the sum is exactly 0: the "
                                               "tensor total's, or + (mergekit)")
    keep_min: int = Field(0, ge=0, description="scope tensor: keep at least this many entries per task vector "
                                               "(mergekit: 1)")


def ties_statistics(p: TiesParams) -> list[Statistic]:
    return [TaskMagnitudes()] if p.scope == "global" else []


def trim_thresholds(group: TensorGroup, p: Params, stats: Stats) -> ops.trimmed_merge.Thresholds:
    """The trim of a TIES-style `p` (density, scope, keep_min) in this block: None where every
    density is 1, the statistics pass's global thresholds, the engine's per-tensor ones (a tensor
    merged in row blocks), or each model's own top-k in this block."""
    densities = group.per_model(p, "density")
    if all(d >= 1 for d in densities):
        return None
    if getattr(p, "scope", "global") == "global":
        return stats.get(TaskMagnitudes).thresholds
    if group.tensor_stats is not None:
        return group.tensor_stats  # this tensor's own thresholds
    return ops.trimmed_merge.OwnTopK(densities, getattr(p, "keep_min", 0))


def trimmed_weighted_deltas(group: TensorGroup, p: Params, stats: Stats,
                            deltas: torch.Tensor | None = None) -> torch.Tensor:
    """w_t · trim(τ_t), stacked: the input of TIES's election (NeuroMerging, MMER, ...).

    Works in place on `deltas` when given (the caller's own copy of the task vectors); else on
    a new copy of the group's task vectors.
    """
    deltas = group.task_vectors() if deltas is None else deltas
    thresholds = trim_thresholds(group, p, stats)
    if isinstance(thresholds, ops.trimmed_merge.OwnTopK):
        deltas = ops.trimmed_merge.trim_per_tensor_(deltas, thresholds.densities, thresholds.keep_min)
    elif thresholds is not None:
        ops.trimmed_merge.trim_(deltas, thresholds)
    return ops.trimmed_merge.weight_(deltas, group.weights)


def elect_merge(group: TensorGroup, weighted: torch.Tensor, aggregate: str, key: str = "elect",
                tie: str = "tensor") -> torch.Tensor:
    """Sign election with the tensor-level tie rule (or + for `tie: positive`, mergekit's), then
    the disjoint aggregate.

    Uses `weighted` as scratch space: the caller must not need it afterwards.
    """
    if tie == "positive":
        return ops.trimmed_merge.elect_merge_(weighted, aggregate, 1.0, group.weights)[1]
    total, merged = ops.trimmed_merge.elect_merge_(weighted, aggregate, group.election.rule(key), group.weights)
    group.election.settle(total, merged, key)
    return merged


def ties_vector(group: TensorGroup, p: TiesParams, stats: Stats, deltas: torch.Tensor | None = None) -> torch.Tensor:
    """The merged task vector τ_m before λ, on float32 task vectors (see trimmed_weighted_deltas
    for `deltas`)."""
    return elect_merge(group, trimmed_weighted_deltas(group, p, stats, deltas), p.aggregate, tie=p.tie)


def stored_ties_vector(group: TensorGroup, p: TiesParams, stats: Stats) -> torch.Tensor:
    """ties_vector from the block's inputs as stored, through ops.trimmed_merge (the C kernels
    where they can run): the group's float32 stack is never built when the engine did not."""
    tie = 1.0 if p.tie == "positive" else group.election.rule("elect")
    total, merged = ops.trimmed_merge.trimmed_merge(group.inputs(), trim_thresholds(group, p, stats),
                                                    group.weights, p.aggregate, tie)
    if p.tie != "positive":
        group.election.settle(total, merged, "elect")
    return merged


def tensor_threshold(p: TiesParams, info, base, model, model_params, fused: bool) -> float:
    """scope: tensor: the model's own top-k threshold in this tensor, k = int(density · numel)
    (mergekit's per-tensor magnitude selection; ties at the edge are kept). `fused`: the engine
    lets the C kernels read the stored tensors."""
    density = model_params.get("density", p.density)
    if density >= 1:
        return 0.0
    inputs = ops.trimmed_merge.Inputs(base, [model], tuple(model.shape), c_kernels=fused)
    return ops.trimmed_merge.tensor_thresholds(inputs, [density], p.keep_min)[0]
