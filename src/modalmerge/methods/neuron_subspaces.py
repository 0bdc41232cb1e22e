"""NeuroMerging's vector (spec 8), shared by NeuroMerging and MMER (base_method: neuromerging).

Per neuron (a row w of the pretrained weight; columns for x @ W tensors; a conv output channel
flattened) each trimmed task vector splits into s_t·w and τ⊥_t = τ_t − s_t·w. The scalars s_t
are merged by TIES election → s̄·w; the τ⊥_t by TIES election on their coordinates in the
stack's own singular basis → c̄·Vᵀ. τ̄ = λ1·parallel + λ2·orthogonal; point parameters get a
plain TIES merge scaled by λ2.

The per-neuron SVDs are batched over all rows through the T × T Gram matrices (T is small):
G = τ⊥τ⊥ᵀ = U S² Uᵀ gives the coordinates C = τ⊥V = U·S directly, and with V = τ⊥ᵀU S⁻¹

    c̄·Vᵀ = Σ_j c̄_j/S_j · (τ⊥ᵀU)_j = (U ū)ᵀ τ⊥,   ū_j = c̄_j / S_j,

where ū_j is the same election run on U's column j (S_j > 0 scales a whole column, so signs,
agreement and the mean scale together). So the merged orthogonal part is a combination of the
tasks' own τ⊥_t with T coefficients per neuron: nothing divides by a small singular value, and a
direction contributes at most its own energy, so rank-deficient stacks stay finite.
"""

from __future__ import annotations

from typing import Callable

import torch
from pydantic import Field

from .. import ops
from ..errors import MergeError
from .base import Params, Statistic, Stats, TensorGroup, TensorInfo
from .sign_election import elect_merge, trimmed_weighted_deltas
from .statistics import TaskMagnitudes

# Directions with σ² below this fraction of the neuron's largest are numerically null (σ below
# ~1e-6 of the largest, under float32 rounding of the data): they carry no coordinates.
_NULL_RTOL = 1e-12
# float64 Gram blocks of about this many elements: small enough to stay in cache.
_GRAM_BLOCK_ELEMS = 1 << 19


class NeuroMergingParams(Params):
    per_model = frozenset({"density"})

    density: float = Field(0.2, gt=0, le=1, description="kept fraction of each task vector (global trim per task)")
    lambda1: float = Field(0.0, description="scale of the merged parallel (along the pretrained neuron) part")
    lambda2: float | None = Field(None, description="scale of the merged orthogonal part and of point parameters; "
                                  "default 1/(1 - sigma), sigma = the largest L1 fraction the trim removes")
    energy_threshold: float = Field(1.0, gt=0, le=1, description="per neuron, keep the leading singular directions "
                                    "holding this fraction of the sigma^2 energy (1: full rank)")


def neuromerging_statistics(p: NeuroMergingParams) -> list[Statistic]:
    return [TaskMagnitudes()]


def neuron_chunkable(p: NeuroMergingParams, info: TensorInfo) -> bool:
    # row blocks hold whole neurons only when neurons are rows
    return info.neuron_dim in (0, None)


def orthogonal_scale(group: TensorGroup, p: NeuroMergingParams, stats: Stats) -> float:
    """λ2: the parameter, or 1/(1 − σ) with σ = max_t ‖τ_t − trim(τ_t)‖₁ / ‖τ_t‖₁."""
    if p.lambda2 is not None:
        return p.lambda2
    if all(d >= 1 for d in group.per_model(p, "density")):
        return 1.0
    # one model-wide value (the result keeps the fractions: computed once, not per tensor)
    sigma = max(stats.get(TaskMagnitudes).removed_l1_fraction(), default=0.0)
    if sigma >= 1.0:
        raise MergeError(f"neuromerging: the trim removes all of a task vector (sigma = {sigma:.6g}), so "
                         "lambda2 = 1/(1 - sigma) is undefined; raise `density` or set `lambda2`")
    return 1.0 / (1.0 - sigma)


def _has_neurons(info: TensorInfo, ndim: int) -> bool:
    return info.neuron_dim is not None and ndim >= 2


def _rows(x: torch.Tensor, dim: int) -> torch.Tensor:
    """[*shape] → [neurons, d]: the neuron axis first, the rest flattened (conv channels too)."""
    y = x.movedim(dim, 0)
    return y.reshape(y.shape[0], -1)


def _unrows(rows: torch.Tensor, shape: tuple[int, ...], dim: int) -> torch.Tensor:
    moved = (shape[dim],) + tuple(s for i, s in enumerate(shape) if i != dim)
    return rows.reshape(moved).movedim(0, dim)


def parallel_scalars(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """s_t = ⟨τ_t, w⟩/⟨w, w⟩ per neuron, [T, rows]; 0 where w = 0 (all of τ is orthogonal)."""
    ww = (w * w).sum(-1)
    dots = torch.einsum("trd,rd->tr", x, w)
    return torch.where(ww > 0, dots / torch.where(ww > 0, ww, torch.ones_like(ww)), torch.zeros_like(dots))


def coordinate_coefficients(gram: torch.Tensor, u: torch.Tensor, lam: torch.Tensor, weights: torch.Tensor,
                            energy_threshold: float) -> torch.Tensor:
    """The merged orthogonal part of each neuron as coefficients on its tasks' τ⊥_t.

    gram: [rows, T, T] = τ⊥τ⊥ᵀ; u: [rows, T, r] its eigenvectors (columns by descending σ),
    lam: [rows, r] their σ². Returns a: [rows, T] with c̄·Vᵀ = Σ_t a_t τ⊥_t. The answer does not
    depend on the sign of any column of u: flipping it flips C[:, j], the elected sign and c̄_j.
    """
    lam = lam.clamp_min(0)
    keep = lam > lam[:, :1] * _NULL_RTOL
    if energy_threshold < 1.0:
        before = torch.cumsum(lam, dim=-1) - lam
        keep &= before < energy_threshold * lam.sum(-1, keepdim=True)
    # C/S = G U Λ⁻¹ (= U in exact arithmetic): a task whose τ⊥ is 0 (a row the trim emptied) has
    # a zero row of G, so its coordinates are exactly 0 and stay out of the disjoint mean, where
    # u's rounding noise (~1e-17) would count as a vote.
    coords = (gram @ u) / torch.where(keep, lam, torch.ones_like(lam)).unsqueeze(1)
    # An exact zero-sum tie would fall to the SVD's arbitrary sign convention; orient each
    # direction so its largest coordinate (the first task of equal ones) is positive, and ties go
    # to +: the elected sign is then convention-free (the tensor-total rule means nothing here).
    pivot = coords.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(coords.gather(1, pivot))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    ubar = ops.elect_and_merge((coords * sign).transpose(0, 1), "mean", 1.0, weights.to(u.dtype))  # [rows, r]
    return torch.einsum("btr,br->bt", u * sign, ubar * keep)


def orthogonal_merge(perp: torch.Tensor, weights: torch.Tensor, energy_threshold: float) -> torch.Tensor:
    """Per row, c̄·Vᵀ of the stack perp [T, rows, d] (batched thin SVDs via T × T Grams)."""
    t, rows, d = perp.shape
    out = torch.empty((rows, d), dtype=perp.dtype, device=perp.device)
    block = max(1, _GRAM_BLOCK_ELEMS // max(t * d, 1))
    for r0 in range(0, rows, block):
        xb = perp[:, r0:r0 + block]                                  # [T, B, d]
        x64 = xb.transpose(0, 1).to(torch.float64)                  # [B, T, d]
        gram = x64 @ x64.transpose(1, 2)
        lam, u = torch.linalg.eigh(gram)                            # ascending
        a = coordinate_coefficients(gram, u.flip(-1), lam.flip(-1), weights, energy_threshold)
        out[r0:r0 + block] = torch.einsum("bt,tbd->bd", a.to(perp.dtype), xb)
    return out


def neuron_parts(x: torch.Tensor, w: torch.Tensor, weights: torch.Tensor, energy_threshold: float,
                 elect: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(merged parallel, merged orthogonal) of rows: x [T, rows, d] trimmed weighted τ, w [rows, d].

    `elect(s)` merges the parallel scalars s [T, rows] (default: elect-and-disjoint-mean with
    the tie sign of their total here); it may use s as scratch space.
    """
    s = parallel_scalars(x, w)
    sbar = elect(s.clone()) if elect is not None else ops.elect_and_merge(s, "mean", None, weights)
    perp = x.addcmul_(s.unsqueeze(-1), w.unsqueeze(0), value=-1.0)   # in place: x is ours
    return sbar.unsqueeze(-1) * w, orthogonal_merge(perp, weights, energy_threshold)


def neuromerging_vector(group: TensorGroup, p: NeuroMergingParams, stats: Stats) -> torch.Tensor:
    """τ̄ = λ1·parallel + λ2·orthogonal (point parameters: λ2·TIES), the chunk's shape."""
    x = trimmed_weighted_deltas(group, p, stats)
    lam2 = orthogonal_scale(group, p, stats)
    if not _has_neurons(group.info, group.base.dim()):
        return lam2 * elect_merge(group, x, "mean")
    dim = group.info.neuron_dim
    shape = tuple(group.base.shape)
    w = _rows(group.base, dim)
    xr = x.movedim(dim + 1, 1).reshape(x.shape[0], shape[dim], -1)   # [T, neurons, d]
    par, orth = neuron_parts(xr, w, group.weights, p.energy_threshold,
                             lambda s: elect_merge(group, s, "mean", key="parallel"))
    out = orth.mul_(lam2)
    if p.lambda1 != 0.0:
        out.add_(par, alpha=p.lambda1)
    return _unrows(out, shape, dim)
