"""How task vectors relate: their Gram matrix (norms and pairwise dot products) and how often
their signs disagree. Every function takes a stack `x` of shape [T, ...], one slice per task,
and returns sums, so results over chunks of a tensor add up to the result over the tensor.
"""

import torch

from .reduce import deterministic_dot


def gram_matrix(x: torch.Tensor) -> torch.Tensor:
    """G[i, j] = <x_i, x_j> in float64 ([T, T]), independent of the thread count."""
    t = x.shape[0]
    g = torch.zeros((t, t), dtype=torch.float64)
    for i in range(t):
        for j in range(i, t):
            g[i, j] = g[j, i] = deterministic_dot(x[i], x[j])
    return g


def sign_conflicts(x: torch.Tensor) -> tuple[int, int]:
    """(elements where some non-zero x_i > 0 and some x_j < 0, elements where >= 2 slices are non-zero).

    The second count is where a conflict is possible, the natural denominator of a conflict rate.
    """
    flat = x.reshape(x.shape[0], -1)
    conflicting = ((flat > 0).any(dim=0) & (flat < 0).any(dim=0)).sum()
    overlapping = ((flat != 0).sum(dim=0) >= 2).sum()
    return int(conflicting), int(overlapping)
