"""TIES-style sign election and disjoint aggregation (spec section 0 and 2).

Every function works on a stack `x` of shape [T, ...]: one slice per task.
"""

from typing import Literal

import torch

Aggregate = Literal["mean", "sum", "max"]


def elect_sign(x: torch.Tensor, tie_sign: torch.Tensor | float | None = None) -> torch.Tensor:
    """γ = sign(Σ_t x_t), with exact zeros resolved to `tie_sign`.

    Spec decision: where the sum is exactly 0 use the sign of the total over the tensor, and
    ties of that go to +. The caller passes that tensor-level sign when `x` is a chunk of a
    larger tensor; by default it is computed from `x` itself.
    """
    total = x.sum(dim=0)
    gamma = torch.sign(total)
    if tie_sign is None:
        tie_sign = 1.0 if float(total.sum()) >= 0 else -1.0
    return torch.where(gamma == 0, torch.as_tensor(tie_sign, dtype=gamma.dtype), gamma)


def disjoint_merge(x: torch.Tensor, gamma: torch.Tensor, aggregate: Aggregate = "mean",
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """Aggregate the non-zero entries whose sign equals γ; 0 where none agree.

    With `weights` ([T], the entries of `x` already multiplied by them), "mean" is the weighted
    mean Σ_agree x_t / Σ_agree w_t (mergekit's normalised TIES); without, the plain mean.
    """
    agree = (torch.sign(x) == gamma.unsqueeze(0)) & (x != 0)
    if aggregate == "max":
        return (x.abs() * agree).amax(dim=0) * gamma
    total = (x * agree).sum(dim=0)
    if aggregate == "sum":
        return total
    if weights is None:
        count = agree.sum(dim=0, dtype=x.dtype)
    else:
        count = (agree * weights.reshape((-1,) + (1,) * (x.dim() - 1))).sum(dim=0)
    return total / torch.where(count == 0, torch.ones_like(count), count)


def elect_and_merge(
    x: torch.Tensor, aggregate: Aggregate = "mean", tie_sign: torch.Tensor | float | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sign election followed by the disjoint aggregate: TIES steps 2 and 3."""
    return disjoint_merge(x, elect_sign(x, tie_sign), aggregate, weights)
