"""NuSLERP (mergekit 0.1.5's `nuslerp`): spherical interpolation of two models set by their weights.

t = w₁ / (w₀ + w₁) from the two models' recipe weights (0.5 when the weights sum to ~0). With a
base model the two task vectors τ = θ − θ_0 are interpolated and the base added back; without
one, the weights themselves. For each vector pair (v0, v1): cos = <v0/‖v0‖, v1/‖v1‖> (norms
clamped at 1e-7); where 1 − cos² ≤ 1e-16 (colinear) plain linear interpolation (1 − t)v0 + t·v1,
else θ = arccos(cos) and [sin((1 − t)θ)·v0 + sin(tθ)·v1] / sin θ on the unnormalised vectors.

Which vectors: `nuslerp_flatten` (the default) takes each whole tensor as one vector; otherwise
the vectors run along the last axis (a matrix's rows), or with `nuslerp_row_wise` along the first
axis (a matrix's columns; mergekit's naming). Row vectors are row-local, so such tensors may be
merged in row blocks.
"""

import torch
from pydantic import Field

from .base import Merged, MergekitForm, Method, Params, Stats, TensorGroup
from .spherical import dot32, norm32, row_dot32, row_norm32

# mergekit's constants: the unit-vector norm clamp and the colinearity threshold (1 − cos² ≤ EPS²)
NORM_CLAMP = 1e-7
EPS = 1e-8
# weights summing to less than this in magnitude give t = 0.5 (mergekit)
ZERO_TOTAL = 1e-6


class NuslerpParams(Params):
    nuslerp_flatten: bool = Field(True, description="interpolate each whole tensor as one vector")
    nuslerp_row_wise: bool = Field(False, description="without flatten: vectors along the first axis (columns) "
                                                      "instead of the last (rows)")


def interpolation_position(weights: list[float]) -> float:
    """t from the two models' weights, as mergekit takes it."""
    total = sum(weights)
    return 0.5 if abs(total) < ZERO_TOTAL else weights[1] / total


def nuslerp_pair(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool) -> torch.Tensor:
    """Spherical interpolation of v0 and v1, vector by vector (see the module docstring)."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    # one vector: the thread-count independent whole-tensor reductions; else one per row
    whole = v0.dim() == 1
    norm = (lambda x: norm32(x).reshape(1)) if whole else row_norm32
    dot = (lambda a, b: dot32(a, b).reshape(1)) if whole else row_dot32
    u0 = v0 / norm(v0).clamp(min=NORM_CLAMP)
    u1 = v1 / norm(v1).clamp(min=NORM_CLAMP)
    cos = dot(u0, u1).clamp(-1, 1)
    colinear = (1 - cos.square()) <= EPS ** 2
    # the colinear branch's angle is kept finite; its spherical value is discarded below
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def nuslerp(group: TensorGroup, p: NuslerpParams, stats: Stats) -> Merged:
    t = interpolation_position([float(w) for w in group.weights.tolist()])
    v0, v1 = group.models[0], group.models[1]
    if group.base is None:
        return Merged(nuslerp_pair(t, v0, v1, p.nuslerp_row_wise, p.nuslerp_flatten))
    base = group.base
    return Merged(base + nuslerp_pair(t, v0 - base, v1 - base, p.nuslerp_row_wise, p.nuslerp_flatten))


NUSLERP = Method(
    "nuslerp", nuslerp, NuslerpParams,
    summary="Spherical interpolation of two models (or their task vectors), positioned by their weights.",
    base="optional", min_models=2, max_models=2,
    # vectors along the last axis lie whole inside a block of rows; other layouts need the whole tensor
    chunkable=lambda p, info: not p.nuslerp_flatten and not p.nuslerp_row_wise and len(info.shape) >= 2,
    mergekit=(MergekitForm("nuslerp", weight_required=True),),
)
