"""The Slicer module's background job runner: jobs, their events and one persistent worker thread.

Torch runs on the worker (warm kernels and caches across runs); the worker never touches MRML or
Qt. It reports through a thread-safe queue that ``SegmentationLogic.poll()`` drains on the main
thread, which is the only place a job's result is applied to the scene.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from .errors import Cancelled
from .progress import CancelToken, ProgressCallback


QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"


class EitherToken(CancelToken):
    """The job's own token, also cancelled by the caller's (a token or, as the engine takes, a
    zero-argument callable): the worker and the engine check one token."""

    def __init__(self, other: Union[CancelToken, Callable[[], bool], None] = None) -> None:
        super().__init__()
        self._other = other

    @property
    def cancelled(self) -> bool:
        other = self._other
        return super().cancelled or bool(other is not None and (other() if callable(other) else other.cancelled))


@dataclass
class Job:
    """One piece of work: computed on the worker, finished (applied to the scene) by ``poll()``."""

    id: int
    title: str
    compute: Callable[[ProgressCallback, CancelToken], Any] = field(repr=False)
    apply: Optional[Callable[[Any], Any]] = field(default=None, repr=False)
    cancel_token: CancelToken = field(default_factory=CancelToken, repr=False)
    progress: Optional[ProgressCallback] = field(default=None, repr=False)  # the caller's; called by poll()
    # compute writes files (an export, an import, a study's folders): a cancel that comes after it returned
    # is too late to undo them, so the job is done, not "cancelled; nothing was changed"
    writes_files: bool = False
    state: str = QUEUED
    fraction: float = 0.0
    message: str = ""
    result: Any = None
    error: Optional[BaseException] = None

    @property
    def finished(self) -> bool:
        return self.state in (DONE, FAILED, CANCELLED)

    def cancel(self) -> None:
        """Ask the job to stop before its next batch of slices; whatever it computed is then discarded."""
        self.cancel_token.cancel()


@dataclass(frozen=True)
class JobEvent:
    """What ``poll()`` saw happen: ``kind`` is progress, running, done, failed or cancelled."""

    job: Job
    kind: str


class Worker:
    """One persistent daemon thread running jobs in order; started on the first job."""

    def __init__(self, events: "queue.SimpleQueue[tuple[Job, str, Any]]") -> None:
        self._jobs: "queue.SimpleQueue[Optional[Job]]" = queue.SimpleQueue()
        self._events = events
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="TextSegment worker", daemon=True)
                self._thread.start()
        self._jobs.put(job)

    def shutdown(self, *, timeout: Optional[float] = None) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            thread.join(timeout)

    @property
    def thread(self) -> Optional[threading.Thread]:
        return self._thread

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._run(job)

    def _run(self, job: Job) -> None:
        post = self._events.put
        if job.cancel_token.cancelled:
            post((job, CANCELLED, None))
            return
        post((job, RUNNING, None))
        try:
            value = job.compute(lambda fraction, message="": post((job, "progress", (fraction, message))), job.cancel_token)
        except Cancelled:
            post((job, CANCELLED, None))
        except Exception as exc:  # noqa: BLE001 - handed to the main thread, which shows it
            post((job, FAILED, exc))
        else:
            post((job, "computed", value))
