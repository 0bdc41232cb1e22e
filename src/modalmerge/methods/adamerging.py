"""AdaMerging (spec 13): task arithmetic with coefficients learned on unlabeled data.

θ = θ_0 + Σ_t λ_t τ_t with one λ per task (granularity `task`) or per task and tensor
(`layer`), initialised at `init`, kept in [0, 1] and fitted by Adam to minimise the entropy
of the merged model's predictions on each model's calibration data. procedures/adamerging_fit.py
learns them before the merge; the kernel reads them as `group.data["adamerging"]` [T].
"""

from typing import Literal

from pydantic import Field

from ..errors import MergeError
from .base import Merged, Method, Params, Stats, TensorGroup


class AdaMergingParams(Params):
    granularity: Literal["task", "layer"] = Field("layer", description="one coefficient per task, or per task and tensor")
    init: float = Field(0.3, ge=0, le=1, description="initial coefficient")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    steps: int = Field(500, ge=0, description="optimisation steps (one calibration batch per model each)")


def adamerging(group: TensorGroup, p: AdaMergingParams, stats: Stats) -> Merged:
    if "adamerging" not in group.data:
        raise MergeError(f"tensor {group.name!r}: no AdaMerging coefficient for it; give one per model and tensor")
    lam = group.data["adamerging"].reshape(group.num_models)
    tau = group.task_vectors()
    return Merged(group.base + (tau * lam.reshape((-1,) + (1,) * (tau.dim() - 1))).sum(dim=0))


ADAMERGING = Method(
    "adamerging", adamerging, AdaMergingParams,
    summary="Task arithmetic whose task-wise or layer-wise coefficients minimise prediction entropy on unlabeled data.",
    data=lambda p: ("adamerging",),
    weighted=False,
)
