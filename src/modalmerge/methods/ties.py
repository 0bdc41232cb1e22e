"""TIES-merging (spec 2): trim each task vector, elect signs by mass, disjoint-merge, scale."""

from typing import Literal

import torch
from pydantic import Field

from .. import ops
from .base import Merged, Method, Params, TensorGroup
from .statistics import TaskMagnitudes, per_tensor_thresholds, top_k_thresholds, trim_global, trim_per_tensor


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


def trimmed_weighted_deltas(group: TensorGroup, p: TiesParams, stats: dict,
                            deltas: torch.Tensor | None = None) -> torch.Tensor:
    """w_t · trim(τ_t), stacked: the input of TIES's election (shared with DARE-TIES, MMER, ...).

    Works in place on `deltas` when given (the caller's own copy of the task vectors); otherwise
    consumes the group's models stack, computing the task vectors in its place.
    """
    deltas = group.take_task_vectors() if deltas is None else deltas
    densities = group.per_model(p, "density")
    if all(d >= 1 for d in densities):
        pass
    elif getattr(p, "scope", "global") == "global":
        trim_global(deltas, stats["magnitudes"].thresholds)
    elif group.tensor_stats is not None:
        trim_global(deltas, group.tensor_stats)  # this tensor's own thresholds
    else:
        deltas = trim_per_tensor(deltas, densities, p.keep_min)
    if not bool((group.weights == 1).all()):
        deltas.mul_(group.weights_like(deltas))
    return deltas


def elect_merge(group: TensorGroup, weighted: torch.Tensor, aggregate: str, key: str = "elect",
                tie: str = "tensor") -> torch.Tensor:
    """Sign election with the tensor-level tie rule (or + for `tie: positive`, mergekit's), then
    the disjoint aggregate.

    Uses `weighted` as scratch space: the caller must not need it afterwards.
    """
    total = weighted.sum(dim=0)
    if tie == "positive":
        gamma = ops.elect_sign(weighted, 1.0, total)
        return ops.disjoint_merge(weighted, gamma, aggregate, group.weights, inplace=True)
    gamma = ops.elect_sign(weighted, group.tie_sign(total, key), total)
    merged = ops.disjoint_merge(weighted, gamma, aggregate, group.weights, inplace=True)
    group.settle_ties(total, merged, key)
    return merged


def ties_vector(group: TensorGroup, p: TiesParams, stats: dict, deltas: torch.Tensor | None = None) -> torch.Tensor:
    """The merged task vector τ_m before λ (see trimmed_weighted_deltas for `deltas`)."""
    return elect_merge(group, trimmed_weighted_deltas(group, p, stats, deltas), p.aggregate, tie=p.tie)


def ties(group: TensorGroup, p: TiesParams, stats: dict) -> Merged:
    if group.fused_inputs:
        merged = fused_ties_vector(group, p, stats)
        if merged is not None:
            base = group.raw_base.reshape(group.chunk_shape)
            return Merged(torch.add(base.to(torch.float32), merged.reshape(group.chunk_shape), alpha=p.lam))
        group.materialize()
    return Merged(torch.add(group.base, ties_vector(group, p, stats), alpha=p.lam))


def fused_ties_vector(group: TensorGroup, p: TiesParams, stats: dict) -> torch.Tensor | None:
    """ties_vector from the raw inputs with the fused kernels (ops.fused): thresholds from the
    statistics pass (global scope), the engine's per-tensor pass (a tensor merged in row blocks)
    or selected here (a whole tensor's own top-k); None where the kernels cannot run."""
    densities = group.per_model(p, "density")
    if all(d >= 1 for d in densities):
        thresholds = [0.0] * group.num_models
    elif p.scope == "global":
        thresholds = stats["magnitudes"].thresholds
    elif group.tensor_stats is not None:
        thresholds = group.tensor_stats
    elif group.is_whole:
        thresholds = None  # this tensor's own top-k, selected below from the raw inputs
    else:
        return None
    if group.raw_base is None:
        return None
    base = group.raw_base.reshape(-1)
    models = [m.reshape(-1) for m in group.raw_models]
    partials = dict(group.tie_partials)
    try:
        if thresholds is None:
            thresholds = fused_tensor_thresholds(base, models, densities, p.keep_min)
        thr = torch.tensor(thresholds, dtype=torch.float32)
        total = ops.fused.trimmed_total(base, models, thr, group.weights)
        tie = 1.0 if p.tie == "positive" else group.tie_sign(total, "elect")
        merged = ops.fused.disjoint_merge(base, models, thr, group.weights, total, tie, p.aggregate)
    except ops.fused.FusedUnavailable:
        group.tie_partials = partials  # the eager kernel counts this block's total again
        return None
    if p.tie != "positive":
        group.settle_ties(total, merged, "elect")
    return merged


def tensor_threshold(p: TiesParams, info, base, model, model_params, fused: bool) -> float:
    """scope: tensor: the model's own top-k threshold in this tensor, k = int(density · numel)
    (mergekit's per-tensor magnitude selection; ties at the edge are kept)."""
    density = model_params.get("density", p.density)
    if density >= 1:
        return 0.0
    if fused:
        try:
            return fused_tensor_thresholds(base.reshape(-1), [model.reshape(-1)], [density], p.keep_min)[0]
        except ops.fused.FusedUnavailable:
            pass
    delta = model.reshape(1, -1).to(torch.float32, copy=True).sub_(base.reshape(1, -1).float())  # never the caller's
    return top_k_thresholds(delta, [density], p.keep_min)[0]


def fused_tensor_thresholds(base: torch.Tensor, models: list[torch.Tensor], densities: list[float],
                            keep_min: int) -> list[float]:
    """scope: tensor on a whole tensor from the raw inputs: each model's k-th largest |τ| found by
    counting its flagged keys (ops.sparsify.kth_by_counting). The pass that computes the keys
    also counts them at a few keys that a sample puts around the k-th one (ops.sparsify.sample_cuts),
    which often settles it."""
    n = base.numel()
    stride = max(1, n // GUESS_SAMPLE)

    def one(model: torch.Tensor, k: int) -> float:
        sample = ops.sparsify.flagged_keys(model[::stride].float() - base[::stride].float())
        cuts = ops.sparsify.sample_cuts(sample, k, n)
        keys, counts = ops.fused.magnitude_keys(base, model, cuts)
        return ops.sparsify.kth_by_counting(lambda c: ops.fused.count_at_least(keys, c), k,
                                            lambda b: ops.fused.boundary_low_counts(base, model, b),
                                            dict(zip(cuts, counts)))

    def select(tasks: list[int], ks: list[int]) -> list[float]:
        return [one(models[t], k) for t, k in zip(tasks, ks)]

    return per_tensor_thresholds(n, densities, keep_min, select)


# the search for the k-th key starts from a sample of about this many values
GUESS_SAMPLE = 1 << 13


def ties_statistics(p: TiesParams) -> list:
    return [TaskMagnitudes()] if p.scope == "global" else []


TIES = Method(
    "ties", ties, TiesParams,
    summary="Trim each task vector, elect signs by mass, average the agreeing values.",
    statistics=ties_statistics,
    tensor_statistic=lambda p: tensor_threshold if p.scope == "tensor" else None,
    fused=True,
    mergekit_names=("ties",),
)
