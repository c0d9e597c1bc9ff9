"""diffserve's own job endpoints (the gRPC API's JSON form), and the job plumbing every HTTP
router shares: a checked submit, waiting for a job while watching the client, an artifact's bytes.

    POST   /v1/jobs                 SubmitJobRequest as proto3 JSON → 201 {"job": {...}, "created": true}
    GET    /v1/jobs                 the caller's jobs (all for admin), newest first
    GET    /v1/jobs/{id}            Job
    DELETE /v1/jobs/{id}            cancels at the next step → Job
    GET    /v1/jobs/{id}/events     Server-Sent Events (sse.py), the same events as StreamJobEvents
    GET    /v1/jobs/{id}/content    the artifact's bytes (its media type; 409 NO_ARTIFACT before it exists)

Jobs are the engine's (FrontDoor): the same ids, owners and lifecycle whichever API submitted them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from google.protobuf import json_format

from diffserve.v1 import generation_pb2 as pb

from diffserve.scheduler import errors
from diffserve.scheduler.auth import Principal
from diffserve.scheduler.frontdoor import FrontDoor
from diffserve.scheduler.http import sse
from diffserve.scheduler.http.auth import caller
from diffserve.scheduler.http.errors import HttpError, bad_request, from_request_error, from_status
from diffserve.scheduler.jobs import Job
from diffserve.scheduler.validation import timeout_seconds

router = APIRouter()

# How often a synchronous call looks whether its client is still there.
DISCONNECT_POLL_S = 0.5


def door_of(request: Request) -> FrontDoor:
    return request.app.state.door


def job_dict(door: FrontDoor, job: Job) -> dict:
    return json_format.MessageToDict(door.proto(job), preserving_proto_field_name=True)


def owned_job(request: Request, job_id: str, principal: Principal) -> Job:
    """The caller's job or 404 (also for another principal's: no existence leak)."""
    try:
        return door_of(request).job(job_id, principal)
    except errors.RequestError as exc:
        raise from_request_error(exc) from None


async def submit(request: Request, params: pb.GenerationParams, principal: Principal, *, client_request_id: str = "",
                 timeout_s: float | None = None, priority: int | None = None, fields: Mapping[str, str] | None = None) -> tuple[Job, bool]:
    """FrontDoor.submit with its errors as HTTP errors; `fields` names the gRPC fields as the
    endpoint does (params.width → size) in a 400's `param`."""
    door = door_of(request)
    try:
        return await door.submit(params, principal, client_request_id=client_request_id, timeout_s=timeout_s, priority=priority)
    except errors.RequestError as exc:
        raise from_request_error(exc, fields, door.engine.config.retry_after_s) from None


async def wait_done(request: Request, job: Job, created: bool) -> None:
    """Waits until `job` ends. A client that goes away (or a call cancelled by the server's stop)
    cancels the job this call created, at its next step."""
    door = door_of(request)
    try:
        while not job.done:
            await job.wait_change(len(job.events), timeout=DISCONNECT_POLL_S)
            if not job.done and await request.is_disconnected():
                door.cancel_bound(job, created)
                return
    except asyncio.CancelledError:
        door.cancel_bound(job, created)
        raise


def job_failure(job: Job) -> HttpError:
    """The HttpError for a job that ended without an artifact (failed, cancelled: its status)."""
    return from_status(job.error if job.error is not None else errors.internal(f"job {job.id} ended without an artifact"))


async def artifact_response(request: Request, artifact: pb.Artifact, *, download_name: str = "") -> StreamingResponse:
    """The artifact's bytes, streamed from the store with its media type and size."""
    door = door_of(request)
    chunks = door.artifact_bytes(artifact)
    try:  # the first chunk before the status line: a store that cannot be read is a 503, not a cut stream
        first = await anext(chunks, b"")
    except errors.RequestError as exc:
        raise from_request_error(exc) from None

    async def body():
        yield first
        try:
            async for chunk in chunks:
                yield chunk
        except errors.RequestError:
            return  # the status line is out: the short body (Content-Length) tells the client

    headers = {"Content-Length": str(artifact.size_bytes)}
    name = download_name or artifact.file_name
    if name:
        headers["Content-Disposition"] = f'inline; filename="{name}"'
    return StreamingResponse(body(), media_type=artifact.media_type or "application/octet-stream", headers=headers)


async def job_artifact(request: Request, job_id: str, principal: Principal) -> pb.Artifact:
    try:
        return await door_of(request).artifact(job_id, principal)
    except errors.RequestError as exc:
        raise from_request_error(exc) from None


@router.post("/v1/jobs", status_code=201)
async def create_job(request: Request, response: Response, principal: Principal = Depends(caller)) -> dict:
    body = await request.body()
    message = pb.SubmitJobRequest()
    try:
        json_format.Parse(body or b"{}", message)
    except json_format.ParseError as exc:
        raise bad_request(f"the body is not a SubmitJobRequest in JSON: {exc}", "body") from None
    try:
        timeout = timeout_seconds(message.timeout) if message.HasField("timeout") else None
    except errors.RequestError as exc:
        raise from_request_error(exc) from None
    job, created = await submit(request, message.params, principal, client_request_id=message.client_request_id, timeout_s=timeout,
                                priority=message.priority if message.HasField("priority") else None)
    if not created:
        response.status_code = 200
    return {"job": job_dict(door_of(request), job), "created": created}


@router.get("/v1/jobs")
async def list_jobs(request: Request, principal: Principal = Depends(caller)) -> dict:
    door = door_of(request)
    return {"object": "list", "data": [job_dict(door, job) for job in reversed(door.jobs(principal))]}


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, request: Request, principal: Principal = Depends(caller)) -> dict:
    return job_dict(door_of(request), owned_job(request, job_id, principal))


@router.delete("/v1/jobs/{job_id}")
async def cancel_job(job_id: str, request: Request, principal: Principal = Depends(caller)) -> dict:
    job = owned_job(request, job_id, principal)
    door_of(request).cancel(job, errors.cancelled("cancelled over HTTP"))
    return job_dict(door_of(request), job)


@router.get("/v1/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request, principal: Principal = Depends(caller)) -> StreamingResponse:
    job = owned_job(request, job_id, principal)
    after = sse.last_event_id(request.headers.get("last-event-id"))
    return StreamingResponse(sse.stream(job, after), media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)


@router.get("/v1/jobs/{job_id}/content")
async def job_content(job_id: str, request: Request, principal: Principal = Depends(caller)) -> StreamingResponse:
    return await artifact_response(request, await job_artifact(request, job_id, principal))
