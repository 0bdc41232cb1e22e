"""Random drop and rescale of task-vector entries (DARE's, and DELLA's rescale of survivors)."""

from typing import Literal

import torch

from .. import ops
from .base import TensorGroup

Rescale = Literal["inverse", "l1", "none"]

# mergekit's guard: a norm this small is not rescaled to (nothing meaningful to match)
L1_EPS = 1e-7


def l1_match(pruned: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Scale `pruned` so its L1 norm equals `original`'s (whole tensor; mergekit's RescaleNorm.l1)."""
    before = ops.deterministic_sum(original.abs())
    after = ops.deterministic_sum(pruned.abs())
    if before < L1_EPS or after < L1_EPS:
        return pruned
    return pruned * (before / after)


def rescale_survivors(pruned: torch.Tensor, original: torch.Tensor, keep_prob, rescale: str) -> torch.Tensor:
    """Undo the shrinkage of a random drop: ÷ keep probability (a number or per element), or L1 match."""
    if rescale == "inverse":
        return pruned / keep_prob
    if rescale == "l1":
        return l1_match(pruned, original)
    return pruned


def drop_and_rescale(group: TensorGroup, deltas: torch.Tensor, densities: list[float], rescale: str) -> torch.Tensor:
    """DARE on each task vector (in place): keep with probability density, rescale the survivors."""
    for t, density in enumerate(densities):
        if density >= 1:
            continue  # nothing dropped, nothing to rescale (mergekit does the same)
        keep = group.uniform(t) < density
        deltas[t] = rescale_survivors(deltas[t] * keep, deltas[t], density, rescale)
    return deltas
