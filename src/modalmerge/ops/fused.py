"""Fused CPU kernels for the apply pass's hot paths: C (kernels.c), in the extension module
modalmerge.ops.ckernels.

In eager torch, TIES over a block of T models is about nine passes over a [T, block] float32
stack (convert, subtract, trim, sum, align, clamp, sum, sign, sum), each reading and writing
memory. The C kernels read every model's raw (bfloat16, float16 or float32) values once per
pass, up to 8 models per loop with an element's accumulators in registers; TIES's exact
per-tensor selection finds its k-th value by counting compact 16-bit keys at or above a few
cuts at a time. Per element the operations and their order are torch's (kernels.c is built
without fused multiply-adds), so a kernel gives the bits of the same operations written in
torch, and agrees with the eager kernels (torch's reductions over the stack) to float rounding;
every kernel is element-wise or an integer count, so results do not depend on the thread count
or on the block boundaries. Within `threads_in_use(pool)`, a call on a large block is split
into pieces that the pool's threads take as each gets free (the module releases the GIL).

The module is built when the package is built or installed (setup.py); nothing is compiled or
cached at run time. Where it was not built (no C compiler at install time), or with
MODALMERGE_FUSED=0, the kernels raise FusedUnavailable and the eager kernels run; note() says
which in one line.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from .threads import in_use

try:
    from . import ckernels
    _NOT_LOADED = ""
except ModuleNotFoundError:  # installed without a C compiler
    ckernels = None
    _NOT_LOADED = "was not built: reinstall with a C compiler"
except ImportError as e:  # built, but it does not load here (another Python, a missing symbol)
    ckernels = None
    _NOT_LOADED = f"could not be loaded ({(str(e).splitlines() or [type(e).__name__])[0]}): reinstall modalmerge"

_DTYPES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}  # kernels.h's codes
_AGGREGATES = {"mean": 0, "sum": 1, "max": 2}
_GROUP = 8  # kernels.h's MM_GROUP: models folded per pass
PARALLEL_MIN = 1 << 16  # elements per thread from which a call is split over threads
PIECE = 1 << 18  # elements per piece of a split call (whole tiles of kernels.c's counts)
COUNT_BINS = 1 << 16  # boundary_low_counts' bins (the low 16 bits)
SWITCH = "MODALMERGE_FUSED"  # =0 turns the kernels off


class FusedUnavailable(RuntimeError):
    """The kernels cannot run here (or not on these inputs); the caller falls back to its eager kernel."""


def usable() -> bool:
    """The extension is built and loaded, and not switched off (MODALMERGE_FUSED=0)."""
    return ckernels is not None and os.environ.get(SWITCH, "").strip() != "0"


def note() -> str:
    """One line for --dry-run: which kernels a CPU merge runs, and if eager, why."""
    if ckernels is None:
        return f"eager torch (the C extension modalmerge.ops.ckernels {_NOT_LOADED or 'is not installed'})"
    if not usable():
        return f"eager torch (the fused kernels are off: {SWITCH}=0)"
    return f"fused C kernels (modalmerge.ops.ckernels, {ckernels.instruction_set()} code)"


def _kernels():
    if not usable():
        raise FusedUnavailable(note())
    return ckernels


# -- threads -------------------------------------------------------------------------------------



# -- calling -------------------------------------------------------------------------------------

def _inputs(base: torch.Tensor, models: list[torch.Tensor]) -> tuple[int, torch.Tensor, list[torch.Tensor]]:
    """(dtype code, flat contiguous base, models): one storage dtype the kernels know, on the CPU."""
    dtype = base.dtype
    if dtype not in _DTYPES or any(m.dtype != dtype for m in models) or base.device.type != "cpu":
        raise FusedUnavailable("the kernels take CPU inputs of one dtype (bfloat16, float16 or float32)")
    base = base.reshape(-1).contiguous()
    models = [m.reshape(-1).contiguous() for m in models]
    if any(m.numel() != base.numel() or m.device.type != "cpu" for m in models):
        raise ValueError("the models and the base differ in size or device")
    return _DTYPES[dtype], base, models


def _floats(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float32).reshape(-1).contiguous()


def _workers(n: int) -> int:
    """Threads for a call on n elements: the pool in use, one per PARALLEL_MIN elements."""
    pool = in_use()
    return 1 if pool is None else max(1, min(pool.threads, n // PARALLEL_MIN))


def _each_piece(n: int, workers: int, call) -> None:
    """call(worker, start, stop) over [0, n) in pieces of PIECE elements, which `workers` threads
    of the pool in use (the calling one among them) take as each gets free: a thread slowed by
    the reading and writing threads takes fewer pieces instead of holding up the others at the end."""
    if workers == 1:
        call(0, 0, n)
        return
    pieces = iter(range(0, n, PIECE))  # next() on it holds the GIL: each piece is taken once

    def work(worker: int) -> None:
        for start in pieces:
            call(worker, start, min(start + PIECE, n))

    in_use().run(workers, work)


# -- what the methods call -------------------------------------------------------------------

def trimmed_total(base: torch.Tensor, models: list[torch.Tensor], thresholds, weights) -> torch.Tensor:
    """Σ_t w_t · trim(θ_t − θ_0), trim keeping |·| ≥ thresholds[t]: TIES's election sums, float32."""
    kernels = _kernels()
    dtype, base, models = _inputs(base, models)
    thr, w = _floats(thresholds), _floats(weights)
    out = torch.empty(base.numel(), dtype=torch.float32)
    addresses = [m.data_ptr() for m in models]
    _each_piece(base.numel(), _workers(base.numel()), lambda i, a, b: kernels.trimmed_total(
        dtype, base.data_ptr(), addresses, thr.data_ptr(), w.data_ptr(), out.data_ptr(), a, b - a))
    return out


def disjoint_merge(base: torch.Tensor, models: list[torch.Tensor], thresholds, weights,
                   total: torch.Tensor, tie_sign: float, aggregate: str) -> torch.Tensor:
    """TIES's merged task vector from the raw inputs: γ = sign(total) (exact zeros → tie_sign),
    then the disjoint mean (weighted), sum or max of the trimmed, weighted task vectors agreeing
    with γ; as ops.elect_sign + ops.disjoint_merge on the stack."""
    kernels = _kernels()
    dtype, base, models = _inputs(base, models)
    thr, w = _floats(thresholds), _floats(weights)
    total = total.reshape(-1).to(torch.float32).contiguous()
    if total.numel() != base.numel():
        raise ValueError("the total and the base differ in size")
    out = torch.empty(base.numel(), dtype=torch.float32)
    # the weights counted so far, carried between groups of models (kernels.h's MM_GROUP)
    count = torch.empty(base.numel() if len(models) > _GROUP else 0, dtype=torch.float32)
    addresses = [m.data_ptr() for m in models]
    _each_piece(base.numel(), _workers(base.numel()), lambda i, a, b: kernels.disjoint(
        dtype, _AGGREGATES[aggregate], base.data_ptr(), addresses, thr.data_ptr(), w.data_ptr(), total.data_ptr(),
        float(tie_sign), count.data_ptr(), out.data_ptr(), a, b - a))
    return out


def weighted_delta_sum(base: torch.Tensor, models: list[torch.Tensor], weights) -> torch.Tensor:
    """Σ_t w_t (θ_t − θ_0) in model order, float32, from the raw inputs."""
    kernels = _kernels()
    dtype, base, models = _inputs(base, models)
    w = _floats(weights)
    out = torch.empty(base.numel(), dtype=torch.float32)
    addresses = [m.data_ptr() for m in models]
    _each_piece(base.numel(), _workers(base.numel()), lambda i, a, b: kernels.weighted_delta_sum(
        dtype, base.data_ptr(), addresses, w.data_ptr(), out.data_ptr(), a, b - a))
    return out


def magnitude_keys(base: torch.Tensor, model: torch.Tensor, cuts: Sequence[int] = ()) -> tuple[torch.Tensor, list[int]]:
    """τ = θ − θ_0's flagged keys (ops.sparsify.kth_by_counting), which sort as |τ| does: the top
    15 bits of |τ|'s float32 pattern, shifted left, and 1 where its low 16 bits are not all zero;
    unsigned 16-bit values in an int16 tensor. And, counted in the same pass, how many keys are at
    or above each cut (as count_at_least)."""
    kernels = _kernels()
    dtype, base, (model,) = _inputs(base, [model])
    n = base.numel()
    keys = torch.empty(n, dtype=torch.int16)
    return keys, _counted(n, cuts, lambda a, b, cut_array, m, row: kernels.magnitude_keys(
        dtype, base.data_ptr(), model.data_ptr(), keys.data_ptr(), cut_array, m, row, a, b - a))


def count_at_least(keys: torch.Tensor, cuts: list[int]) -> list[int]:
    """For each cut (0 ≤ cut ≤ 2^16), how many of magnitude_keys' keys are at or above it."""
    kernels = _kernels()
    if keys.dtype != torch.int16 or keys.device.type != "cpu" or not keys.is_contiguous():
        raise ValueError("count_at_least takes magnitude_keys' keys (a contiguous int16 CPU tensor)")
    return _counted(keys.numel(), cuts, lambda a, b, cut_array, m, row: kernels.count_at_least(
        keys.data_ptr(), cut_array, m, row, a, b - a))


def _counted(n: int, cuts, call) -> list[int]:
    """call(start, stop, cuts' address, number of cuts, counts row's address) over the pieces of n
    elements, one row of counts per thread; the rows' sums."""
    workers = _workers(n)
    cut_array = torch.tensor(list(cuts) or [0], dtype=torch.int32)  # read as uint32
    counts = torch.zeros((workers, cut_array.numel()), dtype=torch.int64)
    _each_piece(n, workers, lambda i, a, b: call(a, b, cut_array.data_ptr(), len(cuts), counts[i].data_ptr()))
    return counts.sum(0).tolist()[:len(cuts)]


def boundary_low_counts(base: torch.Tensor, model: torch.Tensor, high: int) -> torch.Tensor:
    """int64 counts of the low 16 bits of |τ|'s float32 pattern over the elements whose top 15
    bits are `high`: what ops.sparsify.kth_by_counting needs where the k-th key has low bits."""
    kernels = _kernels()
    dtype, base, (model,) = _inputs(base, [model])
    workers = _workers(base.numel())
    counts = torch.zeros((workers, COUNT_BINS), dtype=torch.int64)
    _each_piece(base.numel(), workers, lambda i, a, b: kernels.boundary_low_counts(
        dtype, base.data_ptr(), model.data_ptr(), high, counts[i].data_ptr(), a, b - a))
    return counts.sum(0)
