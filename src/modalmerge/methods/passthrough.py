"""Passthrough (mergekit's `passthrough`): one model's tensors as they are, optionally scaled.

What layer stacking needs (`slices:`, engine/slices.py): each output tensor is a copy of one input
tensor, or that tensor times `scale` (mergekit's per-input `scale`, usually given with a filter,
e.g. `scale: [{filter: o_proj, value: 0.0}, {value: 1.0}]` to zero some projections). Exactly one
model, no base.
"""

from pydantic import Field

from .base import Merged, MergekitForm, Method, Params, Stats, TensorGroup


class PassthroughParams(Params):
    per_model = frozenset({"scale"})
    scale: float | None = Field(None, description="multiply the tensor by this (none: copy it unchanged)")


def passthrough(group: TensorGroup, p: PassthroughParams, stats: Stats) -> Merged:
    scale = group.per_model(p, "scale")[0]
    tensor = group.models[0]
    return Merged(tensor.clone() if scale is None else tensor * scale)


PASSTHROUGH = Method(
    "passthrough", passthrough, PassthroughParams,
    summary="One model's tensors, copied or scaled (layer stacking with `slices`).",
    base="forbidden", min_models=1, max_models=1,
    mergekit=(MergekitForm("passthrough"),),
    weighted=False,
)
