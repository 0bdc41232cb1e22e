"""Whole-model statistics shared by several methods, gathered in a statistics pass."""

from __future__ import annotations

from typing import Any

import torch

from .. import ops
from .base import Params, Statistic, Stats, TensorGroup


class TaskMagnitudes(Statistic["MagnitudeResult"]):
    """Per task, histograms of |τ_t| (count and L1 mass) over every merged tensor.

    Gives each task's global trim threshold for its density (spec 2: TIES's whole-model top-k)
    and the L1 fraction that trimming removes (spec 8: NeuroMerging's σ). A seeded sample of
    each large tensor gives the kept fraction to a sampling error well under 1e-3 (bfloat16
    task vectors, whose values tie in large groups, land within ~0.005); `--exact-stats`
    makes the engine show it every element instead.
    """

    name = "magnitudes"
    sampled = True

    # small tensors (norms, biases) are pooled and histogrammed together: one 2^19-bin
    # bincount per small tensor would cost more than the tensor
    _POOL_ELEMS = 1 << 20

    def __init__(self, density_key: str = "density"):
        self.density_key = density_key
        self.counts: list[torch.Tensor] | None = None
        self.mass: list[torch.Tensor] | None = None
        self.model_params: list[dict[str, Any]] = []
        self._pool: list[tuple[torch.Tensor, float]] = []  # ([T, n] task vectors, sample weight)
        self._pooled = 0

    def observe(self, group: TensorGroup, params: Params, prior: Stats) -> None:
        deltas = group.task_vectors().reshape(group.num_models, -1)
        if self.counts is None:
            self.counts = [torch.zeros(ops.sparsify.HIST_BINS, dtype=torch.float64) for _ in range(len(deltas))]
            self.mass = [torch.zeros(ops.sparsify.HIST_BINS, dtype=torch.float64) for _ in range(len(deltas))]
            self.model_params = group.model_params
        if deltas.shape[1] < self._POOL_ELEMS // 16:
            self._pool.append((deltas.cpu(), group.sample_weight))
            self._pooled += deltas.shape[1]
            if self._pooled >= self._POOL_ELEMS:
                self._flush()
            return
        self._add(deltas, group.sample_weight)

    def _add(self, deltas: torch.Tensor, weight: float | torch.Tensor) -> None:
        for t, delta in enumerate(deltas):
            c, m = ops.magnitude_histogram(delta, weight)
            self.counts[t] += c.cpu()
            self.mass[t] += m.cpu()

    def _flush(self) -> None:
        if not self._pool:
            return
        weights = torch.cat([torch.full((d.shape[1],), w, dtype=torch.float64) for d, w in self._pool])
        self._add(torch.cat([d for d, _ in self._pool], dim=1), weights)
        self._pool, self._pooled = [], 0

    def result(self, params: Params, prior: Stats) -> "MagnitudeResult":
        self._flush()
        return MagnitudeResult(self.counts or [], self.mass or [], params, self.density_key, self.model_params)

    def refinement(self, result: "MagnitudeResult") -> Statistic:
        return ExactThresholds(self.name, result)


class ExactThresholds(Statistic["MagnitudeResult"]):
    """Second pass: collect the values inside each task's boundary histogram bin and select
    the exact k-th largest |τ_t| among them."""

    sampled = False
    provides = TaskMagnitudes

    def __init__(self, name: str, approx: "MagnitudeResult"):
        self.name = name
        self.approx = approx
        self.bounds = [ops.sparsify.boundary_bin(c, d) for c, d in zip(approx.counts, approx.densities)]
        self.values: list[list[torch.Tensor]] = [[] for _ in self.bounds]
        self.l1_total = [0.0 for _ in self.bounds]

    def observe(self, group: TensorGroup, params: Params, prior: Stats) -> None:
        deltas = group.task_vectors()
        for t, bound in enumerate(self.bounds):
            if bound is None:
                continue
            lo, hi, _ = bound
            mag = deltas[t].abs().reshape(-1)
            self.values[t].append(mag[(mag >= lo) & (mag < hi)].cpu())

    def result(self, params: Params, prior: Stats) -> "MagnitudeResult":
        thresholds = []
        for t, bound in enumerate(self.bounds):
            if bound is None:
                thresholds.append(self.approx.thresholds[t])
                continue
            lo, _, need = bound
            inside = torch.cat(self.values[t]) if self.values[t] else torch.zeros(0)
            k = min(max(int(need), 1), inside.numel())
            thr = ops.kth_largest_magnitude(inside, k) if k > 0 else self.approx.thresholds[t]
            thresholds.append(thr)
            # exact L1 mass below the threshold: whole bins below the boundary bin, plus the
            # boundary bin's values under it
            below = ops.mass_below(self.approx.mass[t], lo) + float(inside[inside < thr].double().sum())
            self.approx.exact_removed[t] = below
        self.approx.thresholds = thresholds
        self.approx.removed = None  # computed again from the exact thresholds
        return self.approx


class MagnitudeResult:
    def __init__(self, counts, mass, params, density_key, model_params):
        self.counts, self.mass = counts, mass
        default = getattr(params, density_key)
        self.densities = [mp.get(density_key, default) for mp in model_params] or []
        self.thresholds = [ops.threshold_from_histogram(c, d) for c, d in zip(counts, self.densities)]
        self.exact_removed: list[float | None] = [None] * len(counts)
        self.removed: list[float] | None = None  # removed_l1_fraction(), once asked for

    def removed_l1_fraction(self) -> list[float]:
        """Per task: ‖τ − trim(τ)‖₁ / ‖τ‖₁ (exact after an exact-statistics refinement)."""
        if self.removed is None:
            self.removed = self._removed_l1_fraction()
        return self.removed

    def _removed_l1_fraction(self) -> list[float]:
        out = []
        for t, (m, thr) in enumerate(zip(self.mass, self.thresholds)):
            total = float(m.sum())
            below = self.exact_removed[t] if self.exact_removed[t] is not None else ops.mass_below(m, thr)
            out.append(below / total if total > 0 else 0.0)
        return out
