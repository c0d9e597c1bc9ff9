"""The order of the queue: higher priority first, with aging, ties by submission time.

A queued job's effective priority is `priority + waited / aging_s`: it grows by 1 for every
`aging_s` seconds (`--priority-aging`, default 30) it has waited, so nothing starves: a job is
overtaken by later submissions for at most `(MAX_PRIORITY - priority) * aging_s` seconds. Among
equal effective priorities the earlier submission goes first; a requeued job keeps its original
submission time (Job.created), so it goes first among equals.

Since every job ages at the same rate, the order of two queued jobs never changes while they
wait: sorting by effective priority is sorting by the fixed key `created - priority * aging_s`
(the submission time, moved earlier by `aging_s` per point of priority). So the queue is a sorted
list: insert and remove cost a binary search and a list move, a position a binary search; nothing
is re-sorted as time passes. `aging_s = 0` means strict priorities (no aging: a steady stream of
higher priorities starves the lower ones).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from diffserve.scheduler.jobs import Job

DEFAULT_AGING_S = 30.0


class JobQueue:
    """Queued jobs in serving order (see the module docstring)."""

    def __init__(self, aging_s: float = DEFAULT_AGING_S):
        if not aging_s >= 0:
            raise ValueError(f"aging_s must be >= 0, got {aging_s}")
        self.aging_s = aging_s
        self._keys: list[tuple] = []
        self._jobs: list[Job] = []

    def key(self, job: Job) -> tuple:
        submitted = (job.created.seconds, job.created.nanos)
        if self.aging_s == 0:
            return (-job.priority, submitted, job.id)
        return (job.created.seconds + job.created.nanos * 1e-9 - job.priority * self.aging_s, submitted, job.id)

    def add(self, job: Job) -> int:
        """Inserts the job at its place; returns its 1-based position."""
        key = self.key(job)
        i = bisect.bisect_left(self._keys, key)
        self._keys.insert(i, key)
        self._jobs.insert(i, job)
        return i + 1

    append = add  # the deque this replaces: "append" puts a job at its place in the order too

    def index(self, job: Job) -> int:
        """0-based place of a queued job; ValueError when it is not queued."""
        i = bisect.bisect_left(self._keys, self.key(job))
        if i < len(self._jobs) and self._jobs[i] is job:
            return i
        raise ValueError(f"job {job.id} is not queued")

    def remove(self, job: Job) -> None:
        i = self.index(job)
        del self._keys[i], self._jobs[i]

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[Job]:
        return iter(self._jobs)

    def __contains__(self, job: Job) -> bool:
        try:
            self.index(job)
        except ValueError:
            return False
        return True
