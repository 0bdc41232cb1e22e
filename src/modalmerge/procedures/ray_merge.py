"""One merge spread over Ray: `modalmerge merge RECIPE -o OUT --ray [--address ADDR]`.

The plan's tensors are cut into groups, one per output weight shard (`--out-shard-size` sets
their size, so their number). Each group runs as a Ray task that plans the merge again from the
recipe, so it opens the inputs itself from their paths (storage that every node sees at the same
paths, as a search needs: docs/search-cluster.md); it runs the streaming executor over its own
tensors (`engine/executor.Executor(tensors=...)`) and writes its shard into the output's partial
folder. No tensor goes through Ray.

Statistics passes (a method's whole-model statistics, e.g. TIES's global trim threshold) run on
the workers too, group after group in plan order: each group's task takes the statistic as the
previous group's task left it (a Ray object), observes its own tensors and hands it on; the
driver takes the last one's result and sends it, once, with every apply task. Folding the groups
in plan order makes the same additions in the same order as the single-machine pass, which is
what keeps the merge bit-identical to `modalmerge merge` without --ray; summing per-group partial
histograms in parallel would add the same floats in another order. A statistics pass reads a
sample of a few million values per model (everything with --exact-stats), the small part of a
merge; the apply pass runs the groups in parallel.

The driver opens the output as the single-machine merge does (engine/sinks.FolderSink: the lock,
the partial folder and the shards' index, here without the weight shards, which the workers
write), and once every group is written it writes config, tokenizer and model card and places
the folder atomically. A failed group (an error in the merge, or its worker or node lost) ends the
merge with one error line and no output: the tasks still running are let finish (a while) and
the partial folder removed. They are not cancelled: in Ray 2.60 a cancel that meets a task's
reply on its way crashes the driver ("Check failed: it != submissible_tasks_.end()", the race of
ray-project/ray#54798), seen here once in CI; only Ctrl-C cancels the unfinished ones. Each worker checks that its plan is the driver's, so a node that sees other files at the
inputs' paths is one error line too.

Ray: a local instance of `workers × threads` CPUs by default, node address 127.0.0.1, shut down
at the end; `--address` or RAY_ADDRESS joins a cluster, checked first (one line when nothing
answers there). torch's float sums split their work by thread count, so a merge is bit-identical
to a single-machine merge run with the same threads per process (`--threads`).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..checkpoint.output import DEFAULT_SHARD_BYTES, is_output_error, output_error, shard_layout
from ..checkpoint.safetensors_io import SafetensorsStreamWriter
from ..engine.executor import Executor, Report
from ..engine.plan import Plan
from ..engine.recipe import Recipe
from ..engine.sinks import FolderSink, output_entries
from ..errors import MergeError, one_line
from ..methods.base import Statistic, Stats
from .run import RunOptions, plan_merge
from .ray_cluster import connect, usable_cores
from .search.runners import SEARCH_EXTRA

NAMESPACE = "modalmerge-merge"
CANCEL_WAIT_S = 60.0  # tasks still running are waited for (a while) before the partial folder is removed


@dataclass(frozen=True)
class GroupTask:
    """What a worker needs to plan the merge again and run a group of it: no open file, only
    paths and values (Ray pickles it once per merge)."""

    recipe: Recipe
    allow_pickle: bool
    chunk_elems: int
    trust_recipe_code: bool
    trust_remote_code: bool
    device: str
    exact_stats: bool
    threads: int
    max_shard_bytes: int
    fingerprint: str                 # the driver's plan (plan_fingerprint)
    folder: str                      # the output's partial folder, where the shards go


def supported(plan: Plan) -> None:
    """Refuse, in one line, a merge that a Ray merge does not spread yet."""
    method, fix = plan.method, "merge without --ray"
    if method.runs != "streaming":
        raise MergeError(f"--ray: method {method.name} runs as a {method.runs} procedure, not as streamed tensor "
                         f"jobs that Ray can spread; {fix}")
    if plan.modules or plan.recipe.slices:
        what = "`modules:`" if plan.modules else "`slices:`"
        raise MergeError(f"--ray: a {what} recipe is not spread over Ray yet; {fix}")
    if method.decoupled:
        raise MergeError(f"--ray: method {method.name} writes a decoupled part (shared vector and masks), which a "
                         f"Ray merge does not write yet; {fix}")
    if method.data(plan.params):
        raise MergeError(f"--ray: method {method.name} needs a data pass on calibration data first, which a Ray "
                         f"merge does not run yet; {fix}")


def plan_fingerprint(plan: Plan) -> str:
    """What a worker's plan must share with the driver's: every tensor, its blocks and dtypes, the
    models, weights and parameters."""
    parts = [plan.method.name, repr(plan.params.model_dump(by_alias=True)), repr(plan.model_names),
             repr(plan.weights), repr(plan.model_params), repr(plan.recipe.seed)]
    parts += [f"{t.name} {tuple(t.meta.shape)} {t.meta.dtype} {t.out_dtype} {t.merge} {t.chunks}" for t in plan.tensors]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


# -- on a worker ---------------------------------------------------------------------------------

def worker_plan(task: GroupTask) -> Plan:
    """The merge planned again in this worker, from the recipe's paths, checked against the driver's."""
    torch.set_num_threads(task.threads)  # this task's share of the node (a process of Ray's)
    plan = plan_merge(task.recipe, allow_pickle=task.allow_pickle, chunk_elems=task.chunk_elems,
                      trust_recipe_code=task.trust_recipe_code, trust_remote_code=task.trust_remote_code)
    if plan_fingerprint(plan) != task.fingerprint:
        raise MergeError(f"a Ray worker on {os.uname().nodename} plans this merge differently from the driver: it "
                         "sees other files at the inputs' paths; every node must read the same inputs at the same "
                         "paths (shared storage)")
    return plan


def observe_group(task: GroupTask, names: list[str], stat: Statistic, prior: Stats) -> Statistic:
    """A Ray task: `stat`, as the previous group left it, observes this group's tensors."""
    executor = Executor(worker_plan(task), device=task.device, exact_stats=task.exact_stats, progress=False,
                        allow_pickle=task.allow_pickle, tensors=names)
    with executor.passes():
        return executor.observe(stat, prior)


class ShardSink:
    """A worker's sink: the tensors of one output shard, written into the partial folder."""

    def __init__(self, writer: SafetensorsStreamWriter):
        self.writer = writer

    def write(self, name: str, tensor: torch.Tensor, start: int = 0) -> None:
        self.writer.write(name, tensor, start)


def apply_group(task: GroupTask, shard: str, stats: Stats) -> dict[str, Any]:
    """A Ray task: merge (or copy) the tensors of output shard `shard` and write the shard."""
    import ray

    start = time.perf_counter()
    plan = worker_plan(task)
    layout = dict(shard_layout(output_entries(plan), max_shard_bytes=task.max_shard_bytes))
    executor = Executor(plan, device=task.device, exact_stats=task.exact_stats, progress=False,
                        allow_pickle=task.allow_pickle, tensors=[name for name, _ in layout[shard]])
    writer = SafetensorsStreamWriter(Path(task.folder) / shard, layout[shard])
    try:
        with executor.passes():
            executor.apply(ShardSink(writer), stats)
    except BaseException:
        try:
            writer.close()  # its file descriptor; the driver removes the partial folder
        except AssertionError:  # not every tensor was written: the error above says why
            pass
        raise
    writer.close()
    return {"shard": shard, "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
            "seconds": time.perf_counter() - start}


# -- on the driver -------------------------------------------------------------------------------

class RayMerge:
    """The driver's side of one merge on Ray (see the module docstring)."""

    def __init__(self, ray, plan: Plan, task: GroupTask, groups: list[tuple[str, list[str]]], workers: int,
                 final: Path, progress: bool, spread: bool = False):
        self.ray, self.plan, self.groups, self.workers = ray, plan, groups, workers
        self.final, self.progress = final, progress
        self.task_ref = ray.put(task)
        options: dict[str, Any] = {"num_cpus": task.threads, "max_retries": 0}
        if task.device.startswith("cuda"):
            options["num_gpus"] = 1  # Ray sets the worker's CUDA_VISIBLE_DEVICES to its own GPU
        if spread:
            options["scheduling_strategy"] = "SPREAD"  # the shards' reads and writes over the nodes
        self.observe_remote = ray.remote(observe_group).options(**options)
        self.apply_remote = ray.remote(apply_group).options(**options)
        self.submitted: list = []  # every task's result, for stop()

    def observe(self, stat: Statistic, prior: Stats) -> Statistic:
        """One statistics pass: the statistic handed from group to group in plan order (a chain of
        Ray tasks, each waiting for the one before), the last one's returned."""
        merged = {t.name for t in self.plan.merged}
        ref, prior_ref, chain = self.ray.put(stat), self.ray.put(prior), []
        for _, names in self.groups:
            if merged.intersection(names):
                ref = self.observe_remote.remote(self.task_ref, names, ref, prior_ref)
                chain.append(ref)
                self.submitted.append(ref)
        with tqdm(total=len(chain), desc=f"statistics ({stat.name}) on Ray", unit="group",
                  disable=not self.progress, leave=False) as bar:
            for link in chain:  # only the last one's statistic comes back to the driver
                self.ray.wait([link], fetch_local=False)
                bar.update(1)
        # a failed link fails every one after it, with its error
        return self.get(ref, f"a statistics pass ({stat.name})")

    def apply(self, stats: Stats) -> list[dict[str, Any]]:
        """Every group's apply task, at most `workers` in flight; their reports."""
        stats_ref = self.ray.put(stats)
        queue, pending, done = list(self.groups), {}, []
        with tqdm(total=len(queue), desc="merging on Ray", unit="shard", disable=not self.progress,
                  leave=False) as bar:
            while queue or pending:
                while queue and len(pending) < self.workers:
                    shard, _ = queue.pop(0)
                    ref = self.apply_remote.remote(self.task_ref, shard, stats_ref)
                    pending[ref] = shard
                    self.submitted.append(ref)
                (ref,), _ = self.ray.wait(list(pending), num_returns=1)
                shard = pending.pop(ref)
                done.append(self.get(ref, f"output shard {shard}"))
                bar.update(1)
        return done

    def get(self, ref, what: str) -> Any:
        """A task's result; on failure the error is one line, once no other task runs (stop())."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayError as e:
            self.stop()
            raise self.error(e, what) from None

    def stop(self, cancel: bool = False) -> None:
        """Wait (a while) until no task writes into the partial folder any more, which the caller
        then removes. At most `workers` apply tasks are in flight, and a statistics chain's links
        after a failed one fail at once, so the wait is about one shard's merge. `cancel` (Ctrl-C):
        the unfinished tasks are cancelled first (see the module docstring for why not always)."""
        ray = self.ray
        if cancel and self.submitted:
            _, unfinished = ray.wait(self.submitted, num_returns=len(self.submitted), timeout=0)
            for ref in unfinished:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 - finished or gone meanwhile: nothing to stop
                    pass
        if self.submitted:
            ray.wait(self.submitted, num_returns=len(self.submitted), timeout=CANCEL_WAIT_S)
        self.submitted = []

    def error(self, e: Exception, what: str) -> MergeError:
        ray = self.ray
        if isinstance(e, ray.exceptions.RayTaskError):
            cause = e.cause
            if isinstance(cause, MergeError):  # the line a single-machine merge would say
                return MergeError(str(cause))
            if isinstance(cause, OSError) and is_output_error(cause, self.final):
                return output_error(cause, self.final)
            why = f"{type(cause).__name__}: {one_line(cause, 300)}" if cause is not None else one_line(e, 300)
            return MergeError(f"the Ray task of {what} failed: {why}; nothing was written at {self.final}")
        return MergeError(f"the Ray worker running {what} died ({one_line(e, 200)}); nothing was written at "
                          f"{self.final}: merge again")


@dataclass(frozen=True)
class OnRay:
    """A streaming merge spread over Ray, as procedures/run.run_merge runs it in place of the
    method's procedure (api.merge(ray=True), `modalmerge merge --ray`): `address` a cluster's
    HOST:PORT (default RAY_ADDRESS, else a local instance), `workers` tasks in flight (default:
    local, one per core up to the shard count; a cluster, every shard), `threads` torch threads per
    task (default: local, the cores ÷ workers; a cluster, 1)."""

    address: str | None = None
    workers: int | None = None
    threads: int | None = None

    def __call__(self, plan: Plan, output: str | os.PathLike, options: RunOptions) -> Report:
        return merge_on_ray(plan, output, options, self)


def merge_on_ray(plan: Plan, output: str | os.PathLike, o: RunOptions, on: OnRay) -> Report:
    """Run a planned streaming merge on Ray into the folder `output` (see the module docstring)."""
    supported(plan)
    for flag, value in (("--workers", on.workers), ("--threads", on.threads)):
        if value is not None and value < 1:
            raise MergeError(f"{flag} {value}: give 1 or more")
    try:
        import ray
    except ModuleNotFoundError:
        raise MergeError(f"--ray runs the merge on Ray, which is not installed: {SEARCH_EXTRA}") from None
    address = on.address or os.environ.get("RAY_ADDRESS") or None
    start = time.perf_counter()
    shard_bytes = o.max_shard_bytes or DEFAULT_SHARD_BYTES
    groups = [(shard, [name for name, _ in entries])
              for shard, entries in shard_layout(output_entries(plan), max_shard_bytes=shard_bytes)]
    workers = on.workers or (len(groups) if address else max(1, min(len(groups), usable_cores())))
    threads = on.threads or (1 if address else max(1, usable_cores() // workers))
    sink = FolderSink(plan, output, overwrite=o.overwrite, max_shard_bytes=o.max_shard_bytes,
                      tool_version=o.tool_version, copy_tokenizer=o.copy_tokenizer,
                      write_model_card=o.write_model_card, shard_files=())
    started, run = False, None
    try:
        started = connect(ray, address, workers * threads, NAMESPACE)
        task = GroupTask(plan.recipe, o.allow_pickle, plan.chunk_elems, plan.trust_recipe_code,
                         plan.trust_remote_code, o.device, o.exact_stats, threads, shard_bytes, plan_fingerprint(plan),
                         str(sink.folder.tmp))
        run = RayMerge(ray, plan, task, groups, workers, sink.folder.final, o.progress, spread=bool(address))
        t0 = time.perf_counter()
        driver = Executor(plan, exact_stats=o.exact_stats, progress=False)  # only its statistics loop runs here
        with driver.passes():
            stats = driver.statistics(observe=run.observe)
        t1 = time.perf_counter()
        done = run.apply(stats)
        t2 = time.perf_counter()
        sink.close()
    except BaseException as e:
        if run is not None:  # no task still writing into the partial folder; Ctrl-C stops them
            run.stop(cancel=isinstance(e, KeyboardInterrupt))
        sink.abort()
        raise
    finally:
        if started:
            ray.shutdown()
    report = Report.of(plan, stats, {"statistics": t1 - t0, "apply": t2 - t1, "total": time.perf_counter() - start})
    report.statistics["ray"] = {"shards": len(groups), "workers": workers, "threads": threads,
                                "nodes": len({d["node"] for d in done}), "processes": len({d["pid"] for d in done})}
    return report
