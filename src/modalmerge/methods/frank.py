"""Layer-wise fusion of a multimodal model with a reasoning LLM (spec 12, FRANK 2025).

Both models are fine-tuned from one base LLM. Per decoder block l (a tensor with a layer index,
outside the encoder and projector): λ_t^(l) = w_t^(l)·‖τ_t^(l)‖² / Σ_u w_u^(l)·‖τ_u^(l)‖² with
‖τ_t^(l)‖² summed over all the block's merged tensors (a statistics pass), and
θ^(l) = θ_0^(l) + Σ_t λ_t^(l) τ_t^(l). The vision prior w_V^(l) = e^(−a·l) / Σ_j e^(−a·j) over the
blocks j = 0 … L−1, w_R = 1 − w_V. Every other tensor — encoder and projector (TensorInfo.part),
embeddings, final norm, LM head (no layer index) — is the multimodal model's.

Roles are the per-model parameter `role: vision | reasoning`; without any, the first model is
the multimodal one and the rest reasoning models. Exactly one model is `vision`.
Where every ‖τ_t^(l)‖² is 0 the block keeps the base. The recipe's weights are not used.

The decay `a` is a number (no published default; 0.1 here) or `fit`: fitted from the
multimodal model's attention on calibration data (the recipe's `calibration:`; only the vision
model needs it — procedures/calibration.py `visual_attention_profile` computes it as
`group.data["visual_attention"]`, a [1, L] row per merged tensor, zeros for reasoning models):

- visual tokens: the batch's boolean `visual_mask` [batch, seq] (kept out of the forward), else
  the positions whose input_ids are the config's image (or video) token id (LLaVA-style models,
  whose input_ids hold one image token per visual feature).
- text queries: the non-visual, non-padding positions after the example's last visual token —
  the ones that, under a causal mask, see every visual token of their example (positions
  before an image see none of it and would only add layer-independent zeros or partial views).
- s_l = mean over examples (those with visual tokens and text after them) of the mean over heads
  and text query positions of the attention mass on visual key positions, at decoder layer l.
- a = −slope of the ordinary least-squares line log s_l = c − a·l over l = 0 … L−1.

The merge report (`Report.statistics["frank"]`) gives a, where it came from, and when fitted
the intercept c and every s_l.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field

from .. import ops
from ..errors import MergeError
from .base import Merged, Method, Params, Statistic, Stats, TensorGroup, TensorInfo

DATA_KIND = "visual_attention"


class FrankParams(Params):
    per_model = frozenset({"role"})

    a: float | Literal["fit"] = Field(
        0.1, description="number or 'fit': decay of the vision prior over depth, w_V(l) ∝ exp(-a l); 'fit' "
                         "fits it to the vision model's text-to-visual-token attention on calibration data")
    role: Literal["vision", "reasoning"] | None = Field(
        None, description="per model: vision (the multimodal model) or reasoning; default first=vision")


def is_block(info: TensorInfo) -> bool:
    return info.layer is not None and info.part in ("llm", "all")


def role_list(given: list[str | None]) -> list[str]:
    """Every model's role from the per-model `role` values (None where not given)."""
    if all(r is None for r in given):
        given = ["vision"] + ["reasoning"] * (len(given) - 1)
    given = [r or "reasoning" for r in given]
    if given.count("vision") != 1:
        raise MergeError(f"frank: exactly one model must have `role: vision` (the multimodal model), the recipe "
                         f"has {given.count('vision')}; set `params: {{role: vision}}` on one model")
    return given


def roles(group: TensorGroup, p: FrankParams) -> list[str]:
    return role_list(group.per_model(p, "role"))


def vision_index(p: FrankParams, model_params: list[dict[str, Any]]) -> int:
    """Which model is the multimodal one, from the recipe's per-model parameters."""
    return role_list([mp.get("role", p.role) for mp in model_params]).index("vision")


def vision_prior(a: float, num_layers: int) -> list[float]:
    # shifted by the largest exponent so a steep (or negative, fitted) a cannot overflow
    top = max(-a * j for j in range(num_layers))
    e = [math.exp(-a * j - top) for j in range(num_layers)]
    total = sum(e)
    return [x / total for x in e]


def fit_decay(shares: list[float]) -> tuple[float, float]:
    """(a, c) of the least-squares line log s_l = c − a·l over l = 0 … L−1."""
    if len(shares) < 2:
        raise MergeError(f"frank: fitting `a` needs at least 2 decoder layers of visual attention, the vision model "
                         f"gave {len(shares)}; give `a` as a number")
    bad = [l for l, s in enumerate(shares) if not (s > 0 and math.isfinite(s))]
    if bad:
        raise MergeError(f"frank: the vision model's text tokens give the visual tokens no attention at layer {bad[0]} "
                         f"(share {shares[bad[0]]}), so log s_l has no fit; check the calibration data's visual "
                         "tokens or give `a` as a number")
    n = len(shares)
    y = [math.log(s) for s in shares]
    x_mean, y_mean = (n - 1) / 2, sum(y) / n
    slope = sum((l - x_mean) * (v - y_mean) for l, v in enumerate(y)) / sum((l - x_mean) ** 2 for l in range(n))
    return -slope, y_mean - slope * x_mean


class FrankStats:
    """The statistics pass's answer: ‖τ_t^(l)‖² per block and model, and the prior's decay."""

    def __init__(self, norms: dict[int, list[float]], a: float, fitted: bool,
                 shares: list[float] | None = None, intercept: float | None = None):
        self.norms, self.a, self.fitted, self.shares, self.intercept = norms, a, fitted, shares, intercept

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"a": self.a, "a_from": "fit" if self.fitted else "parameter"}
        if self.fitted:
            out.update(intercept=self.intercept, visual_attention=self.shares)
        if self.norms:
            out["vision_prior"] = vision_prior(self.a, max(self.norms) + 1)
        return out


class FrankStatistic(Statistic[FrankStats]):
    """Per block and model, ‖τ_t^(l)‖² over the block's merged tensors (every element); with
    `a: fit`, also the vision model's per-layer visual-attention shares, fitted into a."""

    name = "frank"

    def __init__(self):
        self.sq: dict[int, list[float]] = {}
        self.shares: list[float] | None = None

    def observe(self, group: TensorGroup, params: Params, prior: Stats) -> None:
        if params.a == "fit" and self.shares is None and DATA_KIND in group.data:
            self.shares = [float(v) for v in group.data[DATA_KIND][roles(group, params).index("vision")].reshape(-1)]
        if not is_block(group.info):
            return
        tau = group.task_vectors()
        acc = self.sq.setdefault(group.info.layer, [0.0] * group.num_models)
        for t in range(group.num_models):
            acc[t] += ops.deterministic_dot(tau[t], tau[t])

    def result(self, params: Params, prior: Stats) -> FrankStats:
        if params.a != "fit":
            return FrankStats(self.sq, float(params.a), fitted=False)
        if self.shares is None:
            raise MergeError(f"frank: `a: fit` needs the vision model's {DATA_KIND} statistics (from calibration "
                             "data) for the merged tensors and none were given; add `calibration:` to the recipe "
                             "or give `a` as a number")
        a, c = fit_decay(self.shares)
        return FrankStats(self.sq, a, fitted=True, shares=self.shares, intercept=c)


def frank(group: TensorGroup, p: FrankParams, stats: Stats) -> Merged:
    r = roles(group, p)
    vision = r.index("vision")
    if not is_block(group.info):
        return Merged(group.models[vision].clone())
    fs = stats.get(FrankStatistic)
    num_layers = max(fs.norms) + 1
    w_v = vision_prior(fs.a, num_layers)[group.info.layer]
    w = [w_v if role == "vision" else 1.0 - w_v for role in r]
    mass = [wt * n for wt, n in zip(w, fs.norms[group.info.layer])]
    total = sum(mass)
    lam = [m / total if total > 0 else 0.0 for m in mass]
    return Merged(ops.weighted_sum(group.task_vectors(), lam).add_(group.base))


FRANK = Method(
    "frank", frank, FrankParams,
    summary="Per decoder block, weight each task vector by its squared norm times a depth prior (vision vs "
            "reasoning); the prior's decay a is a number or fitted from the vision model's attention to visual "
            "tokens on calibration data (a: fit).",
    min_models=2,
    statistics=lambda p: [FrankStatistic()],
    data=lambda p: (DATA_KIND,) if p.a == "fit" else (),
    weighted=False,
    reads_parts=True,
)
