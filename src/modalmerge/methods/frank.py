"""Layer-wise fusion of a multimodal model with a reasoning LLM (spec 12, FRANK 2025).

Both models are fine-tuned from one base LLM. Per decoder block l (a tensor with a layer index,
outside the encoder and projector): λ_t^(l) = w_t^(l)·‖τ_t^(l)‖² / Σ_u w_u^(l)·‖τ_u^(l)‖² with
‖τ_t^(l)‖² summed over all the block's merged tensors (a statistics pass), and
θ^(l) = θ_0^(l) + Σ_t λ_t^(l) τ_t^(l). The vision prior w_V^(l) = e^(−a·l) / Σ_j e^(−a·j) over the
blocks j = 0 … L−1, w_R = 1 − w_V. Every other tensor — encoder and projector (TensorInfo.part),
embeddings, final norm, LM head (no layer index) — is the multimodal model's.

Roles are the per-model parameter `role: vision | reasoning`; without any, the first model is
the multimodal one and the rest reasoning models. Exactly one model is `vision`.
`a` is a parameter (no published default; 0.1 here): fitting it from the multimodal model's
text-to-visual-token attention on unlabeled images needs a calibration-data hook, not done.
Where every ‖τ_t^(l)‖² is 0 the block keeps the base. The recipe's weights are not used.
"""

import math
from typing import Any, Literal

from pydantic import Field

from .. import ops
from ..errors import MergeError
from .base import Merged, Method, Params, Statistic, TensorGroup, TensorInfo


class FrankParams(Params):
    per_model = frozenset({"role"})

    a: float = Field(0.1, description="decay of the vision prior over depth: w_V(l) ∝ exp(-a l)")
    role: Literal["vision", "reasoning"] | None = Field(
        None, description="per model: vision (the multimodal model) or reasoning; default first=vision")


def is_block(info: TensorInfo) -> bool:
    return info.layer is not None and info.part in ("llm", "all")


def roles(group: TensorGroup, p: FrankParams) -> list[str]:
    given = group.per_model(p, "role")
    if all(r is None for r in given):
        given = ["vision"] + ["reasoning"] * (group.num_models - 1)
    given = [r or "reasoning" for r in given]
    if given.count("vision") != 1:
        raise MergeError(f"frank: exactly one model must have `role: vision` (the multimodal model), the recipe "
                         f"has {given.count('vision')}; set `params: {{role: vision}}` on one model")
    return given


def vision_prior(a: float, num_layers: int) -> list[float]:
    e = [math.exp(-a * j) for j in range(num_layers)]
    total = sum(e)
    return [x / total for x in e]


class LayerNorms(Statistic):
    """Per block and model, ‖τ_t^(l)‖² over the block's merged tensors (every element)."""

    name = "layer_norms"

    def __init__(self):
        self.sq: dict[int, list[float]] = {}

    def observe(self, group: TensorGroup, params: Params, prior: dict[str, Any]) -> None:
        if not is_block(group.info):
            return
        tau = group.task_vectors()
        acc = self.sq.setdefault(group.info.layer, [0.0] * group.num_models)
        for t in range(group.num_models):
            acc[t] += ops.deterministic_dot(tau[t], tau[t])

    def result(self, params: Params, prior: dict[str, Any]) -> dict[int, list[float]]:
        return self.sq


def frank(group: TensorGroup, p: FrankParams, stats: dict) -> Merged:
    r = roles(group, p)
    vision = r.index("vision")
    if not is_block(group.info):
        return Merged(group.models[vision].clone())
    norms = stats["layer_norms"]
    num_layers = max(norms) + 1
    w_v = vision_prior(p.a, num_layers)[group.info.layer]
    w = [w_v if role == "vision" else 1.0 - w_v for role in r]
    mass = [wt * n for wt, n in zip(w, norms[group.info.layer])]
    total = sum(mass)
    lam = [m / total if total > 0 else 0.0 for m in mass]
    return Merged(ops.weighted_sum(group.take_task_vectors(), lam).add_(group.base))


FRANK = Method(
    "frank", frank, FrankParams,
    summary="Per decoder block, weight each task vector by its squared norm times a depth prior (vision vs reasoning).",
    min_models=2,
    statistics=lambda p: [LayerNorms()],
)
