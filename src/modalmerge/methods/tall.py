"""TALL masks (spec 6, Wang et al. 2024): one shared vector, one binary mask per task.

τ_MTL = Σ_t w_t τ_t (`shared: sum`, default) or the unscaled TIES vector with disjoint sum
(`shared: ties`). Task t keeps the entries where its own task vector dominates the others'
contribution: m_t = 1{|τ_t| ≥ λ_t·|τ_MTL − τ_t|}, and is served by θ_0 + m_t ⊙ τ_MTL.
Recipe weights scale the task vectors inside τ_MTL (default 1); the masks compare each
model's own τ_t, since m_t ⊙ τ_MTL stands in for that model.

The loadable weights of the output folder are the text weights θ_0 + m̄ ⊙ τ_MTL (m̄ the mean
mask); the `decoupled/` part holds τ_MTL and the bit-packed masks, from which
`modalmerge extract` rebuilds each task's model as W_text + (m_t − m̄) ⊙ τ_MTL.
"""

from __future__ import annotations

from .base import Merged, Method, Stats, TensorGroup
from .task_masks import TallParams, masked_merge, shared_chunkable, shared_statistics, shared_vector

__all__ = ["TALL", "TallParams"]


def tall(group: TensorGroup, p: TallParams, stats: Stats) -> Merged:
    taus = group.task_vectors()
    return masked_merge(group, taus, shared_vector(group, p, stats, taus), group.per_model(p, "lambda"))


TALL = Method(
    "tall", tall, TallParams,
    summary="TALL masks: a shared task vector plus one binary mask per task (decoupled output).",
    min_models=2,
    statistics=shared_statistics,
    chunkable=shared_chunkable,
    decoupled=True,
)
