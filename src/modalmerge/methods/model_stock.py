"""Model Stock (spec 5): interpolate between the models' mean and the base by their task vectors' angle.

Per tensor: cos = mean pairwise cosine of the flattened τ_t; t = N·cos / (1 + (N − 1)·cos);
θ = t·mean_t θ_t + (1 − t)·θ_0. A zero task vector has cosine 0 with everything (mergekit
clamps the norm product at 1e-6 instead, which also changes tiny non-zero task vectors).
`filter_wise` takes the cosine per row (mergekit's option), which makes the method row-local.
The recipe's weights are not used (neither the paper nor mergekit has any).
"""

import math

import torch
from pydantic import Field

from .. import ops
from ..errors import MergeError
from .base import Merged, MergekitForm, Method, Params, Stats, TensorGroup


class ModelStockParams(Params):
    filter_wise: bool = Field(False, description="one ratio per row instead of per tensor")


def _tensor_cosine(tau: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine over whole task vectors, thread-count independent (float64 dots)."""
    n = tau.shape[0]
    norms = [math.sqrt(ops.deterministic_dot(tau[i], tau[i])) for i in range(n)]
    total = 0.0
    for i in range(n):
        for j in range(i + 1, n):
            if norms[i] > 0 and norms[j] > 0:
                total += ops.deterministic_dot(tau[i], tau[j]) / (norms[i] * norms[j])
    return torch.tensor(total / (n * (n - 1) / 2), dtype=torch.float64)


def _row_cosine(tau: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine per row: tau [N, rows, n] → [rows] float64."""
    t64 = tau.double()
    n = tau.shape[0]
    norms = t64.norm(dim=-1)
    total = torch.zeros(tau.shape[1], dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            prod = norms[i] * norms[j]
            dot = (t64[i] * t64[j]).sum(dim=-1)
            total += torch.where(prod > 0, dot / torch.where(prod > 0, prod, torch.ones_like(prod)), 0.0)
    return total / (n * (n - 1) / 2)


def model_stock(group: TensorGroup, p: ModelStockParams, stats: Stats) -> Merged:
    n = group.num_models
    tau = group.task_vectors()
    rows = tau.shape[1] if p.filter_wise and len(group.info.shape) >= 2 else 1
    cos = _row_cosine(tau.reshape(n, rows, -1)) if p.filter_wise else _tensor_cosine(tau)
    denom = 1 + (n - 1) * cos
    # the mean pairwise cosine is >= −1/(N−1), so the ratio is undefined only where the task
    # vectors' directions cancel exactly
    if bool((denom <= 1e-12).any()):
        raise MergeError(f"model_stock: tensor {group.name!r}: the task vectors' directions cancel out, so the "
                         "interpolation ratio is undefined; exclude the tensor or use another method")
    t = (n * cos / denom).float()
    mean = ops.weighted_sum(group.models, [1.0 / n] * n)
    shape = (rows,) + (1,) * (len(group.models.shape) - 2) if rows > 1 else ()
    t = t.reshape(shape)
    return Merged(t * mean + (1 - t) * group.base)


MODEL_STOCK = Method(
    "model_stock", model_stock, ModelStockParams,
    summary="Move from the base towards the models' mean by a ratio set by their task vectors' angle.",
    min_models=2,
    # the cosine of a whole tensor needs all of it; per-row cosines do not
    chunkable=lambda p, info: p.filter_wise and len(info.shape) >= 2,
    mergekit=(MergekitForm("model_stock", defaults={"filter_wise": False}),),
    weighted=False,
)
