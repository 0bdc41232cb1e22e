"""OTA / Fast Fisher Grafting (spec 13): merge with the optimiser's curvature estimate.

Each model supplies its Adam second moments v_t (`optimizer_state` in the recipe, read by
procedures/calibration.py as `group.data["exp_avg_sq"]`). Saliency s_t = v_t ⊙ τ_t²; entries below
each model's whole-model threshold (keeping its top `density` fraction) are masked (m_t = 0);
the rest merge as
    θ = θ_0 + Σ_t ω_t τ_t / Σ_t ω_t,   ω_t = λ_t (√v_t + ε) · m_t
and entries masked in every model revert to the base. λ_t are the recipe weights (default 1).

Decision: the spec gives no default density; 0.2, TIES's, is used.
"""

import torch
from pydantic import Field

from .. import ops
from ..errors import MergeError
from .base import Merged, Method, Params, Statistic, Stats, TensorGroup


class OtaParams(Params):
    per_model = frozenset({"density"})

    density: float = Field(0.2, gt=0, le=1, description="kept fraction of each model's entries, by saliency v·τ²")
    epsilon: float = Field(1e-8, ge=0, description="ε in the weights ω = (√v + ε)·mask")


def saliency(group: TensorGroup) -> torch.Tensor:
    v = group.data.get("exp_avg_sq")
    if v is None:
        raise MergeError(f"tensor {group.name!r}: some model's optimizer_state has no exp_avg_sq for it; give every "
                         "merged tensor's second moments, or add the tensor to `exclude` in the recipe")
    return v.clamp_min(0) * group.task_vectors().square()


class SaliencyThresholds(Statistic[list[float]]):
    """Per model, a histogram of its saliency over every merged tensor → its keep threshold."""

    name = "saliency"
    sampled = True

    def __init__(self):
        self.counts: list[torch.Tensor] | None = None
        self.densities: list[float] = []

    def observe(self, group: TensorGroup, params: Params, prior: Stats) -> None:
        s = saliency(group).reshape(group.num_models, -1)
        if self.counts is None:
            self.counts = [torch.zeros(ops.sparsify.HIST_BINS, dtype=torch.float64) for _ in range(len(s))]
            self.densities = group.per_model(params, "density")
        for t in range(len(s)):
            self.counts[t] += ops.magnitude_histogram(s[t], group.sample_weight)[0].cpu()

    def result(self, params: Params, prior: Stats) -> list[float]:
        return [0.0 if d >= 1 else ops.threshold_from_histogram(c, d)
                for c, d in zip(self.counts or [], self.densities)]

    def refinement(self, result: list[float]) -> Statistic:
        return ExactSaliencyThresholds(self, result)


class ExactSaliencyThresholds(Statistic[list[float]]):
    """Second pass (exact statistics): the exact k-th largest saliency, k = int(density · n)."""

    name = "saliency"
    provides = SaliencyThresholds

    def __init__(self, approx: SaliencyThresholds, thresholds: list[float]):
        self.approx = thresholds
        self.bounds = [ops.sparsify.boundary_bin(c, d) for c, d in zip(approx.counts or [], approx.densities)]
        self.values: list[list[torch.Tensor]] = [[] for _ in self.bounds]

    def observe(self, group: TensorGroup, params: Params, prior: Stats) -> None:
        s = saliency(group).reshape(group.num_models, -1)
        for t, bound in enumerate(self.bounds):
            if bound is not None:
                lo, hi, _ = bound
                self.values[t].append(s[t][(s[t] >= lo) & (s[t] < hi)].cpu())

    def result(self, params: Params, prior: Stats) -> list[float]:
        out = []
        for t, bound in enumerate(self.bounds):
            if bound is None:
                out.append(self.approx[t])
                continue
            inside = torch.cat(self.values[t])
            k = min(max(int(bound[2]), 1), inside.numel())
            out.append(ops.kth_largest_magnitude(inside, k))
        return out


def ota(group: TensorGroup, p: OtaParams, stats: Stats) -> Merged:
    v = group.data.get("exp_avg_sq")
    s = saliency(group)
    thresholds = stats.get(SaliencyThresholds)
    keep = torch.stack([s[t] >= thresholds[t] for t in range(group.num_models)]).float()
    omega = (v.clamp_min(0).sqrt() + p.epsilon).mul_(keep).mul_(group.weights_like(s))
    total = omega.sum(dim=0)
    merged = (omega * group.task_vectors()).sum(dim=0) / total.clamp_min(torch.finfo(total.dtype).tiny)
    return Merged(group.base + torch.where(total > 0, merged, torch.zeros_like(merged)))


OTA = Method(
    "ota", ota, OtaParams,
    summary="Fast Fisher Grafting: mask task vectors by optimiser saliency v·τ², merge weighted by √v.",
    statistics=lambda p: [SaliencyThresholds()],
    data=lambda p: ("exp_avg_sq",),
)
