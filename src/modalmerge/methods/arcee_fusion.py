"""Arcee Fusion (mergekit 0.1.5's `arcee_fusion`): take the model's value only where it matters.

Two inputs, a base θ_0 and one model θ_1, per tensor:
  importance  I = |θ_1 − θ_0| · KL, KL = Σ_j p_j log(p_j / q_j) along the last axis (one value per
              row; over the whole vector for a 1-D tensor), p = softmax(θ_1) + 1e-8,
              q = softmax(θ_0) + 1e-8;
  threshold   τ = median + 1.5 · (Q3 − Q1) of I over the whole tensor, each quantile the sorted
              value at index floor(q · (n − 1)) (no interpolation), as mergekit takes them;
  θ = θ_0 + (θ_1 − θ_0) · 1{I ≥ τ}.

The quantiles are over the whole tensor, so a tensor is never cut into row blocks. mergekit sorts
a random sample of 1,000,000 entries (drawn with replacement, unseeded) when a tensor has more;
here the quantiles are always exact (three k-th value selections, no sort), so tensors of up to a
million entries give mergekit's result and larger ones a deterministic, exact one. The arithmetic
is mergekit's, step for step, in float32 (what mergekit does with `dtype: float32`).
"""

import torch
import torch.nn.functional as F

from .base import Merged, MergekitForm, Method, Params, Stats, TensorGroup

# mergekit's floor added to both distributions, so log(p / q) stays finite
_PROBABILITY_FLOOR = 1e-8


class ArceeFusionParams(Params):
    """No parameters: the threshold is the importance's own upper fence."""


def importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|θ_1 − θ_0| times the KL divergence of softmax(θ_1) from softmax(θ_0) along the last axis."""
    diff = (model - base).abs()
    p = F.softmax(model, dim=-1) + _PROBABILITY_FLOOR
    q = F.softmax(base, dim=-1) + _PROBABILITY_FLOOR
    return diff * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def quartiles(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q1, median and Q3 of all the values: the sorted values at floor(q · (n − 1)) for q = 1/4,
    1/2, 3/4 (integer arithmetic: exact at any size), by k-th value selection."""
    flat = values.reshape(-1)
    last = flat.numel() - 1
    return tuple(flat.kthvalue(index + 1).values for index in (last // 4, last // 2, 3 * last // 4))


def arcee_fusion(group: TensorGroup, p: ArceeFusionParams, stats: Stats) -> Merged:
    base, model = group.base, group.models[0]
    score = importance(model, base)
    q1, median, q3 = quartiles(score)
    threshold = median + 1.5 * (q3 - q1)
    return Merged(base + (model - base) * (score >= threshold).float())


ARCEE_FUSION = Method(
    "arcee_fusion", arcee_fusion, ArceeFusionParams,
    summary="Take the one model's value where its importance (|difference| x row KL divergence) reaches the "
            "tensor's upper fence median + 1.5 IQR; keep the base elsewhere.",
    min_models=1,
    max_models=1,
    weighted=False,
    chunkable=lambda p, info: False,  # the quartiles are over the whole tensor
    mergekit=(MergekitForm("arcee_fusion"),),
)
