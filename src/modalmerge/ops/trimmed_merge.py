"""TIES's trimmed merge and the weighted sum of task vectors from one block's inputs: the C kernels
(ops.fused) where they can run, else torch on a float32 stack. The caller never sees which ran;
both give the same tensors (the C kernels do torch's operations per element, so they agree with
torch's reductions over the stack to float rounding).

Also the magnitude thresholds of a trim (global, or each model's own top-k in a tensor) and the
trim itself, shared by every method that trims task vectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch

from . import fused, sparsify
from .election import disjoint_merge, elect_sign
from .reduce import weighted_sum

# the dtypes the C kernels read (ops/fused.py)
_C_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# the search for a tensor's k-th key starts from a sample of about this many values
GUESS_SAMPLE = 1 << 13


class Inputs(NamedTuple):
    """One block's inputs, read-only: the base and each model as stored (e.g. bfloat16), or as
    the engine's float32 stack [T, ...] when it built one."""

    base: torch.Tensor | None
    models: Sequence[torch.Tensor]      # a list of per-model tensors, or a [T, ...] stack
    shape: tuple[int, ...]              # the block's shape
    c_kernels: bool = False             # the engine lets the C kernels read them (CPU, block large enough)

    def float_base(self) -> torch.Tensor:
        """θ_0 as float32 (the stored tensor itself when it is float32: read it, never write it)."""
        return self.base.reshape(self.shape).to(torch.float32)

    def task_vectors(self) -> torch.Tensor:
        """τ_t = θ_t − θ_0 stacked [T, *shape] float32: a new tensor the caller owns."""
        base = self.float_base().unsqueeze(0)
        if isinstance(self.models, torch.Tensor) and self.models.dtype == torch.float32:
            return self.models - base
        stack = torch.empty((len(self.models),) + tuple(self.shape), dtype=torch.float32, device=base.device)
        for row, m in zip(stack, self.models):  # one float32 stack, no per-model temporaries
            row.copy_(m.reshape(self.shape))
        return stack.sub_(base)


@dataclass(frozen=True)
class OwnTopK:
    """Trim thresholds chosen inside the block: each model keeps its top int(density · numel)
    magnitudes there (at least `keep_min`), ties at the edge kept."""

    densities: list[float]
    keep_min: int = 0


Thresholds = Sequence[float] | OwnTopK | None  # None: keep everything
TieSign = float | Callable[[torch.Tensor], float]  # a sign, or the rule that gives it from the block's Σ_t


def _c_can_read(inputs: Inputs) -> bool:
    """The engine allows it, and the inputs are CPU tensors of one dtype the kernels read."""
    if not inputs.c_kernels or inputs.base is None or not fused.usable():
        return False
    dtype = inputs.base.dtype
    return dtype in _C_DTYPES and inputs.base.device.type == "cpu" and all(
        m.dtype == dtype and m.device.type == "cpu" for m in inputs.models)


def _flat(inputs: Inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return inputs.base.reshape(-1), [m.reshape(-1) for m in inputs.models]


def trimmed_merge(inputs: Inputs, thresholds: Thresholds, weights: torch.Tensor, aggregate: str,
                  tie_sign: TieSign) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES's merged task vector: trim each τ_t (keep |τ_t| ≥ its threshold), weight it (w_t),
    elect γ = sign(Σ_t) with exact zeros → the tie sign, then the disjoint mean (weighted), sum
    or max of the entries agreeing with γ. Returns (Σ_t w_t·trim(τ_t), merged), both float32 in
    the block's shape. A tie rule is asked once, with the block's Σ_t."""
    decided: list[float] = []

    def sign(total: torch.Tensor) -> float:
        if not decided:
            decided.append(tie_sign(total) if callable(tie_sign) else float(tie_sign))
        return decided[0]

    if _c_can_read(inputs):
        try:
            base, models = _flat(inputs)
            if isinstance(thresholds, OwnTopK):
                thresholds = fused_tensor_thresholds(base, models, thresholds.densities, thresholds.keep_min)
            thr = torch.tensor([0.0] * len(models) if thresholds is None else list(thresholds), dtype=torch.float32)
            total = fused.trimmed_total(base, models, thr, weights)
            merged = fused.disjoint_merge(base, models, thr, weights, total, sign(total), aggregate)
            return total.reshape(inputs.shape), merged.reshape(inputs.shape)
        except fused.FusedUnavailable:
            pass  # torch below
    deltas = inputs.task_vectors()
    if isinstance(thresholds, OwnTopK):
        trim_(deltas, top_k_thresholds(deltas, thresholds.densities, thresholds.keep_min))
    elif thresholds is not None:
        trim_(deltas, thresholds)
    return elect_merge_(weight_(deltas, weights), aggregate, sign, weights)


def weight_(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """w_t · x_t in place (nothing to do for weights that are all 1)."""
    if not bool((weights == 1).all()):
        deltas.mul_(weights.reshape((-1,) + (1,) * (deltas.dim() - 1)))
    return deltas


def elect_merge_(weighted: torch.Tensor, aggregate: str, tie_sign: TieSign,
                 weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sign election and disjoint aggregate (torch) of a stack [T, ...] already multiplied by
    `weights` (which divide the mean), used as scratch space; (Σ_t, merged)."""
    total = weighted.sum(dim=0)
    sign = tie_sign(total) if callable(tie_sign) else float(tie_sign)
    gamma = elect_sign(weighted, sign, total)
    return total, disjoint_merge(weighted, gamma, aggregate, weights, inplace=True)


def weighted_delta_sum(inputs: Inputs, weights: torch.Tensor) -> torch.Tensor:
    """Σ_t w_t (θ_t − θ_0) in model order, float32 in the block's shape (a new tensor)."""
    if _c_can_read(inputs):
        try:
            base, models = _flat(inputs)
            return fused.weighted_delta_sum(base, models, weights).reshape(inputs.shape)
        except fused.FusedUnavailable:
            pass  # torch below
    return weighted_sum(inputs.task_vectors(), weights)


def tensor_thresholds(inputs: Inputs, densities: list[float], keep_min: int) -> list[float]:
    """Each model's own top-k threshold in this (whole) tensor: OwnTopK's thresholds."""
    if _c_can_read(inputs):
        try:
            base, models = _flat(inputs)
            return fused_tensor_thresholds(base, models, densities, keep_min)
        except fused.FusedUnavailable:
            pass  # torch below
    return top_k_thresholds(inputs.task_vectors(), densities, keep_min)


# -- thresholds and trims ----------------------------------------------------------------------

def trim_(deltas: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """Zero each task vector's entries below its threshold (in place)."""
    for t, thr in enumerate(thresholds):
        sparsify.trim_magnitude_(deltas[t], thr)
    return deltas


def per_tensor_thresholds(numel: int, densities: list[float], min_keep: int, select) -> list[float]:
    """Each task vector's k-th largest magnitude in a tensor of `numel` elements, k =
    int(density · numel) but at least `min_keep`: 0.0 where everything is kept, +inf where
    nothing is. `select(tasks, ks)` returns the k-th largest |τ_t| of each task asked for."""
    ks = [min(max(int(d * numel), min_keep), numel) for d in densities]
    selected = [t for t, k in enumerate(ks) if 0 < k < numel]
    thresholds = [0.0 if k >= numel else float("inf") for k in ks]
    if selected:
        for t, v in zip(selected, select(selected, [ks[t] for t in selected])):
            thresholds[t] = v
    return thresholds


def top_k_thresholds(deltas: torch.Tensor, densities: list[float], min_keep: int = 0) -> list[float]:
    """per_tensor_thresholds of the stacked task vectors `deltas` [T, ...] (torch)."""
    def select(tasks: list[int], ks: list[int]) -> list[float]:
        rows = deltas if len(tasks) == len(deltas) else deltas[tasks]  # no copy when all are selected
        return sparsify.kth_largest_magnitudes(rows, ks)

    return per_tensor_thresholds(deltas[0].numel(), densities, min_keep, select)


def trim_per_tensor_(deltas: torch.Tensor, densities: list[float], min_keep: int = 0) -> torch.Tensor:
    """Keep each task vector's top int(density · numel) magnitudes (at least `min_keep`) within
    this tensor, ties at the edge kept (in place)."""
    return trim_(deltas, top_k_thresholds(deltas, densities, min_keep))


def fused_tensor_thresholds(base: torch.Tensor, models: list[torch.Tensor], densities: list[float],
                            keep_min: int) -> list[float]:
    """top_k_thresholds with the C kernels, from a whole tensor's flat stored inputs: each model's
    k-th largest |τ| found by counting its flagged keys (sparsify.kth_by_counting). The pass that
    computes the keys also counts them at a few keys that a sample puts around the k-th one
    (sparsify.sample_cuts), which often settles it. Raises fused.FusedUnavailable where the
    kernels cannot run."""
    n = base.numel()
    stride = max(1, n // GUESS_SAMPLE)

    def one(model: torch.Tensor, k: int) -> float:
        sample = sparsify.flagged_keys(model[::stride].float() - base[::stride].float())
        cuts = sparsify.sample_cuts(sample, k, n)
        keys, counts = fused.magnitude_keys(base, model, cuts)
        return sparsify.kth_by_counting(lambda c: fused.count_at_least(keys, c), k,
                                        lambda b: fused.boundary_low_counts(base, model, b),
                                        dict(zip(cuts, counts)))

    def select(tasks: list[int], ks: list[int]) -> list[float]:
        return [one(models[t], k) for t, k in zip(tasks, ks)]

    return per_tensor_thresholds(n, densities, keep_min, select)
