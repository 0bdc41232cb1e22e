"""Reductions whose result does not depend on torch's thread count.

A plain `x.sum()` over a large tensor splits the work between threads, and the float result
changes with the split. Summing fixed-size blocks first (each block reduced by one thread) and
then the few block totals gives the same bits whatever the thread count.
"""

import torch

# torch reduces fewer elements than its parallel grain (32768) on one thread
_BLOCK = 1 << 15


def deterministic_sum(x: torch.Tensor) -> float:
    """Sum of all elements, in float64, independent of the thread count."""
    flat = x.reshape(-1)
    n = flat.numel()
    if n <= _BLOCK:
        return float(flat.sum(dtype=torch.float64))
    full = n - n % _BLOCK
    partial = flat[:full].view(-1, _BLOCK).sum(dim=1, dtype=torch.float64)
    total = float(flat[full:].sum(dtype=torch.float64))
    for chunk in partial.split(_BLOCK):
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
