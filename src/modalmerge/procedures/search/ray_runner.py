"""Trials on Ray actors: `RayRunner`, the runner `modalmerge search --workers W` / `--address` use.

Each worker is one Ray actor that builds its own TrialContext once, in the actor: it opens the
inputs read-only from the paths in the SearchSpec and loads the evaluators' data. A trial reads
the input tensors it merges with positioned reads through the operating system's page cache,
which the workers of one machine share, so no worker holds a copy of the inputs. A trial sends
only its number and parameter values to an actor and gets back a small TrialResult (metrics,
seconds, status, and the node and actor that ran it); no tensor travels through Ray. On a
cluster each node reads the inputs from storage that every node sees at the same paths
(docs/search-cluster.md).

Without an address, a local Ray instance of workers × threads CPUs is started for the search and
shut down after it; with `--address` or RAY_ADDRESS, the trials run on that cluster
(procedures/ray_cluster.py: how either is joined, and why an address is checked first). An actor that dies (killed, out of memory, its node lost)
fails the trial it was running; a new actor replaces it and the search goes on.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from ...errors import MergeError, one_line
from ..ray_cluster import connect, node_name, usable_cores
from .runners import SEARCH_EXTRA
from .trial import PruneRule, SearchSpec, TrialContext, TrialResult, failure_text



class TrialWorker:
    """The body of one Ray actor: a TrialContext made once, in the actor's process; trials on it
    one at a time. A context that cannot be made is kept as an error for `ready` to report."""

    def __init__(self, spec: SearchSpec, threads: int):
        import ray
        import torch

        torch.set_num_threads(threads)  # this worker's share of the cores (a process of its own)
        runtime = ray.get_runtime_context()
        self.worker = f"actor {runtime.get_actor_id()[:12]}"
        self.node_id = runtime.get_node_id()
        self.context: TrialContext | None = None
        self.error: str | None = None
        try:
            self.context = TrialContext(spec, worker=self.worker)
        except Exception as e:  # noqa: BLE001 - told to the driver as one line, not a remote traceback
            self.error = failure_text(e)

    def ready(self) -> tuple[str | None, str, str]:
        """(the error that kept the context from being made, or None; the Ray node id; the worker)."""
        return self.error, self.node_id, self.worker

    def pid(self) -> int:
        return os.getpid()

    def run(self, params: dict[str, Any], prune: PruneRule | None) -> TrialResult:
        if self.context is None:
            return TrialResult({}, 0.0, "failed", self.error)
        return self.context.run(params, prune)


@dataclass
class Slot:
    """One worker place: its actor, where it runs, and what it is doing."""

    actor: Any
    node: str = "?"
    worker: str = "?"
    state: str = "starting"   # starting | idle | busy


@dataclass
class Call:
    """A call in flight: a trial (number, started at), or an actor's readiness (number None)."""

    slot: Slot
    number: int | None = None
    started: float = 0.0


class RayRunner:
    """`workers` Ray actors, one trial each at a time (see the module docstring)."""

    def __init__(self, workers: int, address: str | None = None, threads_per_worker: int | None = None):
        if workers < 1:
            raise MergeError(f"--workers {workers}: give 1 or more")
        if threads_per_worker is not None and threads_per_worker < 1:
            raise MergeError(f"--threads {threads_per_worker}: give 1 or more")
        self.capacity = workers
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.threads_per_worker = threads_per_worker
        self.threads = 1
        self.spec: SearchSpec | None = None
        self.actor_class: Any = None
        self.slots: list[Slot] = []
        self.calls: dict[Any, Call] = {}
        self.queue: deque[tuple[int, dict[str, Any], PruneRule | None]] = deque()
        self.shutdown_ray = False
        self.replaced = 0

    # ---- starting
    def start(self, spec: SearchSpec) -> None:
        try:
            import ray
        except ModuleNotFoundError:
            raise MergeError(f"--workers/--address run trials on Ray, which is not installed: {SEARCH_EXTRA}") from None
        self.spec = spec
        self.threads = self.threads_per_worker or spec.threads or (
            1 if self.address else max(1, usable_cores() // self.capacity))
        self.connect(ray)
        try:
            self.check_resources(ray, spec)
            self.actor_class = ray.remote(TrialWorker)
            self.slots = [self.new_slot() for _ in range(self.capacity)]
            for ref in list(self.calls):   # every worker ready before the first trial
                self.on_ready(ray, ref, self.calls.pop(ref), starting=True)
        except BaseException:
            self.close()
            raise

    def connect(self, ray) -> None:
        """Join the cluster at the address, or start a local instance for this search."""
        self.shutdown_ray = connect(ray, self.address, self.capacity * self.threads, "modalmerge-search")

    def check_resources(self, ray, spec: SearchSpec) -> None:
        """Refuse a worker count the cluster cannot place (the actors would wait for ever)."""
        have = ray.cluster_resources()
        need = {"CPU": self.capacity * self.threads}
        if spec.device.startswith("cuda"):
            need["GPU"] = self.capacity
        where = f"the Ray cluster at {self.address}" if self.address else "the local Ray instance"
        for name, count in need.items():
            if have.get(name, 0) < count:
                per = f"{self.threads} CPU(s)" if name == "CPU" else "one GPU"
                raise MergeError(f"--workers {self.capacity}: each worker needs {per}, {where} has "
                                 f"{have.get(name, 0):g} {name}(s); use fewer workers or --threads, or a larger cluster")
        largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        if largest < self.threads:
            raise MergeError(f"--threads {self.threads}: no node of {where} has that many CPUs (the largest has "
                             f"{largest:g}); give --threads {max(1, int(largest))} or less")

    def actor_options(self) -> dict[str, Any]:
        assert self.spec is not None
        options: dict[str, Any] = {"num_cpus": self.threads, "max_restarts": 0, "max_task_retries": 0}
        if self.spec.device.startswith("cuda"):
            options["num_gpus"] = 1  # Ray sets the actor's CUDA_VISIBLE_DEVICES to its own GPU
        if self.address:
            options["scheduling_strategy"] = "SPREAD"  # one worker per node before two on one
        return options

    def new_slot(self) -> Slot:
        slot = Slot(self.actor_class.options(**self.actor_options()).remote(self.spec, self.threads))
        self.calls[slot.actor.ready.remote()] = Call(slot)
        return slot

    def on_ready(self, ray, ref, call: Call, starting: bool = False) -> None:
        slot = call.slot
        try:
            error, node_id, slot.worker = ray.get(ref)
            slot.node = node_name(ray, node_id)
        except ray.exceptions.RayError as e:
            error = f"the worker process ended while starting ({one_line(e, 200)})"
        if error is None:
            slot.state = "idle"
            return
        if starting or self.replaced > 2 * self.capacity:
            raise MergeError(error if starting else f"Ray workers keep dying; the last: {error}")
        self.replace(ray, slot)

    # ---- trials
    def submit(self, number: int, params: dict[str, Any], prune: PruneRule | None = None) -> None:
        self.queue.append((number, params, prune))

    def dispatch(self) -> None:
        for slot in self.slots:
            if not self.queue:
                return
            if slot.state == "idle":
                number, params, prune = self.queue.popleft()
                slot.state = "busy"
                self.calls[slot.actor.run.remote(params, prune)] = Call(slot, number, time.perf_counter())

    def wait_any(self) -> tuple[int, TrialResult]:
        import ray

        while True:
            self.dispatch()
            if not self.calls:
                raise MergeError("no trial is in flight: submit one before waiting")
            (ref,), _ = ray.wait(list(self.calls), num_returns=1)
            call = self.calls.pop(ref)
            if call.number is None:
                self.on_ready(ray, ref, call)
                continue
            return call.number, self.finish(ray, ref, call)

    def finish(self, ray, ref, call: Call) -> TrialResult:
        slot = call.slot
        try:
            result = ray.get(ref)
        except ray.exceptions.RayTaskError as e:   # the method raised; the actor lives on
            slot.state = "idle"
            return TrialResult({}, time.perf_counter() - call.started, "failed",
                               f"{type(e.cause).__name__ if e.cause else 'error'}: {one_line(e.cause or e, 300)}",
                               slot.node, slot.worker)
        except ray.exceptions.RayError as e:       # the actor died: killed, out of memory, node lost
            self.replace(ray, slot)
            return TrialResult({}, time.perf_counter() - call.started, "failed",
                               f"the worker died during the trial ({one_line(e, 200)}); a new worker replaced it",
                               slot.node, slot.worker)
        slot.state = "idle"
        result.node, result.worker = slot.node, slot.worker
        return result

    def replace(self, ray, slot: Slot) -> None:
        """A new actor in a dead one's place (it builds its own context; trials wait until it is ready)."""
        self.replaced += 1
        ray.kill(slot.actor, no_restart=True)
        self.slots[self.slots.index(slot)] = self.new_slot()

    def worker_pids(self) -> list[int]:
        """The process ids of the workers on this machine (the benchmark measures their memory)."""
        import ray

        return ray.get([s.actor.pid.remote() for s in self.slots])

    def close(self) -> None:
        """Kill the actors; shut down the local instance, or leave the cluster, if start began them."""
        try:
            import ray
        except ModuleNotFoundError:
            return
        if ray.is_initialized():
            for slot in self.slots:
                try:
                    ray.kill(slot.actor, no_restart=True)
                except Exception:  # noqa: BLE001 - already dead or its node gone: nothing to stop
                    pass
        self.slots, self.calls = [], {}
        self.queue.clear()
        if self.shutdown_ray:
            ray.shutdown()
            self.shutdown_ray = False
