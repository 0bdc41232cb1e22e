"""Reductions whose result does not depend on torch's thread count.

A plain `x.sum()` over a large tensor splits the work between threads, and the float result
changes with the split. Summing fixed-size blocks first (each block reduced by one thread) and
then the few block totals gives the same bits whatever the thread count.
"""

import torch

_BLOCK = 1 << 16


def deterministic_sum(x: torch.Tensor) -> float:
    """Sum of all elements, in float64, independent of the thread count."""
    flat = x.reshape(-1).to(torch.float64)
    n = flat.numel()
    if n == 0:
        return 0.0
    pad = (-n) % _BLOCK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    partial = flat.view(-1, _BLOCK).sum(dim=1)
    # a short vector (< torch's parallel grain) is reduced by one thread
    total = 0.0
    for chunk in partial.split(16384):
        total += float(chunk.sum())
    return total


def deterministic_dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """<a, b> over all elements, in float64, independent of the thread count."""
    return deterministic_sum(a.reshape(-1).to(torch.float64) * b.reshape(-1).to(torch.float64))


def weighted_sum(x: torch.Tensor, w: torch.Tensor | list[float]) -> torch.Tensor:
    """Σ_t w_t x_t over the first axis, accumulated in model order (thread-count independent)."""
    w = [float(v) for v in w]
    out = x[0] * w[0]
    for t in range(1, x.shape[0]):
        out.add_(x[t], alpha=w[t])
    return out
