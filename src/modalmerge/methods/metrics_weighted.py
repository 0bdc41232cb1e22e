"""Metrics-weighted averaging (spec 11): checkpoints of one run, weighted by loss or step.

θ = Σ_i w_i θ_i, w_i ∝ r_i · (1/L_i)^p (metric `loss`) or r_i · s_i^p (metric `step`), normalised to
sum 1, with r_i the recipe weight (default 1). p = 0 is the plain average. Each model's L_i / s_i is
its per-model parameter `loss` / `step`; where a recipe leaves it out, the engine reads it from the
checkpoint folder's Hugging Face `trainer_state.json` when the plan is built (engine/metrics.py).

LoRA checkpoints: an adapter source is densified per tensor as θ_0 + B·A·scale, so with weights
summing to 1 the average of the densified tensors is θ_0 + Σ_i w_i B_i·A_i·scale_i, the average of
the effective ΔW (never of A and B separately). A base, when given, is not needed and not read.
"""

from typing import Literal

import torch
from pydantic import Field

from .. import ops
from ..errors import MergeError
from .base import Merged, Method, Params, Stats, TensorGroup


class MetricsWeightedParams(Params):
    per_model = frozenset({"loss", "step"})

    metric: Literal["loss", "step"] = Field("loss", description="weight by (1/loss)^p or step^p")
    p: float = Field(1.0, description="sharpness: 0 is the uniform average")
    loss: float | None = Field(None, gt=0, description="per model: its loss (else from trainer_state.json)")
    step: float | None = Field(None, gt=0, description="per model: its step (else from trainer_state.json)")


def metric_weights(p: MetricsWeightedParams, values: list[float], recipe_weights: list[float]) -> list[float]:
    """The normalised weights w_i."""
    raw = [r * ((1.0 / v) ** p.p if p.metric == "loss" else v ** p.p) for v, r in zip(values, recipe_weights)]
    total = sum(raw)
    if total == 0:
        raise MergeError("metrics_weighted: the weights sum to 0; check the models' `weight`s")
    return [w / total for w in raw]


def metrics_weighted(group: TensorGroup, p: MetricsWeightedParams, stats: Stats) -> Merged:
    values = group.per_model(p, p.metric)
    missing = [n for n, v in zip(group.model_names, values) if v is None]
    if missing:
        raise MergeError(f"metrics_weighted: model {missing[0]!r} has no {p.metric}; give `params: {{{p.metric}: …}}` "
                         "for it in the recipe or keep its trainer_state.json in the checkpoint folder")
    w = metric_weights(p, [float(v) for v in values], group.weights.tolist())
    return Merged(ops.weighted_sum(group.models, torch.tensor(w)))


METRICS_WEIGHTED = Method(
    "metrics_weighted", metrics_weighted, MetricsWeightedParams,
    summary="Average checkpoints of one run weighted by (1/loss)^p or step^p (LoRA: the effective B·A).",
    base="optional",
    metrics=("loss", "step"),
)
