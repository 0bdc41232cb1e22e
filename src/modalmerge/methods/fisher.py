"""Fisher merging (spec 13): θ = Σ λ_t F_t θ_t / Σ λ_t F_t with F_t each model's diagonal Fisher.

F_t comes from calibration data (procedures/calibration.py: mean squared gradient of log p(y|x)
over 256 examples by default) as `group.data["fisher"]`; λ_t are the recipe weights.
"""

import torch
from pydantic import Field

from .base import Merged, Method, Params, Statistic, Stats, TensorGroup


class FisherParams(Params):
    floor: float = Field(1e-6, ge=0, description="lower bound on every Fisher value (avoids 0/0)")
    normalize_fisher: bool = Field(False, description="divide each model's Fisher by its L2 norm over the whole model")


class FisherNorms(Statistic[list[float]]):
    """Per model, ‖F_t‖₂ over every merged tensor (for normalize_fisher)."""

    name = "fisher_norms"

    def __init__(self):
        self.sq: torch.Tensor | None = None

    def observe(self, group: TensorGroup, params: Params, prior: Stats) -> None:
        f = group.data.get("fisher")
        if f is None:
            return
        s = f.double().reshape(group.num_models, -1).square().sum(dim=1).cpu()
        self.sq = s if self.sq is None else self.sq + s

    def result(self, params: Params, prior: Stats) -> list[float]:
        return [] if self.sq is None else [max(float(v), 1e-300) ** 0.5 for v in self.sq]


def fisher_weights(group: TensorGroup, p: FisherParams, stats: Stats) -> torch.Tensor:
    """λ_t · max(F_t, floor) shaped like the models stack; a tensor no Fisher covers (not a
    trained parameter) counts as equal Fishers, i.e. the weighted average."""
    f = group.data.get("fisher")
    if f is None:
        f = torch.ones_like(group.models)
    else:
        norms = stats.get(FisherNorms) if FisherNorms in stats else None
        if p.normalize_fisher and norms:
            f = f / torch.tensor(norms, dtype=f.dtype, device=f.device).reshape((-1,) + (1,) * (f.dim() - 1))
        f = f.clamp_min(p.floor) if p.floor > 0 else f.clone()
    return f.mul_(group.weights_like(f))


def fisher(group: TensorGroup, p: FisherParams, stats: Stats) -> Merged:
    w = fisher_weights(group, p, stats)
    return Merged((w * group.models).sum(dim=0) / w.sum(dim=0))


FISHER = Method(
    "fisher", fisher, FisherParams,
    summary="Average weighted element-wise by each model's diagonal Fisher (needs calibration data).",
    base="optional",
    statistics=lambda p: [FisherNorms()] if p.normalize_fisher else [],
    data=lambda p: ("fisher",),
)
