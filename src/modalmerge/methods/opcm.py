"""OPCM (spec 10, Tang et al. 2025): continual merging by orthogonal projection.

Models arrive one at a time. State: the merged task vector Δ, a scale λ and the history of the
models' whole-model task-vector norms. Start: Δ = τ_1, λ = 1, norms = [‖τ_1‖]. For each new τ_t:
- every 2-D linear weight: SVD of Δ = U S Vᵀ (full U, V, so τ_t's parts outside Δ's row and
  column spaces are kept); r = first index where cumsum(S) exceeds α·ΣS; P = Uᵀ τ_t V with
  diag(P) = 0 and P[:r, :r] = 0; Δ' = λΔ + U P Vᵀ.
- every other tensor (embeddings, norms, biases): Δ' = λΔ + τ_t.
Then norms += [‖τ_t‖], λ_new = ‖Δ'‖ / mean(norms) (whole-model L2), Δ = Δ'/λ_new; the merged
model is θ_0 + Δ. The whole-model norms need a statistics pass, so the engine
(procedures/continual.py) runs the models itself, one step at a time, and keeps the state in the
output folder's `continual/` part; the kernel here is one step for one tensor.
"""

from dataclasses import dataclass

import torch
from pydantic import Field

from .base import Merged, Method, Params, Stats, TensorGroup, TensorInfo


class OpcmParams(Params):
    alpha: float = Field(0.5, gt=0, le=1, description="keep the new model out of the leading singular "
                                                       "directions holding this fraction of the singular value mass")


def split_rank(s: torch.Tensor, alpha: float) -> int:
    """First index where the cumulative sum of the singular values exceeds α × their total."""
    total = float(s.sum())
    if total <= 0:
        return 0
    above = (torch.cumsum(s, 0) / total) > alpha
    return int(above.float().argmax()) if bool(above.any()) else int(s.numel())


def project(delta: torch.Tensor, tau: torch.Tensor, alpha: float) -> torch.Tensor:
    """U P Vᵀ: τ in Δ's singular bases without the diagonal and the leading r × r block."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=True)
    r = split_rank(s, alpha)
    p = u.T @ tau.double() @ vh.T
    p.diagonal().zero_()
    p[:r, :r] = 0
    return (u @ p @ vh).float()


def projects(info: TensorInfo) -> bool:
    """Which tensors get the orthogonal projection: 2-D linear weights."""
    return info.kind == "linear" and len(info.shape) == 2


def opcm_step(info: TensorInfo, delta: torch.Tensor, lam: float, tau: torch.Tensor, alpha: float) -> torch.Tensor:
    """Δ' = λΔ + (projected) τ for one tensor."""
    added = project(delta, tau, alpha) if projects(info) else tau
    return delta * lam + added


@dataclass(frozen=True)
class RunningScale:
    """λ of the running merge, which the continual engine gives the kernel in its Stats."""

    lam: float


def opcm(group: TensorGroup, p: OpcmParams, stats: Stats) -> Merged:
    """One step for one whole tensor: group.models = [Δ, τ_t] (no base), stats.get(RunningScale) = λ."""
    delta, tau = group.models[0], group.models[1]
    return Merged(opcm_step(group.info, delta, stats.get(RunningScale).lam, tau, p.alpha))


OPCM = Method(
    "opcm", opcm, OpcmParams,
    summary="Continual merging: add models one at a time, projected orthogonally to the running merge "
            "(`merge --continual PREV --add MODEL`).",
    chunkable=lambda p, info: False,
    runs="sequential",
    weighted=False,
)
