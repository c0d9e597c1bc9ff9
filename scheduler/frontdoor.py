"""What every front door shares (the gRPC service, service.py, and the HTTP API, http/): the
checked submit, the caller's job and artifact, a job's event stream, an artifact's bytes.

Each method takes the caller's Principal explicitly and raises errors.RequestError (a
google.rpc.Status); each front door maps that status onto its own protocol. A job or artifact of
another principal is answered exactly like one that does not exist (NOT_FOUND), except for admin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator

from diffserve.v1 import generation_pb2 as pb

from diffserve.scheduler import errors
from diffserve.scheduler.artifacts import ArtifactStoreError
from diffserve.scheduler.auth import Principal
from diffserve.scheduler.engine import Engine
from diffserve.scheduler.images import FETCH_POOL, ImagePolicy, resolve_images
from diffserve.scheduler.jobs import Job
from diffserve.scheduler.validation import check_request

log = logging.getLogger(__name__)


def store_unavailable() -> errors.RequestError:
    return errors.RequestError(errors.unavailable("the artifact store cannot be read now", "ARTIFACT_STORE_UNAVAILABLE"))


class FrontDoor:
    """The engine as callers see it: submits checked, jobs and artifacts by owner."""

    def __init__(self, engine: Engine, image_policy: ImagePolicy | None = None):
        self.engine = engine
        self.image_policy = image_policy or ImagePolicy()

    async def checked(self, params: pb.GenerationParams, client_request_id: str) -> pb.GenerationParams:
        """The submit path's order: bounds first (no I/O), then whether the model takes images at
        all, and only then the image fetches, on their own pool (images.FETCH_POOL, apart from
        the artifact saves) and stopped when this call ends."""
        check_request(params, client_request_id, self.engine.list_models() if params.images else None)
        if not params.images:
            return params
        # URLs on the fetch pool; bytes and paths (local, quick) on the default one, never queued
        # behind slow URLs.
        urls = sum(image.WhichOneof("source") == "url" for image in params.images)
        pool = FETCH_POOL if urls else None
        # Waiting for a fetch thread counts: the request's fetches end by timeout_s per URL from now.
        not_after = time.monotonic() + self.image_policy.timeout_s * max(1, urls)
        cancel = threading.Event()
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, resolve_images, params, self.image_policy, cancel, not_after)
        finally:
            cancel.set()  # the call was cancelled: stop the fetch under way

    async def submit(self, params: pb.GenerationParams, principal: Principal, *, client_request_id: str = "",
                     timeout_s: float | None = None, priority: int | None = None) -> tuple[Job, bool]:
        """A checked submit: (the job, whether it was created; False for an idempotent repeat)."""
        params = await self.checked(params, client_request_id)
        return self.engine.submit(params, client_request_id, timeout_s, principal.name, priority)

    def job(self, job_id: str, principal: Principal) -> Job:
        """The caller's job; NOT_FOUND also for a job of another principal (no existence leak)."""
        job = self.engine.get_job(job_id)
        if job is None or not principal.can_access(job.principal):
            raise errors.not_found("job", job_id)
        return job

    def jobs(self, principal: Principal) -> list[Job]:
        """The caller's jobs (every job for admin), oldest first."""
        return [job for job in self.engine.list_jobs() if principal.can_access(job.principal)]

    def proto(self, job: Job) -> pb.Job:
        return self.engine.job_proto(job)

    def cancel(self, job: Job, status=None) -> None:
        """Cancels at the next step (nothing happens to a finished job)."""
        self.engine.cancel(job, status if status is not None else errors.cancelled())

    def cancel_bound(self, job: Job, created: bool) -> None:
        """The call a job was bound to ended early (client gone, deadline): the job it created stops."""
        if created and not job.done:
            expired = job.deadline is not None and time.monotonic() >= job.deadline - 0.1
            self.engine.cancel(job, errors.deadline_exceeded("the call's deadline expired") if expired else errors.cancelled())

    @staticmethod
    async def events(job: Job) -> AsyncIterator[pb.JobEvent]:
        """Every event of the job from the first, then new ones as they happen, until it ends."""
        seen = 0
        while True:
            while seen < len(job.events):
                seen += 1
                yield job.events[seen - 1]
            if job.done:
                return
            await job.wait_change(seen)

    async def artifact(self, artifact_id: str, principal: Principal) -> pb.Artifact:
        """The caller's artifact: its job's, when this scheduler knows the job (the job must have
        SUCCEEDED); otherwise as the shared store describes it (a job of another scheduler, or one
        this scheduler has forgotten). Another principal's artifact is NOT_FOUND, exactly like a
        missing one, in both cases."""
        if self.engine.get_job(artifact_id) is not None:
            job = self.job(artifact_id, principal)
            if job.artifact is None or job.state != pb.JOB_STATE_SUCCEEDED:
                raise errors.failed_precondition(f"job {job.id} has no artifact (state {pb.JobState.Name(job.state)})", "NO_ARTIFACT")
            return job.artifact
        try:
            stored = await asyncio.get_running_loop().run_in_executor(None, self.engine.find_artifact, artifact_id)
        except ArtifactStoreError as exc:
            log.error("looking up artifact %r: %s", artifact_id, exc)
            raise store_unavailable() from None
        if stored is None or not principal.can_access(stored.principal):
            raise errors.not_found("job", artifact_id)
        return stored.artifact

    async def artifact_bytes(self, artifact: pb.Artifact) -> AsyncIterator[bytes]:
        """The artifact's bytes in chunks, read on a pool thread; RequestError (UNAVAILABLE) when
        the store fails. The store's file / connection is released when the iteration ends."""
        loop = asyncio.get_running_loop()
        chunks = self.engine.artifact_chunks(artifact)
        try:
            while True:
                try:
                    chunk = await loop.run_in_executor(None, next, chunks, None)
                except ArtifactStoreError as exc:
                    log.error("reading artifact %s: %s", artifact.id, exc)
                    raise store_unavailable() from None
                if chunk is None:
                    return
                yield chunk
        finally:
            with contextlib.suppress(ValueError):  # ValueError: still running on a pool thread (the caller went away); GC closes it
                chunks.close()  # releases the file / the S3 connection now
