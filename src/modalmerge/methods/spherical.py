"""Norms and dot products for the spherical methods (nuslerp, multislerp, karcher).

mergekit 0.1.5 computes these in float32 with torch's reductions, whose result over a whole
tensor depends on the thread count. Here they are accumulated in float64 (thread-count
independent, ops.reduce) and then rounded to float32, so the elementwise arithmetic that
follows is mergekit's float32 arithmetic on values that agree with its own to a few ulps.
"""

import math

import torch

from .. import ops


def dot32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> over all elements, a float32 scalar tensor on a's device."""
    return torch.tensor(ops.deterministic_dot(a, b), dtype=torch.float32, device=a.device)


def norm32(a: torch.Tensor) -> torch.Tensor:
    """‖a‖₂ over all elements, a float32 scalar tensor on a's device."""
    return torch.tensor(math.sqrt(ops.deterministic_dot(a, a)), dtype=torch.float32, device=a.device)


def row_dot32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> along the last axis (keepdim), accumulated in float64, as float32."""
    return (a.double() * b.double()).sum(dim=-1, keepdim=True).float()


def row_norm32(a: torch.Tensor) -> torch.Tensor:
    """‖a‖₂ along the last axis (keepdim), accumulated in float64, as float32."""
    return a.double().square().sum(dim=-1, keepdim=True).sqrt().float()
