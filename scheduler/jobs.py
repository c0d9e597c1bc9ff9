"""Jobs: one request's state on the scheduler, its event log, and the table that holds them all.

A job's place in its life is one `Phase` (lifecycle.py), moved only by `Job.advance(event)`,
which checks the move against lifecycle.TRANSITIONS and appends the public JobEvent it implies.
Every transition a client sees is an event; subscribers replay the log and wait for more.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from google.protobuf import timestamp_pb2
from google.rpc import status_pb2

from diffserve.v1 import generation_pb2 as pb

from diffserve.scheduler import errors, joblog
from diffserve.scheduler.auth import ANONYMOUS_NAME
from diffserve.scheduler.lifecycle import Event, IllegalTransition, Phase, next_phase


def now_timestamp() -> timestamp_pb2.Timestamp:
    # Not Timestamp.GetCurrentTime(): it goes through datetime (~15 µs; one per step event).
    seconds, nanos = divmod(time.time_ns(), 1_000_000_000)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


@dataclass(eq=False)
class Job:
    """One generation request: its resolved parameters, phase, progress, outcome and event log.

    Read any field; write the lifecycle fields (phase, step, worker_id, in_flight, cancel_status,
    artifact, error, started, ended, attempt) only through `advance`."""

    params: pb.GenerationParams
    client_request_id: str = ""
    principal: str = ANONYMOUS_NAME  # who submitted it: only they (and admin) may see it (auth.Principal)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    phase: Phase = Phase.QUEUED
    step: int = 0  # denoising steps done
    deadline: float | None = None  # time.monotonic() after which the job is cancelled
    worker_id: str | None = None  # the worker holding its state, from ADMIT until it leaves it
    in_flight: bool = False  # part of the command its worker is running
    cancel_status: status_pb2.Status | None = None  # a cancel waiting for the step boundary
    artifact: pb.Artifact | None = None
    error: status_pb2.Status | None = None
    created: timestamp_pb2.Timestamp = field(default_factory=now_timestamp)
    started: timestamp_pb2.Timestamp | None = None
    ended: timestamp_pb2.Timestamp | None = None
    admitted_at: float = 0.0
    priority: int = 0  # higher is served sooner (the request's, else its principal's default)
    attempt: int = 1  # 1 + the times it went back to the queue (Event.REQUEUE)
    events: list[pb.JobEvent] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _waiting: int = 0  # wait_change calls waiting on _changed
    # Called after every phase change (and a cancel that waits) with (job, before, event): the
    # JobTable's write-through and its observer (metrics).
    on_change: Callable[[Job, Phase, Event], None] | None = field(default=None, repr=False)

    @property
    def total_steps(self) -> int:
        return self.params.num_inference_steps

    @property
    def state(self) -> int:
        """The public JobState (lifecycle.Phase.job_state)."""
        return self.phase.job_state

    @property
    def done(self) -> bool:
        return self.phase.terminal

    @property
    def busy(self) -> bool:
        """Inside a running command or being saved: a cancel waits for the step boundary."""
        return self.in_flight or self.phase is Phase.SAVE

    @functools.cached_property
    def shape_key(self) -> tuple[int, int, int]:
        """Jobs with equal keys have equal latent shapes and can share a denoising step (read
        once: the resolved params never change, and protobuf field reads are not free)."""
        return (self.params.height, self.params.width, self.params.num_frames)

    def advance(
        self,
        event: Event,
        *,
        worker_id: str | None = None,
        status: status_pb2.Status | None = None,
        artifact: pb.Artifact | None = None,
        step_ms: float = 0.0,
        batch_jobs: int = 0,
        reason: str = "",
    ) -> Phase:
        """Applies one lifecycle event; returns the new phase. Raises IllegalTransition for an
        event the phase does not allow (lifecycle.TRANSITIONS), leaving the job unchanged.

        ADMIT takes the worker_id; STEP the step's time and batch size; SAVE's DONE the
        artifact; CANCEL_LATER, CANCEL and FAIL the status (CANCEL defaults to the one that
        CANCEL_LATER recorded); REQUEUE the reason its `restarted` event gives."""
        before = self.phase
        # The two events of every denoising step, checked and applied first (the scheduler's hot
        # path: a step command moves each of its jobs twice).
        if before is Phase.DENOISE and self.step > 0 and event is Event.DISPATCH and not self.in_flight:
            self.in_flight = True
            return before
        if before is Phase.DENOISE and event is Event.STEP and self.in_flight and self.step + 1 < self.total_steps:
            self.in_flight = False
            self.step += 1
            self.emit(step_completed=pb.StepCompleted(step=self.step, total_steps=self.total_steps, step_ms=step_ms, batch_jobs=batch_jobs))
            return before
        target = next_phase(self.phase, event)
        if event is Event.DISPATCH and self.in_flight:
            raise IllegalTransition(f"job {self.id} is already in a command")
        if event is Event.CANCEL_LATER and not self.busy:
            raise IllegalTransition(f"job {self.id} is between commands: cancel it now")
        if event in (Event.STEP, Event.DONE) and self.phase.on_worker and not self.in_flight:
            raise IllegalTransition(f"{event.name} for job {self.id}, which is in no command")
        if event is Event.DONE and self.phase is Phase.DENOISE and self.step < self.total_steps:
            raise IllegalTransition(f"job {self.id} has {self.total_steps - self.step} steps left")
        if event is Event.REQUEUE and self.cancel_status is not None:
            raise IllegalTransition(f"job {self.id} has a cancel pending: cancel it instead")

        if event is Event.ADMIT:
            self.worker_id = worker_id
            self.started = now_timestamp()
            self.admitted_at = time.monotonic()
        elif event is Event.DISPATCH:
            self.in_flight = True
            if self.phase is not Phase.DENOISE or self.step == 0:
                self.emit(stage_started=pb.StageStarted(stage=self.phase.stage))
        elif event is Event.STEP:
            self.in_flight = False
            self.step += 1
            self.emit(step_completed=pb.StepCompleted(step=self.step, total_steps=self.total_steps, step_ms=step_ms, batch_jobs=batch_jobs))
            if self.step >= self.total_steps:
                target = next_phase(Phase.DENOISE, Event.DONE)
        elif event is Event.DONE:
            self.in_flight = False
            if target is Phase.SAVE:  # decoded: the worker holds nothing of the job any more
                self.worker_id = None
                self.emit(stage_started=pb.StageStarted(stage=pb.STAGE_SAVE))
            elif target is Phase.SUCCEEDED:
                self.artifact = artifact
        elif event is Event.CANCEL_LATER:
            self.cancel_status = status
        elif event is Event.REQUEUE:
            self.in_flight = False
            self.worker_id = None
            self.step = 0
            self.started = None
            self.admitted_at = 0.0
            self.attempt += 1
            self.emit(restarted=pb.Restarted(attempt=self.attempt, reason=reason))
        self.phase = target
        if target.terminal:
            if event is Event.CANCEL and status is None:  # the cancel that waited for the boundary
                status = self.cancel_status
            self._finish(status)
        if target is not before or event is Event.CANCEL_LATER:
            if self.on_change is not None:
                self.on_change(self, before, event)
            joblog.changed(self, before, event)  # one INFO line for the changes that matter
        return target

    def _finish(self, error: status_pb2.Status | None) -> None:
        self.error = error
        self.ended = now_timestamp()
        self.in_flight = False
        self.worker_id = None
        if self.phase is Phase.SUCCEEDED:
            self.emit(completed=pb.Completed(artifact=self.artifact))
        elif self.phase is Phase.FAILED:
            self.emit(failed=pb.Failed(status=error))
        else:
            self.emit(cancelled=pb.Cancelled(status=error))

    def emit(self, **event) -> None:
        """Appends an event (one of JobEvent's oneof fields as a keyword) and wakes subscribers."""
        self.events.append(pb.JobEvent(job_id=self.id, sequence=len(self.events) + 1, time=now_timestamp(), **event))
        if self._waiting:  # nobody waits on most jobs most of the time: no new Event per step then
            self._changed.set()
            self._changed = asyncio.Event()

    async def wait_change(self, seen: int, timeout: float | None = None) -> None:
        """Returns once the log holds more than `seen` events or the job ended."""
        if len(self.events) > seen or self.done:
            return
        changed = self._changed
        self._waiting += 1
        try:
            await asyncio.wait_for(changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            self._waiting -= 1

    def to_proto(self, queue_position: int = 0) -> pb.Job:
        job = pb.Job(
            id=self.id,
            client_request_id=self.client_request_id,
            state=self.phase.job_state,
            params=self.params,
            stage=self.phase.stage,
            step=self.step,
            total_steps=self.total_steps,
            queue_position=queue_position,
            create_time=self.created,
            priority=self.priority,
            attempt=self.attempt,
        )
        if self.started is not None:
            job.start_time.CopyFrom(self.started)
        if self.ended is not None:
            job.end_time.CopyFrom(self.ended)
        if self.artifact is not None:
            job.artifact.CopyFrom(self.artifact)
        if self.error is not None:
            job.error.CopyFrom(self.error)
        return job


class StoreError(RuntimeError):
    """The job store cannot be used; the message names the file and what to do (raised by store.py)."""


class JobTable:
    """All jobs by id and by (principal, client request id), their write-through to the durable
    store (when one is attached), and retention. Idempotency keys are per principal: two callers'
    "job-1" are two jobs.

    Retention: finished jobs beyond `max_finished` (oldest finished first), and finished jobs that
    ended more than `ttl_s` ago, are dropped: from the table, from the store, and `on_drop(job)`
    (the engine deletes the artifact; after the store's commit).

    `observer` (metrics.Metrics) hears of every new job (`submitted(job)`) and phase change
    (`changed(job, before, event)`), beside the job log."""

    def __init__(self, max_finished: int = 10_000, ttl_s: float | None = None, on_drop: Callable[[Job], None] | None = None,
                 observer=None):
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._by_client_id: dict[tuple[str, str], str] = {}
        self._finished: OrderedDict[str, Job] = OrderedDict()  # in the order they ended
        self._max_finished = max_finished
        self._ttl_s = ttl_s
        self._on_drop = on_drop
        self.observer = observer
        self.store = None  # store.JobStore, once attached

    def attach(self, store) -> None:
        """Writes every job through to `store` (store.JobStore) from now on."""
        self.store = store

    def add(self, job: Job) -> None:
        """A new job: on disk (with a store) before this returns; errors.RequestError (UNAVAILABLE)
        when it cannot be written."""
        self._index(job)
        if self.store is not None:
            self.store.save(job)
            try:
                self.store.flush()
            except StoreError as exc:  # not durable: the client is told, nothing is kept
                self.store.discard(job.id)
                self._unindex(job)
                raise errors.RequestError(errors.unavailable(f"the job was not accepted: {exc}", "STORE_UNAVAILABLE")) from None
        joblog.submitted(job)
        if self.observer is not None:
            self.observer.submitted(job)
        if job.done:
            self._ended(job)

    def restore(self, jobs: list[Job]) -> None:
        """Jobs loaded from the store (submission order): indexed, not written again."""
        for job in jobs:
            self._index(job)
        for job in sorted((j for j in jobs if j.done), key=lambda j: (j.ended.seconds, j.ended.nanos) if j.ended else (0, 0)):
            self._finished[job.id] = job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def by_client_id(self, principal: str, client_request_id: str) -> Job | None:
        """The job `principal` submitted with this key, if it is still in the table."""
        job_id = self._by_client_id.get((principal, client_request_id))
        return self._jobs.get(job_id) if job_id else None

    def __iter__(self):
        return iter(list(self._jobs.values()))

    def __len__(self) -> int:
        return len(self._jobs)

    def evict(self, now: float | None = None) -> list[Job]:
        """Drops the finished jobs past the retention limits (`now`: time.time()); returns them."""
        dropped = []
        while len(self._finished) > self._max_finished:
            dropped.append(self._finished.popitem(last=False)[1])
        if self._ttl_s is not None and self._finished:
            cutoff = (time.time() if now is None else now) - self._ttl_s
            while self._finished:
                oldest = next(iter(self._finished.values()))
                if oldest.ended is not None and oldest.ended.seconds + oldest.ended.nanos / 1e9 >= cutoff:
                    break
                dropped.append(self._finished.popitem(last=False)[1])
        for job in dropped:
            self._drop(job)
        return dropped

    def remove(self, job: Job) -> None:
        """Drops a finished job now (its client deleted it), as retention would: from the table,
        from the store, and on_drop(job)."""
        if not job.done:
            raise ValueError(f"job {job.id} has not ended: cancel it first")
        if self._jobs.get(job.id) is job:
            self._drop(job)

    def _index(self, job: Job) -> None:
        self._jobs[job.id] = job
        if job.client_request_id:
            self._by_client_id[(job.principal, job.client_request_id)] = job.id
        job.on_change = self._changed

    def _unindex(self, job: Job) -> None:
        self._jobs.pop(job.id, None)
        self._finished.pop(job.id, None)
        if self._by_client_id.get((job.principal, job.client_request_id)) == job.id:
            del self._by_client_id[(job.principal, job.client_request_id)]
        job.on_change = None

    def _changed(self, job: Job, before: Phase, event: Event) -> None:
        if self.store is not None:
            self.store.save(job)
        if self.observer is not None:
            self.observer.changed(job, before, event)
        if job.done:
            self._ended(job)

    def _ended(self, job: Job) -> None:
        self._finished[job.id] = job
        if len(self._finished) > self._max_finished:
            self.evict()

    def _drop(self, job: Job) -> None:
        self._unindex(job)
        then = (lambda: self._on_drop(job)) if self._on_drop is not None else None
        if self.store is not None:
            self.store.delete(job.id, then)
        elif then is not None:
            then()
