"""How processed task vectors become a merged tensor, shared by several methods: the weighted
sum (task arithmetic's, also after DARE's drop, DELLA's or Breadcrumbs' pruning) and the elected
disjoint merge (TIES steps 2-4 on already sparse vectors: DARE-TIES, DELLA)."""

import torch
from pydantic import Field

from .. import ops
from .base import Merged, Params, TensorGroup
from .sign_election import elect_merge


class TaskArithmeticParams(Params):
    lam: float = Field(0.3, alias="lambda", description="scale of the summed task vectors")
    normalize: bool = Field(False, description="divide the weights by their sum first")


def task_arithmetic_vector(group: TensorGroup, p: TaskArithmeticParams) -> torch.Tensor:
    """λ Σ_t w_t τ_t from the block's inputs as stored (ops.trimmed_merge: C or torch); weights ÷
    their sum when normalising, unless they sum to 0 (left as they are, as mergekit)."""
    w = group.weights
    if p.normalize and abs(float(w.sum())) >= 1e-8:
        w = w / w.sum()
    return ops.trimmed_merge.weighted_delta_sum(group.inputs(), w).mul_(p.lam)


def weighted(group: TensorGroup, deltas: torch.Tensor) -> torch.Tensor:
    """w_t · x_t, stacked."""
    return deltas * group.weights_like(deltas)


def linear_merge(group: TensorGroup, deltas: torch.Tensor, lam: float, normalize: bool) -> Merged:
    """θ_0 + λ Σ_t w_t x_t (weights ÷ their sum when normalising)."""
    w = group.weights / group.weights.sum() if normalize else group.weights
    return Merged(group.base + lam * ops.weighted_sum(deltas, w))


def elected_merge(group: TensorGroup, deltas: torch.Tensor, lam: float, aggregate: str, tie: str = "tensor") -> Merged:
    """θ_0 + λ · elect-and-disjoint-merge of w_t x_t (TIES steps 2-4, on already sparse vectors)."""
    return Merged(torch.add(group.base, elect_merge(group, weighted(group, deltas), aggregate, tie=tie), alpha=lam))
