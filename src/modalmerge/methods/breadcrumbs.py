"""Model Breadcrumbs (spec 4): drop each task vector's outliers and its small entries, sum the rest.

Per row of each task vector (the whole tensor for 1-D): drop the `top_remove_fraction` largest
|τ|, keep the next `keep_fraction` largest, zero the rest; θ = θ_0 + λ Σ_t w_t τ̃_t (λ is the
paper's α). Counts are int(fraction · row length); when the two fractions add up to more than
1, fewer outliers are dropped so that `keep_fraction` is kept (mergekit's rule). The two edges
come from `kthvalue` per row, never a sort; entries tied with the lower edge are kept, those
tied with the upper edge dropped.

`scope: tensor` ranks the whole tensor instead of each row: mergekit's `breadcrumbs`
(density = keep_fraction, gamma = top_remove_fraction).
"""

from typing import Literal

import torch
from pydantic import Field

from .base import Merged, MergekitForm, Method, Params, Stats, TensorGroup
from .combine import linear_merge


class BreadcrumbsParams(Params):
    per_model = frozenset({"keep_fraction", "top_remove_fraction"})

    lam: float = Field(0.4, alias="lambda", description="scale of the summed task vectors (the paper's alpha)")
    keep_fraction: float = Field(0.2, ge=0, le=1, description="fraction kept, below the removed outliers")
    top_remove_fraction: float = Field(0.1, ge=0, le=1, description="fraction of largest |tau| removed as outliers")
    scope: Literal["row", "tensor"] = Field("row", description="rank within each row (the paper) or the whole tensor")
    normalize: bool = Field(False, description="divide the weights by their sum first")


def keep_band(x: torch.Tensor, keep_fraction: float, top_remove_fraction: float) -> torch.Tensor:
    """x [rows, n] with, per row, all but the band of magnitudes just below the outliers zeroed."""
    n = x.shape[-1]
    n_keep = int(keep_fraction * n)
    n_top = min(int(top_remove_fraction * n), n - n_keep)
    if n_keep == 0:
        return torch.zeros_like(x)
    mag = x.abs()
    # the j-th largest of n is the (n − j + 1)-th smallest
    lower = mag.kthvalue(n - (n_top + n_keep) + 1, dim=-1, keepdim=True).values
    keep = mag >= lower
    if n_top > 0:
        upper = mag.kthvalue(n - n_top + 1, dim=-1, keepdim=True).values
        keep &= mag < upper
    return x * keep


def breadcrumbs(group: TensorGroup, p: BreadcrumbsParams, stats: Stats) -> Merged:
    deltas = group.task_vectors()
    per_row = p.scope == "row" and len(group.info.shape) >= 2
    rows = deltas.shape[1] if per_row else 1
    keeps = group.per_model(p, "keep_fraction")
    tops = group.per_model(p, "top_remove_fraction")
    for t in range(deltas.shape[0]):
        deltas[t] = keep_band(deltas[t].reshape(rows, -1), keeps[t], tops[t]).reshape(deltas[t].shape)
    return linear_merge(group, deltas, p.lam, p.normalize)


BREADCRUMBS = Method(
    "breadcrumbs", breadcrumbs, BreadcrumbsParams,
    summary="Per row, drop each task vector's largest outliers and small entries; add the sum to the base.",
    chunkable=lambda p, info: p.scope == "row" and len(info.shape) >= 2,
    mergekit=(MergekitForm("breadcrumbs", defaults={"normalize": False, "lambda": 1.0, "density": 1.0, "gamma": 0.01},
                           per_model_renames={"density": "keep_fraction", "gamma": "top_remove_fraction"},
                           native={"scope": "tensor"}),),
)
