"""Linear averaging / model soup (spec 1): θ = Σ w_t θ_t, weights normalised to sum 1."""

from pydantic import Field

from .. import ops
from .base import Merged, MergekitForm, Method, Params, Stats, TensorGroup


class LinearParams(Params):
    normalize: bool = Field(True, description="divide the weights by their sum")


def linear(group: TensorGroup, p: LinearParams, stats: Stats) -> Merged:
    w = group.weights
    if p.normalize:
        w = w / w.sum()
    return Merged(ops.weighted_sum(group.models, w))


LINEAR = Method(
    "linear", linear, LinearParams, base="optional", min_models=1,
    summary="Weighted average of the models' weights (model soup).",
    mergekit=(MergekitForm("linear", defaults={"normalize": True}, base_is_input=True, weight_required=True),),
)
