"""NearSwap (mergekit 0.1.5's `nearswap`): take the model's value where it is near the base's.

Per entry, with a = the base's value and b = the one model's: w = clamp(t / max(|a − b|, 1e-6),
0, 1), θ = w·b + (1 − w)·a. Entries closer than `t` become the model's; farther ones move
towards it by t / |a − b| of the way, so large differences stay close to the base.

Elementwise: a tensor may be cut into row blocks freely.
"""

from pydantic import Field

from .base import Merged, MergekitForm, Method, Params, Stats, TensorGroup

# mergekit's floor on |a − b|, so equal entries give w = 1 (t > 0) without dividing by 0
_DISTANCE_FLOOR = 1e-6


class NearswapParams(Params):
    t: float = Field(ge=0, description="distance below which the model's value replaces the base's (required)")


def nearswap(group: TensorGroup, p: NearswapParams, stats: Stats) -> Merged:
    base, model = group.base, group.models[0]
    weight = (p.t / (base - model).abs().clamp(min=_DISTANCE_FLOOR)).clamp(min=0, max=1)
    return Merged(weight * model + (1 - weight) * base)


NEARSWAP = Method(
    "nearswap", nearswap, NearswapParams,
    summary="Per entry, take the one model's value where it is within t of the base's, else move a distance t "
            "from the base towards it.",
    min_models=1,
    max_models=1,
    weighted=False,
    mergekit=(MergekitForm("nearswap"),),
)
