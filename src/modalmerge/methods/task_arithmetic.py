"""Task arithmetic (spec 1): θ = θ_0 + λ Σ_t w_t τ_t. Negative weights subtract (forgetting)."""

from pydantic import Field

from .. import ops
from .base import Merged, Method, Params, TensorGroup


class TaskArithmeticParams(Params):
    lam: float = Field(0.3, alias="lambda", description="scale of the summed task vectors")
    normalize: bool = Field(False, description="divide the weights by their sum first")


def task_arithmetic(group: TensorGroup, p: TaskArithmeticParams, stats) -> Merged:
    w = group.weights
    if p.normalize and abs(float(w.sum())) >= 1e-8:  # weights summing to 0 are left as they are (as mergekit)
        w = w / w.sum()
    if group.fused_inputs and group.raw_base is not None:
        base = group.raw_base.reshape(-1)
        try:
            summed = ops.fused.weighted_delta_sum(base, [m.reshape(-1) for m in group.raw_models], w)
            return Merged(summed.mul_(p.lam).add_(base).reshape(group.chunk_shape))
        except ops.fused.FusedUnavailable:
            group.materialize()
    return Merged(ops.weighted_sum(group.take_task_vectors(), w).mul_(p.lam).add_(group.base))


TASK_ARITHMETIC = Method(
    "task_arithmetic", task_arithmetic, TaskArithmeticParams,
    summary="Add the weighted sum of the task vectors, scaled by lambda, to the base.",
    mergekit_names=("task_arithmetic",),
    fused=True,
)
