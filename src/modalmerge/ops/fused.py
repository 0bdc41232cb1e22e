"""Fused kernels for the apply pass's hot paths, compiled by torch.compile (inductor).

In eager torch, TIES over a block of T models is about nine passes over a [T, block] float32
stack (convert, subtract, trim, sum, align, clamp, sum, sign, sum), each reading and writing
memory. Written below as plain per-element loops over the models, inductor turns each function
into one C++ loop over the block that reads every model's raw (e.g. bfloat16) values once and
keeps an element's T values in registers. Per element the arithmetic and its order are the
eager kernels' (a sum over the models in model order), so results agree with them to float
rounding and do not depend on the thread count or on the block boundaries.

Compiling takes tens of seconds once per process (inductor keeps the compiled code in its
on-disk cache, so later processes load it in seconds): the engine uses these kernels only on
large merges, or when MODALMERGE_COMPILE=1. MODALMERGE_COMPILE=0 turns them off. Where
compiling fails (no C++ compiler), the first call warns once and the eager kernels run.
"""

from __future__ import annotations

import os
import warnings

import torch

_compiled: dict = {}
_broken = False


class FusedUnavailable(RuntimeError):
    """Compiled kernels cannot run here; the caller falls back to its eager kernel."""


def mode() -> str:
    """'auto' (default: large merges on the CPU), '1' (always) or '0' (never)."""
    value = os.environ.get("MODALMERGE_COMPILE", "auto").strip().lower()
    return value if value in ("0", "1") else "auto"


def usable() -> bool:
    return not _broken and mode() != "0"


def _run(fn, *args) -> torch.Tensor:
    global _broken
    if not usable():
        raise FusedUnavailable("compiled kernels are off")
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True)
    try:
        with _inductor_settings():
            return _compiled[fn](*args)
    except Exception as e:  # noqa: BLE001 - any compiler failure means: use the eager kernel
        _broken = True
        warnings.warn(f"modalmerge: compiled kernels unavailable ({type(e).__name__}: {str(e)[:200]}); "
                      "using eager torch (set MODALMERGE_COMPILE=0 to skip the attempt)", RuntimeWarning)
        raise FusedUnavailable(str(e)) from e


def _inductor_settings():
    """Inductor settings for our kernels only (a patch, not the process-wide config): trust the
    CPU's own flags for the vector ISA instead of building and loading a probe library per ISA
    in child processes, and skip precompiling headers. Measured (median of 3 processes): the
    first kernel of a process takes 3.5 s instead of 4.6 s. Should the compiler still reject
    the ISA, that is a compile error, handled as any other (eager fallback)."""
    from torch._inductor import config

    return config.patch({"cpp.vec_isa_ok": True, "cpp_cache_precompile_headers": False})


# -- the kernels, written per element; T (the number of models) is unrolled when traced ------

def _trimmed(m, b, threshold, weight):
    d = m.float() - b
    return torch.where(d.abs() >= threshold, d, 0.0) * weight


def _trimmed_total(base, thresholds, weights, *models):
    b = base.float()
    total = _trimmed(models[0], b, thresholds[0], weights[0])
    for t in range(1, len(models)):
        total = total + _trimmed(models[t], b, thresholds[t], weights[t])
    return total


def _elected(total, tie):
    gamma = torch.sign(total)
    return torch.where(gamma == 0, tie, gamma)


def _disjoint_mean(base, thresholds, weights, total, tie, *models):
    b = base.float()
    gamma = _elected(total, tie)
    kept = torch.zeros_like(b)
    count = torch.zeros_like(b)
    for t in range(len(models)):
        aligned = torch.clamp_min(_trimmed(models[t], b, thresholds[t], weights[t]) * gamma, 0.0)
        kept = kept + aligned
        count = count + torch.where(aligned > 0, weights[t], 0.0)
    return gamma * kept / torch.where(count == 0, 1.0, count)


def _disjoint_sum(base, thresholds, weights, total, tie, *models):
    b = base.float()
    gamma = _elected(total, tie)
    kept = torch.zeros_like(b)
    for t in range(len(models)):
        kept = kept + torch.clamp_min(_trimmed(models[t], b, thresholds[t], weights[t]) * gamma, 0.0)
    return gamma * kept


def _disjoint_max(base, thresholds, weights, total, tie, *models):
    b = base.float()
    gamma = _elected(total, tie)
    best = torch.zeros_like(b)
    for t in range(len(models)):
        best = torch.maximum(best, torch.clamp_min(_trimmed(models[t], b, thresholds[t], weights[t]) * gamma, 0.0))
    return gamma * best


def _weighted_delta_sum(base, weights, *models):
    b = base.float()
    out = (models[0].float() - b) * weights[0]
    for t in range(1, len(models)):
        out = out + (models[t].float() - b) * weights[t]
    return out


def _magnitude_keys(base, *models):
    b = base.float()
    keys = []
    for m in models:
        bits = (m.float() - b).abs().view(torch.int32)
        keys.append(((bits >> 16) << 1) | ((bits & 0xFFFF) != 0).to(torch.int32))
    return tuple(keys)


_DISJOINT = {"mean": _disjoint_mean, "sum": _disjoint_sum, "max": _disjoint_max}


# -- what the methods call -------------------------------------------------------------------

def trimmed_total(base: torch.Tensor, models: list[torch.Tensor], thresholds: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
    """Σ_t w_t · trim(θ_t − θ_0), trim keeping |·| ≥ thresholds[t]: TIES's election sums, float32."""
    return _run(_trimmed_total, base, thresholds, weights, *models)


def disjoint_merge(base: torch.Tensor, models: list[torch.Tensor], thresholds: torch.Tensor,
                   weights: torch.Tensor, total: torch.Tensor, tie_sign: float, aggregate: str) -> torch.Tensor:
    """TIES's merged task vector from the raw inputs: γ = sign(total) (exact zeros → tie_sign),
    then the disjoint mean (weighted), sum or max of the trimmed, weighted task vectors agreeing
    with γ; as ops.elect_sign + ops.disjoint_merge on the stack."""
    tie = torch.tensor(tie_sign, dtype=torch.float32, device=total.device)
    return _run(_DISJOINT[aggregate], base, thresholds, weights, total, tie, *models)


def magnitude_keys(base: torch.Tensor, models: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Per model, the flagged first-level keys of ops.sparsify.radix_select (int32: the top 15
    bits of |θ_t − θ_0|'s float32 pattern, shifted left, and 1 where its low 16 bits are not
    all zero), from the raw inputs in one pass."""
    return _run(_magnitude_keys, base, *models)


def weighted_delta_sum(base: torch.Tensor, models: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Σ_t w_t (θ_t − θ_0) in model order, float32, from the raw inputs."""
    return _run(_weighted_delta_sum, base, weights, *models)
