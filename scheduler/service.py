"""gRPC front door: diffserve.v1.GenerationService over grpc.aio, a thin layer on the Engine.

Every job belongs to the principal that submitted it (grpc_auth.current_principal()); a job of
another principal is answered exactly like a job that does not exist (NOT_FOUND), except for admin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

import grpc
from google.protobuf.message import DecodeError

from diffserve.v1 import generation_pb2 as pb
from diffserve.v1 import generation_pb2_grpc as pb_grpc

from diffserve.scheduler import errors
from diffserve.scheduler.artifacts import ArtifactStoreError
from diffserve.scheduler.engine import Engine
from diffserve.scheduler.grpc_auth import current_principal
from diffserve.scheduler.images import FETCH_POOL, ImagePolicy, resolve_images
from diffserve.scheduler.jobs import Job
from diffserve.scheduler.validation import check_request, timeout_seconds

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["GenerationService"]


class MalformedRequest:
    """What a request body that does not parse deserializes to: the handler answers
    INVALID_ARGUMENT (grpc would answer UNKNOWN for a deserializer that raises)."""

    def __init__(self, why: str):
        self.why = why


def _deserializer(message_cls):
    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except (DecodeError, ValueError, RuntimeError) as exc:
            return MalformedRequest(f"the body is not a valid {message_cls.DESCRIPTOR.full_name}: {exc}")

    return parse


async def _refuse(context, request: MalformedRequest) -> None:
    await errors.abort(context, errors.invalid_argument([("request", request.why)]).status)


def _unary(behavior):
    async def handle(request, context):
        if isinstance(request, MalformedRequest):
            await _refuse(context, request)
        return await behavior(request, context)

    return handle


def _streaming(behavior):
    async def handle(request, context):
        if isinstance(request, MalformedRequest):
            await _refuse(context, request)
            return
        async for reply in behavior(request, context):
            yield reply

    return handle


def add_to_server(service: "GenerationService", server) -> None:
    """Registers `service` as the generated add_GenerationServiceServicer_to_server does, but a
    body that does not parse is answered INVALID_ARGUMENT naming the field "request"."""
    handlers = {}
    for method in SERVICE.methods:
        request_cls, reply_cls = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        behavior = getattr(service, method.name)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            (_streaming if method.server_streaming else _unary)(behavior),
            request_deserializer=_deserializer(request_cls),
            response_serializer=reply_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


def _priority(request: pb.SubmitJobRequest | pb.GenerateRequest) -> int | None:
    """The priority a request asks for; None when unset (the principal's default applies)."""
    return request.priority if request.HasField("priority") else None


class GenerationService(pb_grpc.GenerationServiceServicer):
    """Maps RPCs to Engine calls and RequestErrors to google.rpc statuses."""

    def __init__(self, engine: Engine, image_policy: ImagePolicy | None = None):
        self.engine = engine
        self.image_policy = image_policy or ImagePolicy()

    async def _checked(self, params: pb.GenerationParams, client_request_id: str) -> pb.GenerationParams:
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

    def _job(self, job_id: str) -> Job:
        """The caller's job; NOT_FOUND also for a job of another principal (no existence leak)."""
        job = self.engine.get_job(job_id)
        if job is None or not current_principal().can_access(job.principal):
            raise errors.not_found("job", job_id)
        return job

    def _proto(self, job: Job) -> pb.Job:
        return self.engine.job_proto(job)

    async def SubmitJob(self, request: pb.SubmitJobRequest, context) -> pb.SubmitJobResponse:
        try:
            timeout = timeout_seconds(request.timeout) if request.HasField("timeout") else None
            params = await self._checked(request.params, request.client_request_id)
            job, created = self.engine.submit(params, request.client_request_id, timeout, current_principal().name, _priority(request))
        except errors.RequestError as exc:
            await errors.abort(context, exc.status)
        return pb.SubmitJobResponse(job=self._proto(job), created=created)

    async def Generate(self, request: pb.GenerateRequest, context):
        try:
            params = await self._checked(request.params, request.client_request_id)
            job, created = self.engine.submit(params, request.client_request_id, context.time_remaining(), current_principal().name,
                                              _priority(request))
        except errors.RequestError as exc:
            await errors.abort(context, exc.status)
        try:
            async for event in self._events(job):
                yield event
        except asyncio.CancelledError:
            # The client went away or its deadline passed: the job was bound to this call.
            if created and not job.done:
                expired = job.deadline is not None and time.monotonic() >= job.deadline - 0.1
                self.engine.cancel(job, errors.deadline_exceeded("the call's deadline expired") if expired else errors.cancelled())
            raise

    async def StreamJobEvents(self, request: pb.StreamJobEventsRequest, context):
        try:
            job = self._job(request.job_id)
        except errors.RequestError as exc:
            await errors.abort(context, exc.status)
        async for event in self._events(job):
            yield event

    async def _events(self, job: Job):
        seen = 0
        while True:
            while seen < len(job.events):
                seen += 1
                yield job.events[seen - 1]
            if job.done:
                return
            await job.wait_change(seen)

    async def GetJob(self, request: pb.GetJobRequest, context) -> pb.GetJobResponse:
        try:
            return pb.GetJobResponse(job=self._proto(self._job(request.job_id)))
        except errors.RequestError as exc:
            await errors.abort(context, exc.status)

    async def CancelJob(self, request: pb.CancelJobRequest, context) -> pb.CancelJobResponse:
        try:
            job = self._job(request.job_id)
        except errors.RequestError as exc:
            await errors.abort(context, exc.status)
        self.engine.cancel(job, errors.cancelled("cancelled by CancelJob"))
        return pb.CancelJobResponse(job=self._proto(job))

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=self.engine.list_models())

    async def _artifact(self, artifact_id: str) -> pb.Artifact:
        """The caller's artifact: its job's, when this scheduler knows the job (the job must have
        SUCCEEDED); otherwise as the shared store describes it (a job of another scheduler, or one
        this scheduler has forgotten). Another principal's artifact is NOT_FOUND, exactly like a
        missing one, in both cases."""
        if self.engine.get_job(artifact_id) is not None:
            job = self._job(artifact_id)
            if job.artifact is None or job.state != pb.JOB_STATE_SUCCEEDED:
                raise errors.failed_precondition(f"job {job.id} has no artifact (state {pb.JobState.Name(job.state)})", "NO_ARTIFACT")
            return job.artifact
        try:
            stored = await asyncio.get_running_loop().run_in_executor(None, self.engine.find_artifact, artifact_id)
        except ArtifactStoreError as exc:
            log.error("looking up artifact %r: %s", artifact_id, exc)
            raise errors.RequestError(errors.unavailable("the artifact store cannot be read now", "ARTIFACT_STORE_UNAVAILABLE")) from None
        if stored is None or not current_principal().can_access(stored.principal):
            raise errors.not_found("job", artifact_id)
        return stored.artifact

    async def DownloadArtifact(self, request: pb.DownloadArtifactRequest, context):
        try:
            artifact = await self._artifact(request.artifact_id)
        except errors.RequestError as exc:
            await errors.abort(context, exc.status)
        loop = asyncio.get_running_loop()
        chunks = self.engine.artifact_chunks(artifact)
        first = True
        try:
            while True:
                try:
                    chunk = await loop.run_in_executor(None, next, chunks, None)
                except ArtifactStoreError as exc:
                    log.error("reading artifact %s: %s", artifact.id, exc)
                    await errors.abort(context, errors.unavailable("the artifact store cannot be read now", "ARTIFACT_STORE_UNAVAILABLE"))
                if chunk is None:
                    return
                reply = pb.DownloadArtifactResponse(data=chunk)
                if first:
                    reply.media_type = artifact.media_type
                    reply.total_bytes = artifact.size_bytes
                    reply.file_name = artifact.file_name
                    first = False
                yield reply
        finally:
            with contextlib.suppress(ValueError):  # ValueError: still running on a pool thread (the caller went away); GC closes it
                chunks.close()  # releases the file / the S3 connection now
