"""Karcher mean (mergekit 0.1.5's `karcher`): the Riemannian mean of the models on the hypersphere.

Per tensor (whole, flattened), every input counts equally (α = 1/N; mergekit's method has no
weights). Each tensor is split into its norm ‖x_t‖ and direction u_t. Over the directions whose
norm exceeds `tol`, with α renormalised over them: start from the normalised mean Σ α u_t (or the
first direction when that mean is shorter than `tol`), then up to `max_iter` times move along
the mean log map T = Σ α · θ_t/sin θ_t · (u_t − cos θ_t · m) (θ_t = arccos <m, u_t>; directions
within `tol` of m add nothing): m ← cos‖T‖·m + sin‖T‖·T/‖T‖, renormalised; stop when ‖T‖ < tol.
The result is m · Σ_t α ‖x_t‖ (every input's norm, the short ones too); no direction at all gives
zeros.

No base model: mergekit adds a recipe's base_model to the inputs as one more tensor to average,
which is how a mergekit recipe is translated.
"""

import torch
from pydantic import Field

from .base import Merged, MergekitForm, Method, Params, Stats, TensorGroup
from .spherical import dot32, norm32


class KarcherParams(Params):
    max_iter: int = Field(10, ge=0, description="most steps of the fixed-point iteration")
    tol: float = Field(1e-5, gt=0, description="norms, angles and steps below this count as zero")


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], max_iter: int, tol: float) -> torch.Tensor:
    """The weighted Karcher mean of `tensors` (see the module docstring), float32."""
    norms = [norm32(x) for x in tensors]
    units = [torch.zeros_like(x) if float(nrm) == 0.0 else x / nrm for x, nrm in zip(tensors, norms)]
    valid = [i for i, nrm in enumerate(norms) if float(nrm) > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    alpha_sum = sum(alphas[i] for i in valid)
    valid_alphas = [alphas[i] / alpha_sum for i in valid]
    valid_units = [units[i] for i in valid]

    mean = torch.zeros_like(valid_units[0])
    for alpha, unit in zip(valid_alphas, valid_units):
        mean += alpha * unit
    mean_norm = norm32(mean)
    mean = valid_units[0].clone() if float(mean_norm) < tol else mean / mean_norm

    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(valid_alphas, valid_units):
            cos = dot32(mean, unit).clamp(-1.0, 1.0)
            theta = torch.arccos(cos)
            if float(theta) < tol:
                continue  # already at the mean: no pull (and θ/sin θ would be 0/0)
            tangent += alpha * (theta / torch.sin(theta)) * (unit - cos * mean)
        tangent_norm = norm32(tangent)
        if float(tangent_norm) < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        length = norm32(mean)
        if float(length) > tol:
            mean = mean / length

    scale = sum(alpha * nrm for alpha, nrm in zip(alphas, norms))
    return scale * mean


def karcher(group: TensorGroup, p: KarcherParams, stats: Stats) -> Merged:
    n = group.num_models
    if n == 1:
        return Merged(group.models[0].clone())
    tensors = [group.models[i] for i in range(n)]
    return Merged(karcher_mean(tensors, [1.0 / n] * n, p.max_iter, p.tol))


KARCHER = Method(
    "karcher", karcher, KarcherParams,
    summary="Riemannian (Karcher) mean of the models on the hypersphere, scaled by their mean norm.",
    base="forbidden", min_models=1,
    # norms and angles are over whole tensors
    chunkable=lambda p, info: False,
    mergekit=(MergekitForm("karcher", base_is_input=True),),
    weighted=False,
)
