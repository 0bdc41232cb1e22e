"""EMR-merging (spec 6, Huang et al. 2024): elect, mask, rescale. No hyperparameters.

σ = sign(Σ_t τ_t); τ_uni = σ ⊙ max_t(|τ_t|·1{τ_t σ > 0}); M_t = 1{τ_t σ > 0};
λ_t = Σ|τ_t| / Σ|M_t ⊙ τ_uni| over the whole model. Task t is served by θ_0 + λ_t·M_t ⊙ τ_uni;
the loadable weights are θ_0 + c̄ ⊙ τ_uni with c̄ the mean of λ_t·M_t. Recipe weights scale
each τ_t first (default 1).

Tie rule: where Σ_t τ_t is exactly 0, σ is the sign of the tensor's total (spec 0). The
statistics pass for λ_t must read every element anyway, so it also gathers each tensor's total,
and, for the zero-sum entries, the denominator under both possible tie signs; the right one is
chosen once the tensor is complete. This keeps EMR chunkable (large tensors in row blocks)
without a second read of any tensor.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import ops
from .base import Merged, Method, Params, Statistic, Stats, TensorGroup


class EmrParams(Params):
    pass


def weighted_task_vectors(group: TensorGroup) -> torch.Tensor:
    taus = group.task_vectors()
    return taus * group.weights_like(taus)


def unified(taus: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(τ_uni, M) for elected signs σ: M_t = 1{τ_t σ > 0}, τ_uni = σ·max_t |τ_t|·M_t."""
    agree = taus * sigma.unsqueeze(0) > 0
    return sigma * (taus.abs() * agree).amax(dim=0), agree


class EmrScales(Statistic["EmrResult"]):
    """Whole-model sums Σ|τ_t| and Σ|M_t ⊙ τ_uni| per task, plus each tensor's tie sign."""

    name = "emr"
    sampled = False

    def __init__(self):
        self.numerator: list[float] | None = None
        # per tensor: [T] float64 denominators of the entries with a non-zero sum, of the
        # zero-sum entries with σ = +1 and with σ = −1, and the tensor's total Σ_t τ_t
        self.parts: dict[str, list] = {}

    def observe(self, group: TensorGroup, params: Params, prior: Stats) -> None:
        taus = weighted_task_vectors(group)
        T = taus.shape[0]
        if self.numerator is None:
            self.numerator = [0.0] * T
        for t in range(T):
            self.numerator[t] += ops.deterministic_sum(taus[t].abs())
        zero = taus.sum(dim=0) == 0
        part = self.parts.setdefault(group.name, [[0.0] * T, [0.0] * T, [0.0] * T, 0.0])
        # σ with ties to +1; the entries with a zero sum are also summed under σ = −1 there
        uni, agree = unified(taus, ops.elect_sign(taus, 1.0))
        kept = uni.abs() * agree
        has_zero = bool(zero.any())
        for t in range(T):
            part[0][t] += ops.deterministic_sum(kept[t] * ~zero)
            if has_zero:
                part[1][t] += ops.deterministic_sum(kept[t] * zero)
        if has_zero:
            uni, agree = unified(taus, ops.elect_sign(taus, -1.0))
            kept = uni.abs() * agree
            for t in range(T):
                part[2][t] += ops.deterministic_sum(kept[t] * zero)
        part[3] += ops.deterministic_sum(taus)

    def result(self, params: Params, prior: Stats) -> "EmrResult":
        T = len(self.numerator or [])
        denominator = [0.0] * T
        ties: dict[str, float] = {}
        for name, (fixed, plus, minus, total) in self.parts.items():
            tie = 1.0 if total >= 0 else -1.0
            ties[name] = tie
            chosen = plus if tie > 0 else minus
            for t in range(T):
                denominator[t] += fixed[t] + chosen[t]
        # a task with no agreeing entry has an all-zero mask: its scale changes nothing
        lambdas = [n / d if d > 0 else 1.0 for n, d in zip(self.numerator or [], denominator)]
        return EmrResult(lambdas, ties)


class EmrResult:
    def __init__(self, lambdas: list[float], tie_signs: dict[str, float]):
        self.lambdas = lambdas
        self.tie_signs = tie_signs

    def summary(self) -> dict[str, Any]:
        return {"lambdas": self.lambdas}


def emr(group: TensorGroup, p: EmrParams, stats: Stats) -> Merged:
    result = stats.get(EmrScales)
    taus = weighted_task_vectors(group)
    uni, agree = unified(taus, ops.elect_sign(taus, result.tie_signs[group.name]))
    lam = torch.tensor(result.lambdas, dtype=torch.float32, device=taus.device)
    mean_scale = (agree.to(torch.float32) * lam.reshape((-1,) + (1,) * (taus.dim() - 1))).mean(dim=0)
    return Merged(group.base + mean_scale * uni, shared=uni,
                  masks={name: agree[t] for t, name in enumerate(group.model_names)})


EMR = Method(
    "emr", emr, EmrParams,
    summary="EMR: elected unified task vector, per-task sign masks and rescalers (decoupled output).",
    min_models=2,
    statistics=lambda p: [EmrScales()],
    decoupled=True,
    task_scalars=lambda p, stats, names: list(stats.get(EmrScales).lambdas),
)
