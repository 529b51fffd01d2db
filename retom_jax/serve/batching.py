"""Request batching: jobs that share their static settings (``Job.group``) are gathered,
up to ``max_batch`` images and ``max_wait`` seconds after the oldest one arrived, into one
call of a runner; jobs whose group is None run alone.

One worker thread makes every call (the accelerator runs one program at a time anyway),
so the event loop serving HTTP never blocks on the model. A call that raises is retried
job by job, so a request that fails inside the model fails alone. ``close`` stops taking
jobs and, with ``drain``, finishes the ones queued first.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import threading
import time
from typing import Any, Callable, Optional

__all__ = ["Job", "Batcher", "ShuttingDown"]

_ids = itertools.count(1)


class ShuttingDown(RuntimeError):
    """The batcher takes no more jobs (the server is stopping)."""


@dataclasses.dataclass(eq=False)
class Job:
    """One request: ``rows`` images in ``group`` (hashable; None: never batched) and the
    ``payload`` the runner reads. ``state``: queued, running, done, failed."""
    group: Any
    rows: int
    payload: Any
    id: str = dataclasses.field(default_factory=lambda: f"job-{next(_ids)}")
    future: concurrent.futures.Future = dataclasses.field(
        default_factory=concurrent.futures.Future)
    created: float = dataclasses.field(default_factory=time.monotonic)
    started: Optional[float] = None
    finished: Optional[float] = None
    expected_s: Optional[float] = None  # how long its call should take (earlier calls)
    batch_rows: int = 0                  # images in the call it ran in (padding excluded)

    @property
    def state(self) -> str:
        if self.future.done():
            return "failed" if self.future.exception() is not None else "done"
        return "running" if self.started is not None else "queued"


class Batcher:
    """``run(jobs) -> list of results`` (one per job, in order) is called from one worker
    thread with jobs of one group whose rows add up to at most ``max_batch``.
    ``estimate(jobs) -> seconds or None`` gives a call's expected duration (progress)."""

    def __init__(self, run: Callable, max_batch: int = 8, max_wait: float = 0.05,
                 estimate: Callable | None = None):
        if max_batch < 1 or max_wait < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait >= 0, got {max_batch}, "
                             f"{max_wait}")
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait
        self.estimate = estimate
        self.pending: list[Job] = []
        self.cond = threading.Condition()
        self.closing = False
        self.calls = 0          # calls of ``run`` (batches)
        self.completed = 0      # jobs answered
        self.thread = threading.Thread(target=self._loop, name="retom-jax-batcher",
                                       daemon=True)
        self.thread.start()

    # -- the caller's side

    def submit(self, job: Job) -> Job:
        if job.rows > self.max_batch:
            raise ValueError(f"a job of {job.rows} images is larger than the batch limit "
                             f"{self.max_batch}")
        with self.cond:
            if self.closing:
                raise ShuttingDown("the server is shutting down: no new requests")
            self.pending.append(job)
            self.cond.notify_all()
        return job

    def queue_position(self, job: Job) -> int:
        with self.cond:
            try:
                return self.pending.index(job)
            except ValueError:
                return 0

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take no more jobs; ``drain``: run the queued ones first, else fail them."""
        with self.cond:
            self.closing = True
            if not drain:
                for job in self.pending:
                    job.future.set_exception(ShuttingDown("the server stopped"))
                self.pending.clear()
            self.cond.notify_all()
        self.thread.join(timeout)

    # -- the worker

    def _take(self) -> list[Job] | None:
        """The next call's jobs (the oldest job and those of its group that fit), waiting
        up to ``max_wait`` after the oldest arrived for more; None once closed and empty."""
        with self.cond:
            while not self.pending:
                if self.closing:
                    return None
                self.cond.wait()
            first = self.pending[0]
            if first.group is None:
                return [self.pending.pop(0)]
            deadline = first.created + self.max_wait
            while True:
                chosen, rows = [], 0
                for job in self.pending:
                    if job.group == first.group and rows + job.rows <= self.max_batch:
                        chosen.append(job)
                        rows += job.rows
                left = deadline - time.monotonic()
                if rows >= self.max_batch or left <= 0 or self.closing:
                    break
                self.cond.wait(left)
            for job in chosen:
                self.pending.remove(job)
            return chosen

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            self._call(jobs)

    def _call(self, jobs: list[Job]) -> None:
        now = time.monotonic()
        expected = self.estimate(jobs) if self.estimate is not None else None
        rows = sum(j.rows for j in jobs)
        for job in jobs:
            job.started, job.expected_s, job.batch_rows = now, expected, rows
        self.calls += 1
        try:
            results = self.run(jobs)
        except BaseException as e:  # noqa: BLE001 - answered to the request(s)
            if len(jobs) > 1:  # find the job that fails: each again, alone
                for job in jobs:
                    self._call([job])
                return
            results = [e]
        for job, result in zip(jobs, results):
            job.finished = time.monotonic()
            self.completed += 1
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)
