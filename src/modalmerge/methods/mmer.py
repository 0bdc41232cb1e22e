"""MMER (spec 7, Li, Du et al. 2025): merge the LLMs of N multimodal models, then decouple them
with one binary mask per modality (or task).

τ* = a merge of the task vectors τ_i = θ_i − θ_0 (`base_method`, default TIES with k = 0.2,
λ = 1, disjoint mean; `base_params` sets that method's own parameters). Modality i keeps
m_i = 1{|τ_i| ≥ λ_i·|τ* − τ_i|} (λ_i per model, default 1: the exact L1-optimal binary mask)
and is served by θ_0 + m_i ⊙ τ*. The loadable weights are the text weights θ_0 + m̄ ⊙ τ*.

This kernel sees LLM tensors only; which tensors those are, and the encoders and projectors
that ride along unchanged, is the engine's business (engine/mmer.py).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from .. import ops
from .base import Merged, Method, Params, Statistic, TensorGroup
from .neuromerging import NEUROMERGING, neuromerging_vector
from .tall import masked_merge
from .task_arithmetic import TASK_ARITHMETIC
from .ties import TIES, ties_vector

# the merges that may supply τ*; each gives the merged task vector of a chunk (λ included)
BASE_METHODS = {
    "ties": TIES,
    "neuromerging": NEUROMERGING,
    "task_arithmetic": TASK_ARITHMETIC,
}


class MmerParams(Params):
    per_model = frozenset({"lambda"})

    lam: float = Field(1.0, alias="lambda", ge=0,
                       description="mask threshold λ_i (per model): m_i = 1{|τ_i| ≥ λ_i·|τ* − τ_i|}")
    base_method: Literal["ties", "neuromerging", "task_arithmetic"] = Field(
        "ties", description="the merge that gives τ* (default TIES, density 0.2, lambda 1, disjoint mean)")
    base_params: dict[str, Any] = Field(default_factory=dict,
                                        description="parameters of base_method (its own names and defaults)")

    @field_validator("base_params")
    @classmethod
    def _check_base_params(cls, v, info):
        method = BASE_METHODS.get(info.data.get("base_method", "ties"))
        if method is not None:
            method.parse_params(v, where="base_params")
        return v

    def base(self) -> Params:
        """The base method's validated parameters (task arithmetic: λ defaults to 1 here)."""
        raw = dict(self.base_params)
        if self.base_method == "task_arithmetic":
            raw.setdefault("lambda", 1.0)
        return BASE_METHODS[self.base_method].params.model_validate(raw)


class _BaseStatistic(Statistic):
    """A statistics pass of the base method, shown the base method's parameters."""

    def __init__(self, inner: Statistic):
        self.inner = inner
        self.name = inner.name
        self.sampled = inner.sampled

    def observe(self, group, params, prior):
        self.inner.observe(group, params.base(), prior)

    def result(self, params, prior):
        return self.inner.result(params.base(), prior)

    def refinement(self, result):
        follow = self.inner.refinement(result)
        return _BaseStatistic(follow) if follow is not None else None


def shared_vector(group: TensorGroup, p: MmerParams, stats: dict, taus: torch.Tensor) -> torch.Tensor:
    """τ* of this chunk from the task vectors `taus` (left unchanged)."""
    bp = p.base()
    if p.base_method == "ties":
        return ties_vector(group, bp, stats, deltas=taus.clone()).mul_(bp.lam)
    if p.base_method == "task_arithmetic":
        w = group.weights / group.weights.sum() if bp.normalize else group.weights
        return ops.weighted_sum(taus, w).mul_(bp.lam)
    return neuromerging_vector(group, bp, stats)  # consumes the models stack (taus is a copy)


def mmer(group: TensorGroup, p: MmerParams, stats: dict) -> Merged:
    taus = group.task_vectors()
    return masked_merge(group, taus, shared_vector(group, p, stats, taus), group.per_model(p, "lambda"))


def mmer_statistics(p: MmerParams) -> list[Statistic]:
    return [_BaseStatistic(s) for s in BASE_METHODS[p.base_method].statistics(p.base())]


MMER = Method(
    "mmer", mmer, MmerParams,
    summary="MMER: merge the LLMs of multimodal models (TIES or another base_method), one binary mask per "
            "modality; encoders and projectors reused (decoupled output).",
    min_models=1,
    statistics=mmer_statistics,
    chunkable=lambda p, info: BASE_METHODS[p.base_method].chunkable(p.base(), info),
    decoupled=True,
    runs="composed",
)
