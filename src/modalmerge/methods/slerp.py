"""SLERP (spec 5): spherical interpolation between exactly two models, per tensor.

dot = cosine of the two flattened tensors; where |dot| > 0.9995 (nearly colinear) plain linear
interpolation, else ω = arccos(dot), θ = [sin((1 − t)ω)·v0 + sin(tω)·v1] / sin ω on the
unnormalised tensors. A tensor that is all zeros in either model has no direction: linear
interpolation too (mergekit would use ω = π/2 there). t = 0 gives the first model.

No base: in a mergekit recipe `base_model` is the first endpoint (t = 0) and the other model
the second.
"""

import math

from pydantic import Field

from .. import ops
from .base import Merged, MergekitForm, Method, Params, Stats, TensorGroup

DOT_THRESHOLD = 0.9995


class SlerpParams(Params):
    t: float = Field(0.5, ge=0, le=1, description="position between the first model (0) and the second (1)")


def slerp(group: TensorGroup, p: SlerpParams, stats: Stats) -> Merged:
    v0, v1 = group.models[0], group.models[1]
    t = p.t
    n0 = math.sqrt(ops.deterministic_dot(v0, v0))
    n1 = math.sqrt(ops.deterministic_dot(v1, v1))
    dot = ops.deterministic_dot(v0, v1) / (n0 * n1) if n0 > 0 and n1 > 0 else 1.0
    if abs(dot) > DOT_THRESHOLD:
        return Merged((1 - t) * v0 + t * v1)
    omega = math.acos(max(-1.0, min(1.0, dot)))
    sin_omega = math.sin(omega)
    return Merged((math.sin((1 - t) * omega) / sin_omega) * v0 + (math.sin(t * omega) / sin_omega) * v1)


SLERP = Method(
    "slerp", slerp, SlerpParams,
    summary="Spherical interpolation between two models, tensor by tensor.",
    base="forbidden", min_models=2, max_models=2,
    # the angle is between whole tensors
    chunkable=lambda p, info: False,
    mergekit=(MergekitForm("slerp"),),
    weighted=False,
)
