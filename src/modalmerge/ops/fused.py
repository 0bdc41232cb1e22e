"""Fused CPU kernels for the apply pass's hot paths: C (kernels.c), called through ctypes.

In eager torch, TIES over a block of T models is about nine passes over a [T, block] float32
stack (convert, subtract, trim, sum, align, clamp, sum, sign, sum), each reading and writing
memory. The C kernels read every model's raw (bfloat16, float16 or float32) values once per
pass, up to 8 models per loop with an element's accumulators in registers; TIES's exact
per-tensor selection finds its k-th value by counting compact 16-bit keys at or above a few
cuts at a time. Per element the operations and their order are torch's (kernels.c is built
without fused multiply-adds), so a kernel gives the bits of the same operations written in
torch, and agrees with the eager kernels (torch's reductions over the stack) to float rounding;
every kernel is element-wise or an integer count, so results do not depend on the thread count
or on the block boundaries. A call on a large block is split into pieces that the torch threads take as each
gets free (ctypes releases the GIL).

kernels.c is compiled once per machine by the system's C compiler ($CC, else cc, gcc or clang;
about 5 s) into $MODALMERGE_CACHE/kernels (default ~/.cache/modalmerge/kernels), keyed by the
source, compiler, flags and host; later processes load it in milliseconds. (The kernels were
first written for torch.compile, whose compiler stack costs a process ~3.5 s to load even with
its cache warm: more than the kernels saved on most merges.) MODALMERGE_COMPILE=0 turns them
off. Where they cannot be built (no compiler), the first call warns once and the eager kernels
run.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import torch

from ..paths import cache_dir

_SOURCE = Path(__file__).with_name("kernels.c")
# torch's IEEE semantics: no -ffast-math, and no fused multiply-adds (which round once where
# torch rounds twice, and only in the vectorised part of a loop)
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-std=gnu11", "-fPIC", "-shared"]
_DTYPES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}  # kernels.c's codes
_AGGREGATES = {"mean": 0, "sum": 1, "max": 2}
_GROUP = 8  # kernels.c's GROUP: models folded per pass
PARALLEL_MIN = 1 << 16  # elements per thread from which a call is split over threads
PIECE = 1 << 18  # elements per piece of a split call (whole tiles of kernels.c's counts)
COUNT_BINS = 1 << 16  # boundary_low_counts' bins (the low 16 bits)

_lib = None
_broken = ""  # why the build failed in this process, if it did
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


class FusedUnavailable(RuntimeError):
    """The kernels cannot run here (or not on these inputs); the caller falls back to its eager kernel."""


def usable() -> bool:
    """Not switched off (MODALMERGE_COMPILE=0) and not failed to build in this process."""
    return not _broken and os.environ.get("MODALMERGE_COMPILE", "").strip() != "0"


# -- building and loading ----------------------------------------------------------------------

def _library():
    global _lib, _broken
    if _broken:
        raise FusedUnavailable(f"the fused kernels failed to build: {_broken}")
    if not usable():
        raise FusedUnavailable("the fused kernels are off (MODALMERGE_COMPILE=0)")
    if _lib is None:
        with _lock:
            if _lib is None:
                try:
                    _lib = _declare(ctypes.CDLL(str(_build())))
                except (OSError, subprocess.SubprocessError, RuntimeError) as e:
                    _broken = str(e) or type(e).__name__
                    warnings.warn(f"modalmerge: fused kernels unavailable ({e}); using eager torch "
                                  "(set MODALMERGE_COMPILE=0 to skip the attempt)", RuntimeWarning)
                    raise FusedUnavailable(str(e)) from e
    return _lib


def _compiler() -> str:
    cc = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if cc is None:
        raise RuntimeError("no C compiler found: install gcc or clang, or set CC")
    return cc


def _build() -> Path:
    """The compiled kernels.c for this machine: from the cache, else built into it (atomically,
    so processes building at the same time do not see each other's half-written file)."""
    cc = _compiler()
    text = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join(s if isinstance(s, bytes) else s.encode() for s in
                                    (text, cc, " ".join(_FLAGS), platform.machine(), platform.node()))).hexdigest()[:16]
    folder = cache_dir("kernels")
    target = folder / f"kernels-{key}.so"
    if target.exists():
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: build for this process only
        folder = Path(tempfile.mkdtemp(prefix="modalmerge-kernels-"))
        target = folder / target.name
    partial = folder / f".{target.name}.{os.getpid()}"
    error = ""
    # a compiler without -march=native (some non-x86 ones) still builds the portable variant
    for flags in (_FLAGS, [f for f in _FLAGS if f != "-march=native"]):
        done = subprocess.run([cc, *flags, "-o", str(partial), str(_SOURCE)], capture_output=True, text=True)
        if done.returncode == 0:
            os.replace(partial, target)
            return target
        error = (done.stderr.strip().splitlines() or ["exit status %d" % done.returncode])[-1]
    raise RuntimeError(f"{cc} could not build {_SOURCE.name}: {error}")


def _declare(lib):
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    signatures = {
        "mm_trimmed_total": [i32, p, p, i32, p, p, p, i64],
        "mm_disjoint": [i32, i32, p, p, i32, p, p, p, ctypes.c_float, p, p, i64],
        "mm_weighted_delta_sum": [i32, p, p, i32, p, p, i64],
        "mm_magnitude_keys": [i32, p, p, i64, p, p, i32, p],
        "mm_count_at_least": [p, i64, p, i32, p],
        "mm_boundary_low_counts": [i32, p, p, i64, ctypes.c_uint32, p],
    }
    for name, args in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, None
    return lib


# -- calling -------------------------------------------------------------------------------------

def _inputs(base: torch.Tensor, models: list[torch.Tensor]) -> tuple[int, torch.Tensor, list[torch.Tensor]]:
    """(dtype code, flat contiguous base, models): one storage dtype the kernels know, on the CPU."""
    dtype = base.dtype
    if dtype not in _DTYPES or any(m.dtype != dtype for m in models) or base.device.type != "cpu":
        raise FusedUnavailable("the kernels take CPU inputs of one dtype (bfloat16, float16 or float32)")
    base = base.reshape(-1).contiguous()
    models = [m.reshape(-1).contiguous() for m in models]
    if any(m.numel() != base.numel() for m in models):
        raise ValueError("the models and the base differ in size")
    return _DTYPES[dtype], base, models


def _floats(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float32).reshape(-1).contiguous()


def _at(t: torch.Tensor, start: int) -> int:
    return t.data_ptr() + start * t.element_size()


def _array(tensors: list[torch.Tensor], start: int):
    return (ctypes.c_void_p * len(tensors))(*[_at(t, start) for t in tensors])


def _workers(n: int) -> int:
    return max(1, min(torch.get_num_threads(), n // PARALLEL_MIN))


def _each_piece(n: int, workers: int, call) -> None:
    """call(worker, start, stop) over [0, n) in pieces of PIECE elements, which `workers` threads
    (the calling one among them) take as each gets free: a thread slowed by the reading and
    writing threads takes fewer pieces instead of holding up the others at the end."""
    global _pool, _pool_size
    if workers == 1:
        call(0, 0, n)
        return
    pieces = iter(range(0, n, PIECE))  # next() on it holds the GIL: each piece is taken once

    def work(worker: int) -> None:
        for start in pieces:
            call(worker, start, min(start + PIECE, n))

    with _lock:
        if _pool_size < workers - 1:
            _pool = ThreadPoolExecutor(max_workers=workers - 1, thread_name_prefix="modalmerge-kernel")
            _pool_size = workers - 1
        pool = _pool
    helpers = [pool.submit(work, w) for w in range(1, workers)]
    work(0)
    for h in helpers:
        h.result()


# -- what the methods call -------------------------------------------------------------------

def trimmed_total(base: torch.Tensor, models: list[torch.Tensor], thresholds, weights) -> torch.Tensor:
    """Σ_t w_t · trim(θ_t − θ_0), trim keeping |·| ≥ thresholds[t]: TIES's election sums, float32."""
    lib = _library()
    dtype, base, models = _inputs(base, models)
    thr, w = _floats(thresholds), _floats(weights)
    out = torch.empty(base.numel(), dtype=torch.float32)
    _each_piece(base.numel(), _workers(base.numel()), lambda i, a, b: lib.mm_trimmed_total(
        dtype, _at(base, a), _array(models, a), len(models), thr.data_ptr(), w.data_ptr(), _at(out, a), b - a))
    return out


def disjoint_merge(base: torch.Tensor, models: list[torch.Tensor], thresholds, weights,
                   total: torch.Tensor, tie_sign: float, aggregate: str) -> torch.Tensor:
    """TIES's merged task vector from the raw inputs: γ = sign(total) (exact zeros → tie_sign),
    then the disjoint mean (weighted), sum or max of the trimmed, weighted task vectors agreeing
    with γ; as ops.elect_sign + ops.disjoint_merge on the stack."""
    lib = _library()
    dtype, base, models = _inputs(base, models)
    thr, w = _floats(thresholds), _floats(weights)
    total = total.reshape(-1).to(torch.float32).contiguous()
    out = torch.empty(base.numel(), dtype=torch.float32)
    # the weights counted so far, carried between groups of models (kernels.c's GROUP)
    count = torch.empty(base.numel() if len(models) > _GROUP else 0, dtype=torch.float32)
    _each_piece(base.numel(), _workers(base.numel()), lambda i, a, b: lib.mm_disjoint(
        dtype, _AGGREGATES[aggregate], _at(base, a), _array(models, a), len(models), thr.data_ptr(), w.data_ptr(),
        _at(total, a), float(tie_sign), _at(count, a), _at(out, a), b - a))
    return out


def weighted_delta_sum(base: torch.Tensor, models: list[torch.Tensor], weights) -> torch.Tensor:
    """Σ_t w_t (θ_t − θ_0) in model order, float32, from the raw inputs."""
    lib = _library()
    dtype, base, models = _inputs(base, models)
    w = _floats(weights)
    out = torch.empty(base.numel(), dtype=torch.float32)
    _each_piece(base.numel(), _workers(base.numel()), lambda i, a, b: lib.mm_weighted_delta_sum(
        dtype, _at(base, a), _array(models, a), len(models), w.data_ptr(), _at(out, a), b - a))
    return out


def magnitude_keys(base: torch.Tensor, model: torch.Tensor, cuts: Sequence[int] = ()) -> tuple[torch.Tensor, list[int]]:
    """τ = θ − θ_0's flagged keys (ops.sparsify.kth_by_counting), which sort as |τ| does: the top
    15 bits of |τ|'s float32 pattern, shifted left, and 1 where its low 16 bits are not all zero;
    unsigned 16-bit values in an int16 tensor. And, counted in the same pass, how many keys are at
    or above each cut (as count_at_least)."""
    lib = _library()
    dtype, base, (model,) = _inputs(base, [model])
    n = base.numel()
    keys = torch.empty(n, dtype=torch.int16)
    return keys, _counted(n, cuts, lambda a, b, cut_array, m, row: lib.mm_magnitude_keys(
        dtype, _at(base, a), _at(model, a), b - a, _at(keys, a), cut_array, m, row))


def count_at_least(keys: torch.Tensor, cuts: list[int]) -> list[int]:
    """For each cut (0 ≤ cut ≤ 2^16), how many of magnitude_keys' keys are at or above it."""
    lib = _library()
    return _counted(keys.numel(), cuts, lambda a, b, cut_array, m, row: lib.mm_count_at_least(
        _at(keys, a), b - a, cut_array, m, row))


def _counted(n: int, cuts, call) -> list[int]:
    """call(start, stop, cuts, number of cuts, counts row) over the pieces of n elements, one row
    of counts per thread; the rows' sums."""
    workers = _workers(n)
    cut_array = torch.tensor(list(cuts) or [0], dtype=torch.int32)  # read as uint32
    counts = torch.zeros((workers, cut_array.numel()), dtype=torch.int64)
    _each_piece(n, workers, lambda i, a, b: call(a, b, cut_array.data_ptr(), len(cuts), counts[i].data_ptr()))
    return counts.sum(0).tolist()[:len(cuts)]


def boundary_low_counts(base: torch.Tensor, model: torch.Tensor, high: int) -> torch.Tensor:
    """int64 counts of the low 16 bits of |τ|'s float32 pattern over the elements whose top 15
    bits are `high`: what ops.sparsify.kth_by_counting needs where the k-th key has low bits."""
    lib = _library()
    dtype, base, (model,) = _inputs(base, [model])
    workers = _workers(base.numel())
    counts = torch.zeros((workers, COUNT_BINS), dtype=torch.int64)
    _each_piece(base.numel(), workers, lambda i, a, b: lib.mm_boundary_low_counts(
        dtype, _at(base, a), _at(model, a), b - a, high, counts[i].data_ptr()))
    return counts.sum(0)
