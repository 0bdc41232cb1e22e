"""MMER (spec 7, Li, Du et al. 2025): merge the LLMs of N multimodal models, then decouple them
with one binary mask per modality (or task).

τ* = a merge of the task vectors τ_i = θ_i − θ_0 (`base_method`, default TIES with k = 0.2,
λ = 1, disjoint mean; `base_params` sets that method's own parameters). Modality i keeps
m_i = 1{|τ_i| ≥ λ_i·|τ* − τ_i|} (λ_i per model, default 1: the exact L1-optimal binary mask)
and is served by θ_0 + m_i ⊙ τ*. The loadable weights are the text weights θ_0 + m̄ ⊙ τ*.

This kernel sees LLM tensors only; which tensors those are, and the encoders and projectors
that ride along unchanged, is the engine's business (procedures/mmer.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from pydantic import Field, field_validator

from .. import ops
from .base import Merged, Method, Params, Statistic, Stats, TensorGroup, TensorInfo, parse_params
from .combine import TaskArithmeticParams
from .neuron_subspaces import NeuroMergingParams, neuromerging_statistics, neuromerging_vector, neuron_chunkable
from .sign_election import TiesParams, ties_statistics, ties_vector
from .task_masks import masked_merge


@dataclass(frozen=True)
class BaseMerge:
    """A merge that may supply τ*: its parameters, statistics passes and row-block rule (as the
    method of that name declares them)."""

    params: type[Params]
    statistics: Callable[[Any], list[Statistic]]
    chunkable: Callable[[Any, TensorInfo], bool]


BASE_METHODS = {
    "ties": BaseMerge(TiesParams, ties_statistics, lambda p, info: True),
    "neuromerging": BaseMerge(NeuroMergingParams, neuromerging_statistics, neuron_chunkable),
    "task_arithmetic": BaseMerge(TaskArithmeticParams, lambda p: [], lambda p, info: True),
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
        name = info.data.get("base_method", "ties")
        if name in BASE_METHODS:
            parse_params(BASE_METHODS[name].params, v, name, where="base_params")
        return v

    def base(self) -> Params:
        """The base method's validated parameters (task arithmetic: λ defaults to 1 here)."""
        raw = dict(self.base_params)
        if self.base_method == "task_arithmetic":
            raw.setdefault("lambda", 1.0)
        return BASE_METHODS[self.base_method].params.model_validate(raw)


class BaseStatistic(Statistic):
    """A statistics pass of the base method, shown the base method's parameters; its result is
    the inner pass's (stats.get(TaskMagnitudes))."""

    def __init__(self, inner: Statistic):
        self.inner = inner
        self.name = inner.name
        self.sampled = inner.sampled

    @property
    def provides(self) -> type[Statistic]:
        return self.inner.provides

    def observe(self, group, params, prior):
        self.inner.observe(group, params.base(), prior)

    def result(self, params, prior):
        return self.inner.result(params.base(), prior)

    def refinement(self, result):
        follow = self.inner.refinement(result)
        return BaseStatistic(follow) if follow is not None else None


def shared_vector(group: TensorGroup, p: MmerParams, stats: Stats, taus: torch.Tensor) -> torch.Tensor:
    """τ* of this chunk from the task vectors `taus` (left unchanged)."""
    bp = p.base()
    if p.base_method == "ties":
        return ties_vector(group, bp, stats, deltas=taus.clone()).mul_(bp.lam)
    if p.base_method == "task_arithmetic":
        w = group.weights / group.weights.sum() if bp.normalize else group.weights
        return ops.weighted_sum(taus, w).mul_(bp.lam)
    return neuromerging_vector(group, bp, stats)


def mmer(group: TensorGroup, p: MmerParams, stats: Stats) -> Merged:
    taus = group.task_vectors()
    return masked_merge(group, taus, shared_vector(group, p, stats, taus), group.per_model(p, "lambda"))


def mmer_statistics(p: MmerParams) -> list[Statistic]:
    return [BaseStatistic(s) for s in BASE_METHODS[p.base_method].statistics(p.base())]


MMER = Method(
    "mmer", mmer, MmerParams,
    summary="MMER: merge the LLMs of multimodal models (TIES or another base_method), one binary mask per "
            "modality; encoders and projectors reused (decoupled output).",
    min_models=1,
    statistics=mmer_statistics,
    chunkable=lambda p, info: BASE_METHODS[p.base_method].chunkable(p.base(), info),
    decoupled=True,
    runs="composed",
    reads_parts=True,
)
