"""Multi-SLERP (mergekit 0.1.5's `multislerp`): a weighted mean of N models on the hypersphere.

Per tensor, each model's vector x_t (the task vector θ_t − θ_0 with a base, else θ_t; whole
tensors, flattened) is put on the unit sphere, u_t = x_t / (‖x_t‖ + eps). With weights w (divided
by their sum when `normalize_weights`): m = Σ w_t u_t, normalised; the tangent vectors
u_t − <u_t, m>·m are averaged with the weights into v, and the result is the exponential map
m·cos‖v‖ + v·sin‖v‖/‖v‖ (‖v‖ + eps), scaled by the weighted mean norm Σ w_t ‖x_t‖ (plus the base).

A single model is returned as it is. When the weighted directions cancel (‖m‖ < eps), two models
fall back to the weighted sum w₀x₀ + w₁x₁; more are an error, as in mergekit.
"""

import torch
from pydantic import Field

from ..errors import MergeError
from .base import Merged, MergekitForm, Method, Params, Stats, TensorGroup
from .spherical import dot32, norm32


class MultislerpParams(Params):
    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: float = Field(1e-8, gt=0, description="added to norms so that zero vectors stay finite")


def multislerp(group: TensorGroup, p: MultislerpParams, stats: Stats) -> Merged:
    n = group.num_models
    if n == 1:
        return Merged(group.models[0].clone())
    base = group.base
    weights = group.weights.clone()
    if p.normalize_weights:
        total = weights.sum()
        if float(total) == 0:
            raise MergeError("multislerp: the models' weights sum to 0, so they cannot be normalised; change a "
                             "`weight` or set `normalize_weights: false`")
        weights = weights / total

    # one model at a time, so that no [N, numel] temporary is made beside the inputs' stack (a
    # 32k-vocabulary embedding of 8 models is 1 GB per such stack); the sums run in model order,
    # as mergekit's sums over the stacked models do
    def vector(i: int) -> torch.Tensor:
        x = group.models[i].reshape(-1)
        return x if base is None else x - base.reshape(-1)

    norms = torch.stack([norm32(vector(i)) for i in range(n)])

    def unit(i: int) -> torch.Tensor:
        return vector(i) / (norms[i] + p.eps)

    mean = torch.zeros_like(group.models[0].reshape(-1))
    for i in range(n):
        mean.add_(unit(i) * weights[i])
    mean_norm = norm32(mean)
    if float(mean_norm) < p.eps:
        if n == 2:
            merged = (vector(0) * weights[0] + vector(1) * weights[1]).reshape(group.chunk_shape)
            return Merged(merged if base is None else merged + base)
        raise MergeError(f"multislerp: tensor {group.name!r}: the models' weighted directions cancel out "
                         "(opposite tensors with balancing weights), so their mean has no direction; change the "
                         "weights or exclude the tensor")
    mean.div_(mean_norm)

    # into the tangent space at the mean, average there, and back onto the sphere
    tangent = torch.zeros_like(mean)
    for i in range(n):
        u = unit(i)
        tangent.add_((u - dot32(u, mean) * mean) * weights[i])
    tangent_norm = norm32(tangent) + p.eps
    on_sphere = mean.mul_(torch.cos(tangent_norm)).add_(tangent.mul_(torch.sin(tangent_norm) / tangent_norm))

    mean_length = (norms * weights).sum()
    merged = (on_sphere * mean_length).reshape(group.chunk_shape)
    return Merged(merged if base is None else merged + base)


MULTISLERP = Method(
    "multislerp", multislerp, MultislerpParams,
    summary="Weighted mean of N models (or task vectors) on the hypersphere, scaled by their mean norm.",
    base="optional", min_models=1,
    # the norms and the mean direction are over whole tensors
    chunkable=lambda p, info: False,
    mergekit=(MergekitForm("multislerp", weight_required=True),),
)
