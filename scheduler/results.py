"""Results → job events: what a worker's Result means for each job of the command, and saving.

Contract:
- `apply(worker_id, plan, result, frames)` moves every job of the finished command: a pending
  cancel ends it CANCELLED; a missing or failed RequestResult ends it FAILED with that status;
  otherwise STEP (denoising) or DONE (a stage). A decoded job leaves its worker (which frees it
  with its next command) and is saved on the scheduler's thread pool; the save ends it
  SUCCEEDED, FAILED (ARTIFACT_SAVE_FAILED) or, when a cancel arrived meanwhile, CANCELLED with
  the file deleted.
- `end(job, event, status)` ends a job now (CANCEL or FAIL) and releases it from its worker.
- `worker_lost(worker, status)` puts the jobs resident on a lost worker back in the queue
  (REQUEUE, via the `requeue` callback) while they have attempts left (`max_attempts`), and fails
  the others with `status` naming the attempts; a pending cancel ends its job CANCELLED; saving
  jobs were decoded already and finish.
A DECODE result must carry uint8 frames of exactly the job's (num_frames, height, width, 3);
anything else raises wire.ProtocolError before the job moves (the engine then drops the worker).
Result handling never blocks the event loop; the job store is written through Job.advance (store.py).
"""

from __future__ import annotations

import asyncio
import logging

from google.rpc import status_pb2

from diffserve.worker.v1 import worker_pb2 as wpb

from collections.abc import Callable

from diffserve.scheduler import errors
from diffserve.scheduler.artifacts import ArtifactStore
from diffserve.scheduler.jobs import Job
from diffserve.scheduler.lifecycle import Event, Phase
from diffserve.scheduler.policy import Plan
from diffserve.scheduler.registry import WorkerHandle, WorkerRegistry
from diffserve.scheduler.wire import ProtocolError, tensor_to_numpy

log = logging.getLogger(__name__)


class Results:
    """Owns the artifact saves in progress."""

    def __init__(self, registry: WorkerRegistry, artifacts: ArtifactStore, requeue: Callable[[Job], None], max_attempts: int = 2):
        self.registry = registry
        self.artifacts = artifacts
        self.requeue = requeue
        self.max_attempts = max_attempts
        self._tasks: set[asyncio.Task] = set()

    def apply(self, worker_id: str, plan: Plan, result: wpb.Result, frames: list) -> None:
        outcomes = {r.request_id: r for r in result.requests}
        for job in plan.jobs:
            outcome = outcomes.get(job.id)
            if job.done:
                continue
            if job.cancel_status is not None:
                self.end(job, Event.CANCEL, job.cancel_status)
            elif outcome is None:
                self.end(job, Event.FAIL, errors.internal(f"worker {worker_id} returned no result for the job"))
            elif outcome.status.code != 0:
                self.end(job, Event.FAIL, outcome.status)
            elif plan.phase is Phase.DENOISE:
                job.advance(Event.STEP, step_ms=result.elapsed_ms, batch_jobs=len(plan.jobs))
            elif plan.phase is Phase.DECODE:
                video = decoded_frames(job, outcome, frames)
                worker = self.registry.get(job.worker_id)
                job.advance(Event.DONE)
                if worker is not None:
                    worker.release(job.id)
                self._spawn(self._save(job, video))
            else:
                job.advance(Event.DONE)

    def end(self, job: Job, event: Event, status: status_pb2.Status) -> None:
        worker = self.registry.get(job.worker_id)
        job.advance(event, status=status)
        if worker is not None:
            worker.release(job.id)

    def worker_lost(self, worker: WorkerHandle, status: status_pb2.Status) -> None:
        for job in sorted(worker.jobs.values(), key=lambda j: j.admitted_at):
            if job.done or job.phase is Phase.SAVE:  # a saving job was decoded already: it finishes
                continue
            if job.cancel_status is not None:
                job.advance(Event.CANCEL)
            elif job.attempt < self.max_attempts:
                job.advance(Event.REQUEUE, reason=status.message)
                self.requeue(job)
            else:
                failed = status_pb2.Status()
                failed.CopyFrom(status)
                failed.message = f"{status.message} (attempt {job.attempt} of {self.max_attempts})"
                job.advance(Event.FAIL, status=failed)
        worker.jobs.clear()
        worker.take_finished()

    async def _save(self, job: Job, video) -> None:
        try:
            artifact = await asyncio.get_running_loop().run_in_executor(None, self.artifacts.save, job.id, video, job.params, job.principal)
        except Exception as exc:  # disk full, encoder missing: this job fails, the server goes on
            log.exception("saving the artifact of job %s failed", job.id)
            job.advance(Event.FAIL, status=errors.internal(f"saving the artifact failed: {exc}", "ARTIFACT_SAVE_FAILED"))
            return
        if job.cancel_status is not None:
            try:  # on a thread: the store may be remote (S3)
                await asyncio.get_running_loop().run_in_executor(None, self.artifacts.delete, artifact)
            except Exception:
                log.exception("deleting the artifact of cancelled job %s failed", job.id)
            job.advance(Event.CANCEL)
        else:
            job.advance(Event.DONE, artifact=artifact)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def decoded_frames(job: Job, outcome: wpb.RequestResult, frames: list):
    """The job's decoded video, (F, H, W, 3) uint8 as its request asked; ProtocolError otherwise."""
    if not outcome.HasField("frames"):
        raise ProtocolError(f"the DECODE result of job {job.id} carries no frames")
    video = tensor_to_numpy(outcome.frames, frames)
    p = job.params
    expected = (p.num_frames, p.height, p.width, 3)
    if video.dtype != "uint8" or video.shape != expected:
        raise ProtocolError(f"the DECODE result of job {job.id} is {video.dtype} {list(video.shape)}, not uint8 {list(expected)}")
    return video
