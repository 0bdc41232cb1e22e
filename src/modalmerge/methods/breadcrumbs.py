"""Model Breadcrumbs (spec 4): drop each task vector's outliers and its small entries, sum the rest.

Per row of each task vector (the whole tensor for 1-D): drop the `top_remove_fraction` largest
|τ|, keep the next `keep_fraction` largest, zero the rest; θ = θ_0 + λ Σ_t w_t τ̃_t (λ is the
paper's α). Counts are int(fraction · row length); when the two fractions add up to more than
1, fewer outliers are dropped so that `keep_fraction` is kept (mergekit's rule). The two edges
come from `kthvalue` per row, never a sort; entries tied with the lower edge are kept, those
tied with the upper edge dropped.

`scope: tensor` ranks the whole tensor instead of each row: mergekit's `breadcrumbs`
(density = keep_fraction, gamma = top_remove_fraction).

`elect: true` replaces the sum by TIES's sign election and disjoint merge of the weighted, pruned
task vectors (`aggregate`: the mean over the agreeing models' weights, or their sum; `tie`: the
sign where the sum is exactly 0): mergekit's `breadcrumbs_ties`, whose `normalize` is the mean
and whose ties go to +.

`rescale: l1` scales each pruned task vector back to its L1 norm over the whole tensor (mergekit's
`rescale: true`); such tensors are merged whole.
"""

from typing import Literal

import torch
from pydantic import Field, model_validator

from .base import Merged, MergekitForm, Method, Params, Stats, TensorGroup
from .combine import elected_merge, linear_merge
from .drop_rescale import l1_match

# the parameters of the elected merge, and of the plain sum: each refused with the other
_ELECT_ONLY = ("aggregate", "tie")


class BreadcrumbsParams(Params):
    per_model = frozenset({"keep_fraction", "top_remove_fraction"})

    lam: float = Field(0.4, alias="lambda", description="scale of the summed task vectors (the paper's alpha)")
    keep_fraction: float = Field(0.2, ge=0, le=1, description="fraction kept, below the removed outliers")
    top_remove_fraction: float = Field(0.1, ge=0, le=1, description="fraction of largest |tau| removed as outliers")
    scope: Literal["row", "tensor"] = Field("row", description="rank within each row (the paper) or the whole tensor")
    normalize: bool = Field(False, description="divide the weights by their sum first (without elect)")
    rescale: Literal["none", "l1"] = Field("none", description="scale each pruned task vector back to its L1 norm "
                                                              "over the tensor (l1: mergekit's rescale)")
    elect: bool = Field(False, description="TIES sign election and disjoint merge instead of the sum")
    aggregate: Literal["mean", "sum"] = Field("mean", description="with elect: disjoint mean (over the agreeing "
                                              "models' weights) or sum of agreeing values")
    tie: Literal["tensor", "positive"] = Field("tensor", description="with elect: sign where the sum is exactly 0: "
                                               "the tensor total's, or + (mergekit)")

    @model_validator(mode="after")
    def _fields_of_the_chosen_merge(self):
        # a field the chosen merge does not read is an error, never ignored
        if self.elect and "normalize" in self.model_fields_set:
            raise ValueError("normalize is not used with elect: true; use aggregate: mean (or sum)")
        if not self.elect:
            unused = [k for k in _ELECT_ONLY if k in self.model_fields_set]
            if unused:
                raise ValueError(f"{unused[0]} is used only with elect: true; set elect: true or remove it")
        return self


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
        if keeps[t] >= 1:
            continue  # everything kept, outliers too (mergekit's rule): nothing to rescale
        pruned = keep_band(deltas[t].reshape(rows, -1), keeps[t], tops[t]).reshape(deltas[t].shape)
        deltas[t] = l1_match(pruned, deltas[t]) if p.rescale == "l1" else pruned
    if p.elect:
        return elected_merge(group, deltas, p.lam, p.aggregate, p.tie)
    return linear_merge(group, deltas, p.lam, p.normalize)


BREADCRUMBS = Method(
    "breadcrumbs", breadcrumbs, BreadcrumbsParams,
    summary="Per row, drop each task vector's largest outliers and small entries; add the sum (or TIES's elected "
            "merge) to the base.",
    # rows are ranked on their own; an L1 rescale needs the whole tensor
    chunkable=lambda p, info: p.scope == "row" and len(info.shape) >= 2 and p.rescale == "none",
    mergekit=(MergekitForm("breadcrumbs", defaults={"normalize": False, "lambda": 1.0, "density": 1.0, "gamma": 0.01},
                           per_model_renames={"density": "keep_fraction", "gamma": "top_remove_fraction"},
                           rescale=True, weight_required=True, native={"scope": "tensor"}),
              # the same pruning, then mergekit's sign election (`normalize`: the mean over the agreeing weights)
              MergekitForm("breadcrumbs_ties",
                           defaults={"normalize": False, "lambda": 1.0, "density": 1.0, "gamma": 0.01},
                           per_model_renames={"density": "keep_fraction", "gamma": "top_remove_fraction"},
                           electing=True, rescale=True, weight_required=True,
                           native={"scope": "tensor", "elect": True})),
)
