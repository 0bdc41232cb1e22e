"""The streaming executor: statistics passes, then the apply pass, one tensor job at a time.

Only the inputs of the current job (and the prefetched next one) are in memory, so peak memory
is O(models × largest chunk), never O(model size). The device is a parameter here, not of
the methods.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterator

import torch
from tqdm import tqdm

from ..checkpoint.sources import TensorSource
from ..errors import MergeError
from ..methods.base import ElectionState, Statistic, Stats, TensorGroup
from ..ops import pack_bits
from ..ops.threads import KernelThreads, threads_in_use
from .plan import Plan, TensorPlan, who

# statistics passes over a sample look at about one element in k (k chosen so the whole sample
# keeps about SAMPLE_TARGET values per model) of tensors larger than SAMPLE_MIN elements, unless
# exact statistics are asked for. 4M values put the sampling error of a global threshold's kept
# fraction near 2e-4 (binomial standard error sqrt(p(1-p)/n)); on bfloat16 checkpoints a single
# magnitude value can hold ~1% of the entries, so the kept fraction lands on one side of such a
# value (measured: 0.195 for density 0.2, where the exact top-k keeps 0.205 with its ties).
SAMPLE_TARGET = 1 << 22
SAMPLE_MIN = 1 << 16
# a sample is read as contiguous segments of this many elements, evenly spread over each job,
# so a statistics pass reads about 1/stride of the inputs, not all of them
SAMPLE_SEGMENT = 1 << 10
# fused kernels (ops/fused.py), for methods that have them (Method.fused), on CPU blocks of at
# least this many elements (below it a call's overhead outweighs the passes it saves);
# MODALMERGE_FUSED=0 turns them off
FUSED_MIN_BLOCK = 1 << 12


@dataclass
class Job:
    tensor: TensorPlan
    rows: tuple[int, int]

    @property
    def start(self) -> int:
        return self.rows[0] * self.tensor.row_elems

    @property
    def stop(self) -> int:
        return min(self.rows[1] * self.tensor.row_elems, self.tensor.meta.numel)

    @property
    def shape(self) -> tuple[int, ...]:
        shape = self.tensor.meta.shape
        if not shape:
            return ()
        return (self.rows[1] - self.rows[0],) + tuple(shape[1:])

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == self.tensor.meta.numel


@dataclass
class Report:
    seconds: dict[str, float] = field(default_factory=dict)
    merged_tensors: int = 0
    copied_tensors: int = 0
    merged_parameters: int = 0
    statistics: dict[str, Any] = field(default_factory=dict)
    procedure: str = "streaming"  # Method.runs of the merge (procedures/run.py)

    @classmethod
    def of(cls, plan: Plan, stats: Stats, seconds: dict[str, float]) -> Report:
        """The report of a streaming merge of `plan`: its tensor counts and statistics' summaries."""
        merged = len(plan.merged)
        return cls(seconds=seconds, merged_tensors=merged, copied_tensors=len(plan.tensors) - merged,
                   merged_parameters=sum(t.meta.numel for t in plan.merged), statistics=stats.summaries())


class Executor:
    def __init__(self, plan: Plan, device: str = "cpu", exact_stats: bool = False, progress: bool = True,
                 allow_pickle: bool = False, data: dict[str, list[TensorSource]] | None = None,
                 gather: Callable[..., dict[str, list[TensorSource]]] | None = None,
                 tensors: Collection[str] | None = None):
        """`data`: a data-aware method's per-model statistics by kind, one source per model, where
        the caller has them; `gather(plan, kinds, folder, allow_pickle=, progress=)` computes the
        missing kinds into a scratch folder before the merge (procedures/calibration.gather).
        `tensors`: the passes run over these tensors only (one group of a merge spread over
        processes, procedures/ray_merge.py); statistics sample as over the whole plan."""
        if plan.method.sequential:
            raise MergeError(f"method {plan.method.name} applies its models one at a time and writes its state to a "
                             "folder: use `modalmerge merge` / modalmerge.merge() with an output folder")
        self.plan = plan
        self.allow_pickle = allow_pickle  # for data-aware inputs (an optimizer.pt)
        self.data = dict(data or {})
        self.gather = gather
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise MergeError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
        self.exact_stats = exact_stats
        self.progress = progress
        self.selected = None if tensors is None else set(tensors)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="modalmerge-read")
        # outputs are cast and written in a thread while the next job computes (one in flight)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="modalmerge-write")
        # the fused kernels split large blocks over torch's thread count, within run()'s passes
        self._kernel_threads = KernelThreads(torch.get_num_threads())
        self._pending = None
        self.use_fused = self._use_fused()

    def _use_fused(self) -> bool:
        # the kernel reads the stored inputs; ops.trimmed_merge runs C on them where it can, else
        # builds the float32 stack itself (one stack either way)
        return self.plan.method.fused and self.device.type == "cpu"

    # -- reading ---------------------------------------------------------------------------
    def _read_raw(self, job: Job) -> tuple[torch.Tensor | None, list[torch.Tensor], dict[str, list[torch.Tensor]], bool]:
        """The job's raw inputs (storage dtype): base, models, data-aware statistics, and whether
        some weight may be NaN/Inf.

        The finiteness screen runs here, in the reading thread, on the storage dtype: a sum is
        NaN/Inf when any element is (or, rarely, when it overflows), and costs far less than
        isfinite().all(); only a non-finite sum makes the job pay for the element-wise check.
        """
        name = job.tensor.name
        whole = job.whole
        base, models, suspect = self._read_inputs(
            lambda src: src.read(name) if whole else src.read(name, job.start, job.stop))
        return base, models, self._read_data(job), suspect

    def _read_inputs(self, one) -> tuple[torch.Tensor | None, list[torch.Tensor], bool]:
        """one(source) for the base and every model, and the finiteness screen of _read_raw."""
        base = one(self.plan.base) if self.plan.base is not None else None
        models = [one(m) for m in self.plan.models]
        suspect = not all(bool(torch.isfinite(t.sum())) for t in ([base] if base is not None else []) + models)
        return base, models, suspect

    def _read_sample(self, job: Job, stride: int):
        """A seeded sample of the job's elements, read as SAMPLE_SEGMENT-long segments (about one
        in `stride` of them, at least one), in the layout of _read_raw."""
        name, n, seg = job.tensor.name, job.stop - job.start, SAMPLE_SEGMENT
        segments = -(-n // seg)
        count = max(1, segments // stride)
        shift = (hash_name(name) + job.rows[0]) % 1000 / 1000  # where in its stretch each segment sits
        starts = [job.start + int((i + shift) * segments / count) * seg for i in range(count)]

        base, models, suspect = self._read_inputs(
            lambda src: torch.cat([src.read(name, a, min(a + seg, job.stop)) for a in starts]))
        return base, models, {}, suspect

    def _read_data(self, job: Job) -> dict[str, list[torch.Tensor]]:
        """Per-model statistics of a data-aware method for this job: a statistic shaped like the
        tensor is cut like it; another shape (a Gram matrix, a scalar) is read whole."""
        name, out = job.tensor.name, {}
        for kind, sources in self.data.items():
            if not all(name in src for src in sources):
                continue
            if sources[0].meta(name).shape == job.tensor.meta.shape and not job.whole:
                out[kind] = [src.read(name, job.start, job.stop) for src in sources]
            else:  # e.g. one coefficient per tensor: every chunk sees all of it
                out[kind] = [src.read(name) for src in sources]
        return out

    def _group(self, job: Job, raw, sample: tuple[int, int] | None = None, scheduled: bool = True,
               tensor_stats: list | None = None, tie_totals: dict[str, float] | None = None) -> TensorGroup:
        base_raw, model_raw, data_raw, suspect = raw
        shape = job.shape

        def prep(t: torch.Tensor) -> torch.Tensor:
            if sample is not None:
                t = t.reshape(-1)[sample[0]::sample[1]]
            return t

        n_models = len(model_raw)
        if self.use_fused and sample is None and scheduled and not suspect and not data_raw \
                and job.stop - job.start >= FUSED_MIN_BLOCK:
            # the kernel reads the raw inputs; shapes only (meta) until it asks for the stack
            return self._make_group(job, scheduled, 1.0, None, {}, tensor_stats, tie_totals,
                                    base=None if base_raw is None else torch.empty(shape, device="meta"),
                                    models=torch.empty((n_models,) + shape, device="meta"),
                                    raw_base=base_raw, raw_models=model_raw)
        first = prep(model_raw[0])
        out_shape = tuple(first.shape) if sample is not None else shape
        models = torch.empty((n_models,) + out_shape, dtype=torch.float32, device=self.device)
        for i, r in enumerate(model_raw):
            models[i].copy_(prep(r).reshape(out_shape))
        base = None
        if base_raw is not None:
            base = torch.empty(out_shape, dtype=torch.float32, device=self.device)
            base.copy_(prep(base_raw).reshape(out_shape))
        if suspect:
            self._check_finite(job, base, models)
        weight = 1.0
        if sample is not None:
            weight = (job.stop - job.start) / max(models.shape[1], 1)
        data = {}
        for kind, values in data_raw.items():
            if tuple(values[0].shape) in (shape, (job.stop - job.start,)) and values[0].numel() == job.stop - job.start:
                values = [prep(v).reshape(out_shape) for v in values]
            data[kind] = torch.stack([v.to(device=self.device, dtype=torch.float32) for v in values])
        return self._make_group(job, scheduled, weight, sample, data, tensor_stats, tie_totals,
                                base=base, models=models)

    def _make_group(self, job: Job, scheduled: bool, weight: float, sample, data, tensor_stats, tie_totals,
                    **inputs) -> TensorGroup:
        p = self.plan
        # per-tensor values (schedules, filter lists) resolved, in every pass
        model_params = p.params_for(job.tensor.info)[1]
        return TensorGroup(
            info=job.tensor.info, model_names=p.model_names,
            weights=torch.tensor(p.weights_for(job.tensor.info), dtype=torch.float32, device=self.device),
            model_params=model_params, row_start=job.rows[0], seed=p.recipe.seed,
            sample_weight=weight, is_sample=sample is not None, data=data, tensor_stats=tensor_stats,
            # the block's sign-election bookkeeping, shared with apply()
            election=ElectionState(exact=job.whole or sample is not None, totals=tie_totals), **inputs,
        )

    def _check_finite(self, job: Job, base, models) -> None:
        """Name the model whose tensor holds NaN/Inf (after a non-finite sum of the raw inputs)."""
        if base is not None and not bool(torch.isfinite(base).all()):
            raise MergeError(f"model {who(self.plan.base)}: tensor {job.tensor.name!r} contains NaN or Inf; "
                             "fix or exclude the tensor (`exclude` in the recipe)")
        if not bool(torch.isfinite(models).all()):
            bad = next(i for i in range(models.shape[0]) if not bool(torch.isfinite(models[i]).all()))
            raise MergeError(f"model {who(self.plan.models[bad])}: tensor {job.tensor.name!r} contains NaN "
                             "or Inf; fix or exclude the tensor (`exclude` in the recipe)")

    def _prefetched(self, jobs: list[Job], read=None) -> Iterator[tuple[Job, Any]]:
        """Yield (job, read(job)) — by default its raw inputs — with the next job's reads
        already under way in a thread."""
        if not jobs:
            return
        read = read or self._read_raw
        future = self._pool.submit(read, jobs[0])
        for i, job in enumerate(jobs):
            raw = future.result()
            if i + 1 < len(jobs):
                future = self._pool.submit(read, jobs[i + 1])
            yield job, raw

    def _bar(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, unit="param", unit_scale=True, disable=not self.progress,
                    leave=False, dynamic_ncols=True)

    # -- passes ----------------------------------------------------------------------------
    def jobs(self) -> list[Job]:
        return [Job(t, rows) for t in self.plan.merged if self._selected(t) for rows in t.chunks]

    def _selected(self, t: TensorPlan) -> bool:
        """Whether this executor's passes cover tensor `t` (all of them without `tensors`)."""
        return self.selected is None or t.name in self.selected

    def statistics(self, observe: Callable[[Statistic, Stats], Statistic] | None = None) -> Stats:
        """Every statistics pass the method declares, each result given to the passes after it.
        `observe(stat, prior)` runs one pass over the jobs and returns the statistic that observed
        them: by default self.observe; procedures/ray_merge.py runs it group by group on Ray."""
        p = self.plan
        results = Stats()
        queue = list(p.method.statistics(p.params))
        while queue:
            stat = (observe or self.observe)(queue.pop(0), results)
            result = stat.result(p.params, results)
            results.put(stat, result)
            if self.exact_stats:
                follow = stat.refinement(result)
                if follow is not None:
                    queue.insert(0, follow)
        return results

    def observe(self, stat: Statistic, prior: Stats) -> Statistic:
        """One statistics pass: `stat` observes every job of this executor, in plan order."""
        p = self.plan
        total = sum(t.meta.numel for t in p.merged)
        # sample only where the model is large enough that a sample still has >= 4M values
        stride = 1 if self.exact_stats else max(1, total // SAMPLE_TARGET)
        jobs = self.jobs()
        with self._bar(sum(j.stop - j.start for j in jobs), f"statistics ({stat.name})") as bar:
            sampled = stat.sampled and stride > 1

            def read(job: Job):
                if sampled and job.stop - job.start > SAMPLE_MIN:
                    if self.data:  # per-element statistics must be sampled alike: strided, from the whole job
                        return self._read_raw(job), ((hash_name(job.tensor.name) + job.rows[0]) % stride, stride)
                    return self._read_sample(job, stride), (0, 1)
                return self._read_raw(job), None

            for job, (raw, sample) in self._prefetched(jobs, read):
                stat.observe(self._group(job, raw, sample, scheduled=False), p.params_for(job.tensor.info)[0], prior)
                bar.update(job.stop - job.start)
        return stat

    def apply(self, sink, stats: Stats) -> None:
        p = self.plan
        jobs = self.jobs()
        # per chunked tensor: summed tie partials, and the chunks that used a provisional tie sign
        tie_partials: dict[str, dict[str, float]] = {}
        provisional: dict[str, list[Job]] = {}
        per_tensor: dict[str, list] = {}
        tensor_statistic = p.method.tensor_statistic(p.params) if p.method.tensor_statistic else None
        with self._bar(sum(j.stop - j.start for j in jobs), "merging") as bar:
            for job, raw in self._prefetched(jobs):
                name = job.tensor.name
                if p.scheduled and p.method.tensor_statistic:  # e.g. a filtered `scope`: this tensor's own
                    tensor_statistic = p.method.tensor_statistic(p.params_for(job.tensor.info)[0])
                if tensor_statistic is not None and not job.whole and job.rows[0] == 0:
                    per_tensor[name] = self._tensor_statistics(job.tensor, tensor_statistic)
                group = self._group(job, raw, tensor_stats=per_tensor.get(name))
                params = p.params_for(job.tensor.info)[0]
                self._write(sink, job, p.method.kernel(group, params, stats))
                if len(job.tensor.chunks) > 1:
                    acc = tie_partials.setdefault(name, {})
                    for key, value in group.election.partials.items():
                        acc[key] = acc.get(key, 0.0) + value
                    if group.election.provisional:
                        provisional.setdefault(name, []).append(job)
                    if job.rows == job.tensor.chunks[-1]:
                        self._redo_ties(sink, stats, provisional.pop(name, []), tie_partials.pop(name),
                                        per_tensor.get(name))
                if job.rows == job.tensor.chunks[-1]:
                    per_tensor.pop(name, None)
                del group, raw
                bar.update(job.stop - job.start)
        self._drain()
        for t in p.tensors:
            if not t.merge and self._selected(t):
                value = p.copy_source.read(t.name)
                sink.write(t.name, value.to(t.out_dtype))

    def _tensor_statistics(self, tensor: TensorPlan, statistic) -> list:
        """A method's per-tensor statistic for a tensor merged in row blocks: each model's whole
        tensor is read once more, before the first block, one model at a time besides the base
        (raw storage dtype; the statistic converts)."""
        p = self.plan
        params, model_params = p.params_for(tensor.info)
        base = p.base.read(tensor.name).to(self.device) if p.base is not None else None
        return [statistic(params, tensor.info, base, m.read(tensor.name).to(self.device), mp, self.use_fused)
                for m, mp in zip(p.models, model_params)]

    def _redo_ties(self, sink, stats, jobs: list[Job], totals: dict[str, float], tensor_stats=None) -> None:
        """Chunks decided some exact zero sums with a provisional + before the tensor's total was
        known; where that total is negative, run them again with it (rare: exact ties only)."""
        if not jobs or all(v >= 0 for v in totals.values()):
            return
        for job in jobs:
            group = self._group(job, self._read_raw(job), tensor_stats=tensor_stats, tie_totals=totals)
            self._write(sink, job, self.plan.method.kernel(group, self.plan.params_for(job.tensor.info)[0], stats))

    def _write(self, sink, job: Job, merged) -> None:
        if tuple(merged.tensor.shape) != job.shape:
            raise AssertionError(f"{self.plan.method.name} returned shape {tuple(merged.tensor.shape)} for "
                                 f"{job.tensor.name} {job.shape}")
        self._drain()
        self._pending = self._writer.submit(self._emit, sink, job, merged)

    def _drain(self) -> None:
        """Wait for the write in flight (and raise its error, if any)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _emit(self, sink, job: Job, merged) -> None:
        t = job.tensor
        out = merged.tensor
        if not bool(torch.isfinite(out.sum())) and not bool(torch.isfinite(out).all()):
            raise MergeError(f"method {self.plan.method.name} produced NaN/Inf in tensor {t.name!r}; "
                             "check its parameters (a zero divisor?) or exclude the tensor")
        sink.write(t.name, out.to(t.out_dtype).cpu(), job.start)
        if merged.shared is not None:
            sink.write_shared(t.name, merged.shared.to(t.out_dtype).cpu(), job.start)
        for task, mask in (merged.masks or {}).items():
            sink.write_mask(task, t.name, pack_bits(mask.cpu()), job.start // 8)

    def run(self, sink) -> Report:
        scratch = None
        missing = [k for k in self.plan.method.data(self.plan.params) if k not in self.data]
        try:
            if missing and self.gather is None:
                raise MergeError(f"method {self.plan.method.name} needs per-model statistics ({', '.join(missing)})"
                                 " that only model folders can give: pass them as `data`, or merge model folders")
            t0 = time.perf_counter()
            if missing:
                # data-aware: per-model statistics from calibration data, before the streaming merge,
                # kept inside the output's partial folder where there is one (one removal covers
                # both, a kill -9 included), else in $TMPDIR; removed on every way out
                import tempfile

                place = getattr(sink, "scratch", None)
                scratch = place("modalmerge-data-") if place else Path(tempfile.mkdtemp(prefix="modalmerge-data-"))
                self.data.update(self.gather(self.plan, missing, str(scratch), allow_pickle=self.allow_pickle,
                                             progress=self.progress))
            with threads_in_use(self._kernel_threads):
                stats = self.statistics()
                t1 = time.perf_counter()
                self.apply(sink, stats)
                t2 = time.perf_counter()
            if scratch is not None:  # not part of the output
                self._drop_scratch(scratch, missing)
                scratch = None
            manifest = decoupled_manifest(self.plan, stats) if self.plan.method.decoupled else None
            sink.close(manifest)
            return Report.of(self.plan, stats,
                             {"statistics": t1 - t0, "apply": t2 - t1, "total": time.perf_counter() - t0})
        except BaseException:
            self._writer.shutdown(wait=True)  # the one write in flight lands before the abort, never after
            sink.abort()
            raise
        finally:
            self.close()
            if scratch is not None:
                self._drop_scratch(scratch, missing)

    @contextmanager
    def passes(self):
        """Its kernel threads in use for the passes run inside (observe, apply: what run() does
        around its own); its thread pools shut down on the way out (an executor runs once)."""
        try:
            with threads_in_use(self._kernel_threads):
                yield self
        finally:
            self.close()

    def close(self) -> None:
        """Shut down its reading and writing threads and the kernels' threads."""
        self._writer.shutdown(wait=True, cancel_futures=True)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._kernel_threads.close()

    def _drop_scratch(self, scratch: Path, kinds: list[str]) -> None:
        for kind in kinds:
            self.data.pop(kind, None)
        from ..checkpoint.output import remove_tree
        remove_tree(scratch)


def hash_name(name: str) -> int:
    """A stable (not per-process salted) small hash of a tensor name."""
    h = 0
    for ch in name.encode():
        h = (h * 131 + ch) % 1_000_003
    return h


def decoupled_manifest(plan: Plan, stats: Stats) -> dict[str, Any]:
    """What `decoupled/manifest.json` says: task t is θ_text + (c_t − c̄) ⊙ shared, c_t = s_t·m_t."""
    method = plan.method
    scalars = method.task_scalars(plan.params, stats, plan.model_names) if method.task_scalars else \
        [1.0] * len(plan.model_names)
    return {
        "format": "modalmerge-decoupled/1",
        "method": method.name,
        "params": plan.params.model_dump(by_alias=True),
        "base": plan.recipe.base,
        "tasks": [{"name": n, "path": m.path, "scalar": float(s)}
                  for n, m, s in zip(plan.model_names, plan.recipe.models, scalars)],
        "tensors": [t.name for t in plan.merged],
        "shared": "shared",
        "masks": "masks",
        "mask_key": "{task}::{tensor}",
        "text_weights": "mean over all tasks of scalar_t * mask_t",
    }


_allocator_tuned = False


def keep_freed_memory_for_reuse() -> None:
    """Let glibc serve large tensors from its heap and keep freed blocks for the next job.

    By default every allocation over 32 MB is a fresh mmap that is returned to the kernel when
    freed, so each job's temporaries page-fault their memory in again: that costs more than the
    arithmetic (measured 4x on subtraction of a [9, 4M] float32 stack). And threads other than
    the main one allocate from arenas of their own, whose heaps (64 MB at most) go back to the
    kernel as soon as they are empty: the reading thread's buffers were fresh pages job after
    job, zeroed by the kernel (12% of TIES's CPU time in `perf`); one arena for all threads
    keeps them (TIES global in one process: 4.1-5.6 s, from 5.8-7.9 s). Peak memory is
    unchanged: the same blocks are reused job after job. These are process-wide malloc
    settings, made once, on the first CPU merge.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return
    _allocator_tuned = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, 1 << 31)
        libc.mallopt(m_arena_max, 1)
    except (OSError, AttributeError):  # not glibc: keep the defaults
        pass
