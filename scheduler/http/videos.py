"""The OpenAI Videos API over diffserve's jobs (the shapes and the pure logic: video_objects.py).

    POST   /v1/videos                  create: JSON or multipart/form-data (the openai SDK always sends
                                       multipart) → the Video at once (status "queued")
    GET    /v1/videos                  the caller's videos, OpenAI's cursor page (after, limit, order)
    GET    /v1/videos/{id}             the Video: status, progress 0–100, error, diffserve's fields
    GET    /v1/videos/{id}/content     variant=video (default): the MP4; 409 NO_ARTIFACT before it exists
    DELETE /v1/videos/{id}             a job that has not ended: cancelled at its next step ("deleted":
                                       false; it stays, status "failed", error.code CANCELLED); one that
                                       ended: forgotten with its MP4 ("deleted": true; then 404)

A video is a job whose output is MP4, whichever API submitted it: the same id, owner and lifecycle
as GET /v1/jobs/{id} and gRPC GetJob. Another principal's video is 404, like a missing one.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import UploadFile

from diffserve.scheduler import errors
from diffserve.scheduler.auth import Principal
from diffserve.scheduler.http.auth import caller
from diffserve.scheduler.http.cache_loras import form_value
from diffserve.scheduler.http.errors import HttpError, bad_request
from diffserve.scheduler.http.jobs import artifact_response, door_of, job_artifact, owned_job, submit
from diffserve.scheduler.http.video_objects import FieldError, is_video, last_stage, video_object, video_request
from diffserve.scheduler.jobs import Job

router = APIRouter()

# The pause the openai SDK's poll() takes between two retrieves of an unfinished video
# (its `openai-poll-after-ms` header; without it the SDK waits 1 s).
POLL_AFTER_MS = 500
DEFAULT_LIMIT, MAX_LIMIT = 20, 100
VARIANTS = ("video", "thumbnail", "spritesheet")


def _video(request: Request, job: Job) -> dict:
    door = door_of(request)
    return video_object(door.proto(job), last_stage(job.events) if job.done else 0, door.engine.config.job_ttl_s)


def _owned_video(request: Request, video_id: str, principal: Principal) -> Job:
    job = owned_job(request, video_id, principal)
    if not is_video(job):
        raise HttpError(404, f"no video {video_id} (job {video_id} does not make an MP4: read it at /v1/jobs/{video_id})", "NOT_FOUND")
    return job


async def _body(request: Request) -> dict[str, object]:
    """The create body as a dict: a JSON object, or the form's fields (an uploaded file as bytes;
    `input_reference[image_url]` as the SDK writes a nested field in a form; cache / loras, JSON
    strings in a form, decoded)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await request.form()
        try:
            body: dict[str, object] = {}
            for key, value in form.multi_items():
                name, nested = key, None
                if key.startswith("input_reference[") and key.endswith("]"):
                    name, nested = "input_reference", key[len("input_reference["):-1]
                if isinstance(value, UploadFile):
                    value = await value.read()
                if nested is not None:
                    reference = body.setdefault(name, {})
                    if not isinstance(reference, dict) or nested in reference:
                        raise bad_request(f"{key}: given twice", key)
                    reference[nested] = value
                elif name in body:
                    raise bad_request(f"{name}: given twice", name)
                else:
                    body[name] = form_value(name, value)
            return body
        finally:
            await form.close()
    raw = await request.body()
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise bad_request("the body is neither JSON nor multipart/form-data", "body") from None
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object", "body")
    return body


@router.post("/v1/videos")
async def create_video(request: Request, principal: Principal = Depends(caller)) -> dict:
    door = door_of(request)
    body = await _body(request)
    try:
        video = video_request(body, door.engine.list_models())
    except FieldError as exc:
        raise bad_request(str(exc), exc.param) from None
    client_request_id = video.client_request_id or request.headers.get("idempotency-key", "")
    job, _ = await submit(request, video.params, principal, client_request_id=client_request_id, priority=video.priority, fields=video.fields)
    return _video(request, job)


@router.get("/v1/videos")
async def list_videos(request: Request, after: str | None = None, limit: int = DEFAULT_LIMIT, order: str = "desc",
                      principal: Principal = Depends(caller)) -> dict:
    if order not in ("asc", "desc"):
        raise bad_request(f"order: must be asc or desc (got {order[:20]!r})", "order")
    if not 1 <= limit <= MAX_LIMIT:
        raise bad_request(f"limit: must lie in [1, {MAX_LIMIT}] (got {limit})", "limit")
    door = door_of(request)
    jobs = [job for job in door.jobs(principal) if is_video(job)]  # Job.params: the resolved GenerationParams
    if order == "desc":
        jobs.reverse()
    start = 0
    if after:
        ids = [job.id for job in jobs]
        if after not in ids:
            raise bad_request(f"after: no video {after[:64]!r} among yours (deleted, or expired?)", "after")
        start = ids.index(after) + 1
    page = jobs[start:start + limit]
    data = [_video(request, job) for job in page]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": start + limit < len(jobs)}


@router.get("/v1/videos/{video_id}")
async def retrieve_video(video_id: str, request: Request, principal: Principal = Depends(caller)) -> JSONResponse:
    job = _owned_video(request, video_id, principal)
    headers = {} if job.done else {"openai-poll-after-ms": str(POLL_AFTER_MS)}
    return JSONResponse(_video(request, job), headers=headers)


@router.delete("/v1/videos/{video_id}")
async def delete_video(video_id: str, request: Request, principal: Principal = Depends(caller)) -> dict:
    job = _owned_video(request, video_id, principal)
    door = door_of(request)
    if not job.done:
        door.cancel(job, errors.cancelled("cancelled by DELETE /v1/videos/{id}"))
        return {"id": job.id, "object": "video.deleted", "deleted": False}
    door.engine.forget(job)
    return {"id": job.id, "object": "video.deleted", "deleted": True}


@router.get("/v1/videos/{video_id}/content")
async def video_content(video_id: str, request: Request, variant: str = "video", principal: Principal = Depends(caller)) -> StreamingResponse:
    known = door_of(request).engine.get_job(video_id) is not None
    if known:
        _owned_video(request, video_id, principal)
    if variant not in VARIANTS:
        raise bad_request(f"variant: must be one of {', '.join(VARIANTS)} (got {variant[:20]!r})", "variant")
    if variant != "video":
        raise HttpError(400, f"variant {variant} is not made by diffserve: only variant=video (the MP4)", "UNSUPPORTED_VARIANT", "variant")
    artifact = await job_artifact(request, video_id, principal)  # 404 for another's, 409 NO_ARTIFACT before it exists
    if artifact.media_type != "video/mp4":
        raise HttpError(404, f"no video {video_id}", "NOT_FOUND")
    return await artifact_response(request, artifact)
