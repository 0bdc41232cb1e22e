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
    larger tensor (TensorGroup.tie_sign); by default it is computed from `x` itself.
    """
    if total is None:
        total = x.sum(dim=0)
    if tie_sign is None:
        tie_sign = 1.0 if deterministic_sum(total) >= 0 else -1.0
    gamma = torch.sign(total)
    return gamma.masked_fill_(gamma == 0, tie_sign)


def has_exact_ties(x: torch.Tensor, total: torch.Tensor) -> bool:
    """Whether some element has non-zero values that sum to exactly 0 (where the tie sign matters)."""
    zero = total == 0
    if not bool(zero.any()):
        return False
    return bool((x[:, zero] != 0).any())


def disjoint_merge(x: torch.Tensor, gamma: torch.Tensor, aggregate: Aggregate = "mean",
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """Aggregate the non-zero entries whose sign equals γ; 0 where none agree.

    With `weights` ([T], the entries of `x` already multiplied by them), "mean" is the weighted
    mean Σ_agree x_t / Σ_agree w_t (mergekit's normalised TIES); without, the plain mean.
    """
    # x·γ > 0 exactly where x is non-zero and agrees with γ; relu(x·γ) is then |x| there, 0 elsewhere
    aligned = x * gamma.unsqueeze(0)
    agree = aligned > 0
    aligned.clamp_min_(0)
    if aggregate == "max":
        return aligned.amax(dim=0).mul_(gamma)
    total = aligned.sum(dim=0).mul_(gamma)
    if aggregate == "sum":
        return total
    if weights is None:
        count = agree.sum(dim=0, dtype=x.dtype)
    else:
        count = (agree * weights.reshape((-1,) + (1,) * (x.dim() - 1))).sum(dim=0)
    return total.div_(count.masked_fill_(count == 0, 1.0))


def elect_and_merge(
    x: torch.Tensor, aggregate: Aggregate = "mean", tie_sign: float | None = None,
    weights: torch.Tensor | None = None, total: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sign election followed by the disjoint aggregate: TIES steps 2 and 3."""
    return disjoint_merge(x, elect_sign(x, tie_sign, total), aggregate, weights)
