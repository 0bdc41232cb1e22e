"""NeuroMerging (spec 8): merge inside each neuron's parallel and orthogonal subspaces (the
maths: neuron_subspaces.py).

θ = θ_0 + τ̄, τ̄ = λ1·parallel + λ2·orthogonal (point parameters: λ2·TIES).
"""

from __future__ import annotations

from .base import Merged, Method, Stats, TensorGroup
from .neuron_subspaces import NeuroMergingParams, neuromerging_statistics, neuromerging_vector, neuron_chunkable

__all__ = ["NEUROMERGING", "NeuroMergingParams", "neuromerging_vector"]


def neuromerging(group: TensorGroup, p: NeuroMergingParams, stats: Stats) -> Merged:
    return Merged(group.base + neuromerging_vector(group, p, stats))


NEUROMERGING = Method(
    "neuromerging", neuromerging, NeuroMergingParams,
    summary="Trim task vectors, then TIES-merge each neuron's parallel scalars and its orthogonal "
            "parts in their SVD basis.",
    statistics=neuromerging_statistics,
    chunkable=neuron_chunkable,
)
