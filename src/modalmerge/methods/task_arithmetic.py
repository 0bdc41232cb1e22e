"""Task arithmetic (spec 1): θ = θ_0 + λ Σ_t w_t τ_t. Negative weights subtract (forgetting)."""

from .base import Merged, MergekitForm, Method, Stats, TensorGroup
from .combine import TaskArithmeticParams, task_arithmetic_vector

__all__ = ["TASK_ARITHMETIC", "TaskArithmeticParams"]


def task_arithmetic(group: TensorGroup, p: TaskArithmeticParams, stats: Stats) -> Merged:
    return Merged(task_arithmetic_vector(group, p).add_(group.inputs().float_base()))


TASK_ARITHMETIC = Method(
    "task_arithmetic", task_arithmetic, TaskArithmeticParams,
    summary="Add the weighted sum of the task vectors, scaled by lambda, to the base.",
    mergekit=(MergekitForm("task_arithmetic", defaults={"normalize": False, "lambda": 1.0}, weight_required=True),),
    fused=True,
)
