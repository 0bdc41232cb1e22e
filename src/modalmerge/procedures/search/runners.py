"""Where trials run: the Runner interface the study loop drives, and the in-process runner.

The study loop keeps `capacity` trials in flight: it submits a trial's number and parameters,
then waits for whichever trial ends first and tells Optuna its result. `LocalRunner` runs one
trial at a time in this process; `ray_runner.RayRunner` runs them on Ray workers, each holding
its own TrialContext (inputs opened once per worker, never per trial).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

from ...errors import MergeError
from .trial import PruneRule, SearchSpec, TrialContext, TrialResult

SEARCH_EXTRA = "pip install 'modalmerge[search]'"


class Runner(Protocol):
    capacity: int  # trials that may be in flight at once

    def start(self, spec: SearchSpec) -> None:
        """Make the workers ready (each builds its TrialContext); a bad spec raises MergeError."""

    def submit(self, number: int, params: dict[str, Any], prune: PruneRule | None = None) -> None:
        """Start trial `number` with these parameter values (never more than `capacity` in flight)."""

    def wait_any(self) -> tuple[int, TrialResult]:
        """The next trial to end: its number and result."""

    def close(self) -> None:
        """Stop the workers (trials still in flight are abandoned)."""


class LocalRunner:
    """Trials one at a time in this process, on one TrialContext."""

    capacity = 1

    def __init__(self, worker: str = "local"):
        self.worker = worker
        self.context: TrialContext | None = None
        self.queue: deque[tuple[int, dict[str, Any], PruneRule | None]] = deque()

    def start(self, spec: SearchSpec) -> None:
        self.context = TrialContext(spec, worker=self.worker)

    def submit(self, number: int, params: dict[str, Any], prune: PruneRule | None = None) -> None:
        self.queue.append((number, params, prune))

    def wait_any(self) -> tuple[int, TrialResult]:
        if self.context is None:
            raise MergeError("the runner was not started")
        number, params, prune = self.queue.popleft()
        return number, self.context.run(params, prune)

    def close(self) -> None:
        self.context = None
        self.queue.clear()
