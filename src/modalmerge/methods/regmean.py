"""RegMean (spec 13): per linear layer, the weight that best matches every model's outputs on
its own calibration inputs.

With G_t = X_tᵀX_t / n the Gram matrix of layer inputs (`group.data["gram"]`, from
procedures/calibration.py) and G̃_t = α G_t + (1 − α) diag(G_t):
    W = (Σ_t λ_t G̃_t)⁻¹ Σ_t λ_t G̃_t W_tᵀ     (solved in float64)
Every other tensor is the λ-weighted average.
"""

import torch
from pydantic import Field

from .base import Merged, Method, Params, Stats, TensorGroup


class RegMeanParams(Params):
    alpha: float = Field(0.95, ge=0, le=1, description="scale of the Gram matrices' off-diagonal entries")


def weighted_average(group: TensorGroup) -> torch.Tensor:
    w = group.weights_like(group.models)
    return (w * group.models).sum(dim=0) / group.weights.sum()


def regmean_solve(weights: torch.Tensor, grams: torch.Tensor, lam: torch.Tensor, alpha: float) -> torch.Tensor:
    """W from W_t [T, out, in], G_t [T, in, in] and λ [T], in float64."""
    g = grams.double()
    diag = torch.diagonal(g, dim1=-2, dim2=-1)
    g = alpha * g + (1 - alpha) * torch.diag_embed(diag)
    g = g * lam.double().reshape(-1, 1, 1)
    lhs = g.sum(dim=0)                                               # [in, in]
    rhs = torch.einsum("tij,tkj->ik", g, weights.double())           # Σ G̃_t W_tᵀ  [in, out]
    # an input that no model ever saw active (a zero Gram row) leaves its column undetermined:
    # pin it to the weighted average instead of a singular solve
    dead = lhs.diagonal() == 0
    if bool(dead.any()):
        avg = (weights.double() * lam.double().reshape(-1, 1, 1)).sum(0) / lam.double().sum()
        lhs[dead] = 0
        lhs[:, dead] = 0
        lhs[dead, dead] = 1
        rhs[dead] = avg.T[dead]
    return torch.linalg.solve(lhs, rhs).T.float()


def regmean(group: TensorGroup, p: RegMeanParams, stats: Stats) -> Merged:
    grams = group.data.get("gram")
    if grams is None or group.models.dim() != 3 or grams.shape[-1] != group.models.shape[-1]:
        return Merged(weighted_average(group))
    return Merged(regmean_solve(group.models, grams, group.weights, p.alpha).to(group.models.device))


REGMEAN = Method(
    "regmean", regmean, RegMeanParams,
    summary="Linear layers: the least-squares fit to every model's outputs on its calibration inputs.",
    base="optional",
    chunkable=lambda p, info: False,  # a solve needs the whole weight and its Gram matrix
    data=lambda p: ("gram",),
)
