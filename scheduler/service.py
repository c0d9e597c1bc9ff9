"""gRPC front door: diffserve.v1.GenerationService over grpc.aio, a thin layer on the FrontDoor
(frontdoor.py, shared with the HTTP API).

Every job belongs to the principal that submitted it (grpc_auth.current_principal()); a job of
another principal is answered exactly like a job that does not exist (NOT_FOUND), except for admin.
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf.message import DecodeError

from diffserve.v1 import generation_pb2 as pb
from diffserve.v1 import generation_pb2_grpc as pb_grpc

from diffserve.scheduler import errors
from diffserve.scheduler.frontdoor import FrontDoor
from diffserve.scheduler.grpc_auth import current_principal
from diffserve.scheduler.validation import timeout_seconds

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
    """Maps RPCs to FrontDoor calls and RequestErrors to google.rpc statuses."""

    def __init__(self, door: FrontDoor):
        self.door = door
        self.engine = door.engine

    async def SubmitJob(self, request: pb.SubmitJobRequest, context) -> pb.SubmitJobResponse:
        try:
            timeout = timeout_seconds(request.timeout) if request.HasField("timeout") else None
            job, created = await self.door.submit(request.params, current_principal(), client_request_id=request.client_request_id,
                                                  timeout_s=timeout, priority=_priority(request))
        except errors.RequestError as exc:
            await errors.abort(context, exc.status)
        return pb.SubmitJobResponse(job=self.door.proto(job), created=created)

    async def Generate(self, request: pb.GenerateRequest, context):
        try:
            job, created = await self.door.submit(request.params, current_principal(), client_request_id=request.client_request_id,
                                                  timeout_s=context.time_remaining(), priority=_priority(request))
        except errors.RequestError as exc:
            await errors.abort(context, exc.status)
        ended = False
        try:
            async for event in self.door.events(job):
                yield event
            ended = True
        finally:
            # The client went away or its deadline passed: the job was bound to this call. The
            # cancellation reaches this generator as CancelledError while it waits for an event,
            # but as GeneratorExit when it lands while grpc is sending one (then grpc drops the
            # generator and it is closed): both end here.
            if not ended:
                self.door.cancel_bound(job, created)

    async def StreamJobEvents(self, request: pb.StreamJobEventsRequest, context):
        try:
            job = self.door.job(request.job_id, current_principal())
        except errors.RequestError as exc:
            await errors.abort(context, exc.status)
        async for event in self.door.events(job):
            yield event

    async def GetJob(self, request: pb.GetJobRequest, context) -> pb.GetJobResponse:
        try:
            return pb.GetJobResponse(job=self.door.proto(self.door.job(request.job_id, current_principal())))
        except errors.RequestError as exc:
            await errors.abort(context, exc.status)

    async def CancelJob(self, request: pb.CancelJobRequest, context) -> pb.CancelJobResponse:
        try:
            job = self.door.job(request.job_id, current_principal())
        except errors.RequestError as exc:
            await errors.abort(context, exc.status)
        self.door.cancel(job, errors.cancelled("cancelled by CancelJob"))
        return pb.CancelJobResponse(job=self.door.proto(job))

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=self.engine.list_models())

    async def DownloadArtifact(self, request: pb.DownloadArtifactRequest, context):
        try:
            artifact = await self.door.artifact(request.artifact_id, current_principal())
        except errors.RequestError as exc:
            await errors.abort(context, exc.status)
        first = True
        try:
            async for chunk in self.door.artifact_bytes(artifact):
                reply = pb.DownloadArtifactResponse(data=chunk)
                if first:
                    reply.media_type = artifact.media_type
                    reply.total_bytes = artifact.size_bytes
                    reply.file_name = artifact.file_name
                    first = False
                yield reply
        except errors.RequestError as exc:
            await errors.abort(context, exc.status)
