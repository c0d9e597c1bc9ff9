"""Admission: validate a request, queue it (bounded), and place queued jobs on workers.

Contract:
- `submit(...)` returns (job, created): the existing job for a client_request_id this principal
  used before (keys are per principal), else a new QUEUED job owned by the principal. It raises errors.RequestError when the server stops accepting, the request is
  invalid (BadRequest naming the field) or the queue is full (RESOURCE_EXHAUSTED + RetryInfo).
- The queue is in serving order (priorities.JobQueue): higher priority first, aged by the time
  waited (`aging_s`), ties by submission time. A job's priority is the request's, else its
  principal's default (auth.PriorityRule: the default is also the most a non-admin may ask for);
  one out of range or above the principal's cap is refused naming the field `priority`.
- `place()` moves queued jobs, in queue order, to a worker with room (registry.place); each gets
  ADMIT and its worker an `Admit`, sent before anything else of the job, so the worker knows
  the request before its first stage. Jobs no worker can take stay queued, in order.
- `requeue(job)` puts a job that went back to QUEUED (Event.REQUEUE) into the queue again at its
  place by its original submission time, so ahead of every job of its priority submitted after it
  (the bound does not apply: an accepted job is never dropped).
- `restore(jobs)` queues jobs reloaded from the store (all QUEUED, in submission order) again.
- `withdraw(job, status)` cancels a queued job. Every change of the queue re-announces a job's
  position when it moved to another band (`position_band`: each of 1-10, then 11-20, 21-50,
  51-100, 101-200, 201-500, ...), not on every move: a long queue costs O(n log n) events, not
  O(n²). The exact position is always in GetJob (Job.queue_position).
Quotas per principal land here.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from google.rpc import status_pb2

from diffserve.v1 import generation_pb2 as pb
from diffserve.worker.v1 import worker_pb2 as wpb

from diffserve.scheduler import errors
from diffserve.scheduler.auth import ANONYMOUS_NAME, PriorityRefused, PriorityRule
from diffserve.scheduler.jobs import Job, JobTable
from diffserve.scheduler.lifecycle import Event, Phase
from diffserve.scheduler.priorities import DEFAULT_AGING_S, JobQueue
from diffserve.scheduler.registry import WorkerRegistry
from diffserve.scheduler.requests import worker_request
from diffserve.scheduler.validation import check_priority, resolve_params

if TYPE_CHECKING:  # the link is the only part that needs sockets; unit tests pass a fake
    from diffserve.scheduler.workers import WorkerLink


class Admission:
    """Owns the queue of jobs not yet on a worker, and whether new jobs are accepted."""

    def __init__(self, jobs: JobTable, registry: WorkerRegistry, link: WorkerLink, max_queue: int, retry_after_s: float,
                 priorities: PriorityRule | None = None, aging_s: float = DEFAULT_AGING_S):
        self.jobs = jobs
        self.registry = registry
        self.link = link
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.accepting = True
        self.priorities = priorities or PriorityRule()
        self._queue = JobQueue(aging_s)

    def __len__(self) -> int:
        return len(self._queue)

    def submit(self, params: pb.GenerationParams, client_request_id: str = "", timeout_s: float | None = None,
               principal: str = ANONYMOUS_NAME, priority: int | None = None) -> tuple[Job, bool]:
        if client_request_id:
            existing = self.jobs.by_client_id(principal, client_request_id)
            if existing is not None:
                return existing, False
        if not self.accepting:
            raise errors.RequestError(errors.unavailable("the server is shutting down", "SHUTTING_DOWN"))
        priority = self._priority(principal, priority)
        model = self.registry.model_for(params.model)
        resolved = resolve_params(params, model)
        if len(self._queue) >= self.max_queue:
            raise errors.resource_exhausted(f"the queue is full ({self.max_queue} jobs waiting)", self.retry_after_s)
        job = Job(params=resolved, client_request_id=client_request_id, principal=principal, priority=priority)
        if timeout_s:
            job.deadline = time.monotonic() + timeout_s
        self.jobs.add(job)
        position = self._queue.add(job)
        job.emit(queued=pb.Queued(position=position))
        if position < len(self._queue):  # it went ahead of others: their positions changed
            self._announce_positions()
        return job, True

    def _priority(self, principal: str, requested: int | None) -> int:
        if requested is not None:
            check_priority(requested)
        try:
            return check_priority(self.priorities.resolve(principal, requested))
        except PriorityRefused as exc:
            raise errors.invalid_argument([("priority", str(exc))]) from None

    def position(self, job: Job) -> int:
        """1-based place in the queue; 0 when the job is not queued."""
        if job.phase is not Phase.QUEUED:
            return 0
        return self._queue.index(job) + 1

    def requeue(self, job: Job) -> None:
        self._queue.add(job)
        self._announce_positions()

    def withdraw(self, job: Job, status: status_pb2.Status) -> None:
        self._queue.remove(job)
        job.advance(Event.CANCEL, status=status)
        self._announce_positions()

    async def place(self) -> None:
        admitted = False
        for job in list(self._queue):
            if not self.registry.any_room():  # a deep queue costs nothing while every worker is full
                break
            worker = self.registry.place(job)
            if worker is None:
                continue
            self._queue.remove(job)
            job.advance(Event.ADMIT, worker_id=worker.id)
            worker.admit(job)
            # Awaited, not spawned: the worker must see Admit before the job's first stage command.
            admit = wpb.Admit(request_id=job.id, request=worker_request(job.params, self.registry.model(job.params.model)))
            await self.link.send(worker.id, wpb.Command(admit=admit))
            admitted = True
        if admitted:
            self._announce_positions()

    def restore(self, jobs: list[Job]) -> None:
        """Jobs reloaded from the store, QUEUED, oldest submission first: queued again in that order
        (the bound does not apply: they were accepted)."""
        for job in jobs:
            self._queue.add(job)
        self._announce_positions()

    def _announce_positions(self) -> None:
        for position, job in enumerate(self._queue, start=1):
            last = job.events[-1] if job.events else None
            if last is None or last.WhichOneof("event") != "queued" or position_band(last.queued.position) != position_band(position):
                job.emit(queued=pb.Queued(position=position))


def position_band(position: int) -> int:
    """The band of a queue position, named by its last position: 1-10 each their own, then
    11-20, 21-50, 51-100, 101-200, 201-500, 501-1000, ... (1-2-5 steps). A `queued` event is sent
    when a job's position enters another band."""
    if position <= 10:
        return position
    bound = 10
    while True:
        for factor in (2, 5, 10):
            if position <= bound * factor:
                return bound * factor
        bound *= 10

