"""TIES-style sign election and disjoint aggregation (spec section 0 and 2).

Every function works on a stack `x` of shape [T, ...]: one slice per task.
"""

from typing import Literal

import torch

from .reduce import deterministic_sum

Aggregate = Literal["mean", "sum", "max"]


def elect_sign(x: torch.Tensor, tie_sign: float | None = None, total: torch.Tensor | None = None) -> torch.Tensor:
    """γ = sign(Σ_t x_t), with exact zeros resolved to `tie_sign`.

    Spec decision: where the sum is exactly 0 use the sign of the total over the tensor, and
    ties of that go to +. The caller passes that tensor-level sign when `x` is a chunk of a
    larger tensor (methods.base.ElectionState.tie_sign); by default it is computed from `x` itself.
    """
    if total is None:
        total = x.sum(dim=0)
    if tie_sign is None:
        tie_sign = 1.0 if deterministic_sum(total) >= 0 else -1.0
    gamma = torch.sign(total)
    return gamma.masked_fill_(gamma == 0, tie_sign)


def tie_positions(total: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
    """Where an election's result depended on its tie sign: the sum was exactly 0, yet the
    merge kept something (non-zero entries that cancel exactly)."""
    return (total == 0) & (merged != 0)


def disjoint_merge(x: torch.Tensor, gamma: torch.Tensor, aggregate: Aggregate = "mean",
                   weights: torch.Tensor | None = None, inplace: bool = False) -> torch.Tensor:
    """Aggregate the non-zero entries whose sign equals γ; 0 where none agree.

    With `weights` ([T], the entries of `x` already multiplied by them), "mean" is the weighted
    mean Σ_agree x_t / Σ_agree w_t (mergekit's normalised TIES); without, the plain mean.
    `inplace` lets it use `x` as scratch space.
    """
    # relu(x·γ) is |x| where x is non-zero and agrees with γ, and 0 elsewhere. Everything stays
    # in float arithmetic: boolean masks over the [T, ...] stack cost ~10x more on CPU.
    aligned = x.mul_(gamma) if inplace else x * gamma
    aligned.clamp_min_(0)
    if aggregate == "max":
        return aligned.amax(dim=0).mul_(gamma)
    total = aligned.sum(dim=0).mul_(gamma)
    if aggregate == "sum":
        return total
    agree = aligned.sign_()  # 1 where agreeing, else 0
    if weights is None:
        return total.div_(agree.sum(dim=0).clamp_min_(1))
    count = (agree.mul_(weights.reshape((-1,) + (1,) * (x.dim() - 1)))).sum(dim=0)
    return total.div_(torch.where(count == 0, torch.ones_like(count), count))


def elect_and_merge(
    x: torch.Tensor, aggregate: Aggregate = "mean", tie_sign: float | None = None,
    weights: torch.Tensor | None = None, total: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sign election followed by the disjoint aggregate: TIES steps 2 and 3."""
    return disjoint_merge(x, elect_sign(x, tie_sign, total), aggregate, weights)
