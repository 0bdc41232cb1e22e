"""WIDEN (spec 9, Yu et al. 2024): merge fine-tuned and continued-pretrained models by how much
each input column's magnitude and direction moved from the base.

Per 2-D weight seen as [out, in] (a `x @ W` weight and an embedding are transposed to that
orientation, so an embedding's column is one token), per column j: m_j = ‖W[:, j]‖, D_j = W[:, j]/m_j.
ΔM_n = |m^n − m^0|, ΔD_n = 1 − cos(D^n, D^0) (cosine 0 where a column is zero, as with
F.cosine_similarity's eps). Each is ranked within its model and tensor (stable sort, ties by
column index), normalised to [0, 1): rank / J. Score: softmax of the ranks over the models; where a
rank exceeds t × that model's mean rank, the score is s. w = ½(S^M + S^D), W = W_0 + Σ_n w_n[None, :]·Δ_n.
1-D tensors: significance |Δ| element-wise, ranked, same softmax and calibration, W = W_0 + Σ_n S_n·Δ_n.
Convolutions are flattened to [out, in·k…]. No global λ; the recipe's weights are not used
(the method has none). Rankings span the whole tensor, so it is not chunked.
"""

import torch
from pydantic import Field

from .base import Merged, Method, Params, Stats, TensorGroup


class WidenParams(Params):
    t: float = Field(1.0, ge=0, description="calibrate where a rank exceeds t x the model's mean rank")
    s: float = Field(1.0, description="the score given to those calibrated entries")


def within_model_rank(x: torch.Tensor) -> torch.Tensor:
    """x [N, J] → each entry's rank within its row, divided by J (in [0, 1))."""
    n, j = x.shape
    order = torch.argsort(x, dim=1, stable=True)
    ranks = torch.empty_like(x)
    ranks.scatter_(1, order, (torch.arange(j, dtype=x.dtype) / j).expand(n, j).contiguous())
    return ranks


def scores(ranks: torch.Tensor, t: float, s: float) -> torch.Tensor:
    """Softmax over models, then the calibration: ranks above t × their model's mean get s."""
    out = torch.softmax(ranks, dim=0)
    important = ranks > ranks.mean(dim=1, keepdim=True) * t
    return torch.where(important, torch.full_like(out, s), out)


def _as_columns(group: TensorGroup, x: torch.Tensor) -> torch.Tensor:
    """[N, *shape] → [N, out, in] with the input columns last (transposes where the spec says)."""
    info = group.info
    x = x.reshape(x.shape[0], x.shape[1], -1)
    if info.kind == "embedding" or info.neuron_dim == 1:
        x = x.transpose(1, 2)
    return x


def widen(group: TensorGroup, p: WidenParams, stats: Stats) -> Merged:
    base = group.base
    deltas = group.task_vectors()
    if base.dim() < 2:
        ranks = within_model_rank(deltas.abs().reshape(group.num_models, -1))
        w = scores(ranks, p.t, p.s).reshape(deltas.shape)
        return Merged(base + (w * deltas).sum(dim=0))
    b = _as_columns(group, base.unsqueeze(0))[0]              # [out, in]
    models = _as_columns(group, group.models)                 # [N, out, in]
    m0 = b.norm(dim=0)                                        # [in]
    mn = models.norm(dim=1)                                   # [N, in]
    dot = (models * b.unsqueeze(0)).sum(dim=1)
    cos = dot / torch.clamp(mn * m0.unsqueeze(0), min=1e-8)
    w = 0.5 * (scores(within_model_rank((mn - m0).abs()), p.t, p.s)
               + scores(within_model_rank(1 - cos), p.t, p.s))   # [N, in]
    merged = b + (w.unsqueeze(1) * _as_columns(group, deltas)).sum(dim=0)
    if group.info.kind == "embedding" or group.info.neuron_dim == 1:
        merged = merged.transpose(0, 1)
    return Merged(merged.reshape(base.shape).contiguous())


WIDEN = Method(
    "widen", widen, WidenParams,
    summary="Weight each input column by how far its magnitude and direction moved (ranked, softmax over models).",
    min_models=1,
    chunkable=lambda p, info: False,
    weighted=False,
)
