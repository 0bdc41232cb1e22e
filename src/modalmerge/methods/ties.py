"""TIES-merging (spec 2): trim each task vector, elect signs by mass, disjoint-merge, scale.

The machinery is sign_election.py's (shared with the methods that trim or elect); the
arithmetic runs in ops.trimmed_merge, on the C kernels where they can run.
"""

import torch

from .base import Merged, MergekitForm, Method, Stats, TensorGroup
from .sign_election import TiesParams, stored_ties_vector, tensor_threshold, ties_statistics

__all__ = ["TIES", "TiesParams"]


def ties(group: TensorGroup, p: TiesParams, stats: Stats) -> Merged:
    return Merged(torch.add(group.inputs().float_base(), stored_ties_vector(group, p, stats), alpha=p.lam))


TIES = Method(
    "ties", ties, TiesParams,
    summary="Trim each task vector, elect signs by mass, average the agreeing values.",
    statistics=ties_statistics,
    tensor_statistic=lambda p: tensor_threshold if p.scope == "tensor" else None,
    fused=True,
    mergekit=(MergekitForm("ties", defaults={"normalize": True, "lambda": 1.0, "density": 1.0}, electing=True, weight_required=True,
                           # mergekit trims per tensor, keeping at least one entry: k = max(1, int(density·n))
                           native={"scope": "tensor", "keep_min": 1}),),
)
