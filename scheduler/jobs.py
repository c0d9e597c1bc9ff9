"""Jobs: one request's state on the scheduler, its event log, and the table that holds them all.

A job moves QUEUED → RUNNING → SUCCEEDED | FAILED | CANCELLED. While RUNNING its `next_stage` says
which command it needs next from its worker (ENCODE, PREPARE, DENOISE, DECODE, then SAVE on the
scheduler). Every transition appends a JobEvent; subscribers replay the log and wait for more.
"""

from __future__ import annotations

import asyncio
import enum
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from google.protobuf import timestamp_pb2
from google.rpc import status_pb2

from diffserve.v1 import generation_pb2 as pb

TERMINAL = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)


class Pending(enum.Enum):
    """Why a running job cannot take part in the next command."""

    NONE = 0  # ready for its next stage
    IN_FLIGHT = 1  # part of the command its worker is running
    SAVING = 2  # artifact being written on the scheduler


def now_timestamp() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


@dataclass(eq=False)
class Job:
    """One generation request: its resolved parameters, progress, outcome and event log."""

    params: pb.GenerationParams
    client_request_id: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: int = pb.JOB_STATE_QUEUED
    next_stage: int = pb.STAGE_ENCODE
    step: int = 0
    deadline: float | None = None  # time.monotonic() after which the job is cancelled
    worker_id: str | None = None
    pending: Pending = Pending.NONE
    cancel_status: status_pb2.Status | None = None  # set when a cancel waits for the step boundary
    artifact: pb.Artifact | None = None
    error: status_pb2.Status | None = None
    created: timestamp_pb2.Timestamp = field(default_factory=now_timestamp)
    started: timestamp_pb2.Timestamp | None = None
    ended: timestamp_pb2.Timestamp | None = None
    admitted_at: float = 0.0
    events: list[pb.JobEvent] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def total_steps(self) -> int:
        return self.params.num_inference_steps

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    @property
    def shape_key(self) -> tuple[int, int, int]:
        """Jobs with equal keys have equal latent shapes and can share a denoising step."""
        return (self.params.height, self.params.width, self.params.num_frames)

    def emit(self, **event) -> None:
        """Appends an event (one of JobEvent's oneof fields as a keyword) and wakes subscribers."""
        self.events.append(pb.JobEvent(job_id=self.id, sequence=len(self.events) + 1, time=now_timestamp(), **event))
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_change(self, seen: int, timeout: float | None = None) -> None:
        """Returns once the log holds more than `seen` events or the job ended."""
        if len(self.events) > seen or self.done:
            return
        changed = self._changed
        try:
            await asyncio.wait_for(changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def finish(self, state: int, error: status_pb2.Status | None = None) -> None:
        self.state = state
        self.error = error
        self.ended = now_timestamp()
        self.pending = Pending.NONE
        if state == pb.JOB_STATE_SUCCEEDED:
            self.emit(completed=pb.Completed(artifact=self.artifact))
        elif state == pb.JOB_STATE_FAILED:
            self.emit(failed=pb.Failed(status=error))
        else:
            self.emit(cancelled=pb.Cancelled(status=error))

    def to_proto(self, queue_position: int = 0) -> pb.Job:
        job = pb.Job(
            id=self.id,
            client_request_id=self.client_request_id,
            state=self.state,
            params=self.params,
            stage=self.next_stage if self.state == pb.JOB_STATE_RUNNING else pb.STAGE_UNSPECIFIED,
            step=self.step,
            total_steps=self.total_steps,
            queue_position=queue_position,
            create_time=self.created,
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


class JobTable:
    """All jobs by id and by client request id; forgets the oldest finished jobs past `max_finished`."""

    def __init__(self, max_finished: int = 10_000):
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._by_client_id: dict[str, str] = {}
        self._max_finished = max_finished

    def add(self, job: Job) -> None:
        self._jobs[job.id] = job
        if job.client_request_id:
            self._by_client_id[job.client_request_id] = job.id
        self._evict()

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def by_client_id(self, client_request_id: str) -> Job | None:
        job_id = self._by_client_id.get(client_request_id)
        return self._jobs.get(job_id) if job_id else None

    def __iter__(self):
        return iter(list(self._jobs.values()))

    def _evict(self) -> None:
        finished = [j for j in self._jobs.values() if j.done]
        for job in finished[: max(0, len(finished) - self._max_finished)]:
            del self._jobs[job.id]
            self._by_client_id.pop(job.client_request_id, None)


def monotonic() -> float:
    return time.monotonic()
