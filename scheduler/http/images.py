"""OpenAI's Images API over the engine: one job per image, the same jobs as every other front door.

    POST /v1/images/generations   JSON  {prompt, model, n, size, response_format, ...}  → ImagesResponse
    POST /v1/images/edits         multipart: image / image[] (files), prompt, model, n, size, ...

Both are synchronous: the call submits its n jobs at once (they share denoising steps), waits for
them, and answers OpenAI's ImagesResponse {created, data: [{b64_json | url, job_id, seed}], size,
output_format}. A client that goes away cancels the call's jobs at their next step; a job that
fails ends the call with its error (and cancels the call's other jobs).

The engine's own fields ride along as extra body fields (the openai SDK's `extra_body`; form fields
on /edits): seed, num_inference_steps, guidance_scale, guidance_scale_2, negative_prompt, priority, and
the opt-ins of docs/acceleration.md in their protobuf JSON form: cache ({"policy": "first-block", "threshold":
0.1}) and loras ([{"name": "ink", "scale": 0.8}]) (on /edits, each a JSON string; cache_loras.py).
With n > 1 and a seed, image i gets seed + i; without one the engine picks each job's seed (in
`data[i].seed`). Any field this module does not know is a 400 naming it. Errors name OpenAI's
fields (size for params.width / params.height, image for params.images, ...): `FIELDS`.

Which model does what (its card's task and limits): /generations serves every model that takes
text alone, video models included (num_frames = 1: one frame, a PNG); a model that needs an input
image is refused there (400, param model). /edits serves image-editing models (Qwen-Image-Edit,
task "image-edit"); image-to-video models are refused there (one frame of them reproduces the input
image: use /v1/videos), as are text-only models.
"""

from __future__ import annotations

import base64
import json
import re
import time
from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile

from diffserve.v1 import generation_pb2 as pb

from diffserve.scheduler import errors
from diffserve.scheduler.auth import Principal
from diffserve.scheduler.http.auth import caller
from diffserve.scheduler.http.cache_loras import ERROR_FIELDS as CACHE_LORAS_FIELDS, form_value, set_cache_and_loras
from diffserve.scheduler.http.errors import HttpError, bad_request, from_request_error
from diffserve.scheduler.http.jobs import door_of, job_failure, submit, wait_done
from diffserve.scheduler.http.models import served_card
from diffserve.scheduler.jobs import Job
from diffserve.scheduler.validation import MAX_IMAGES

router = APIRouter()

MAX_N = 10  # images per call, as OpenAI's own bound
MAX_SEED = 2**64 - 1  # GenerationParams.seed is a uint64
INT32 = 2**31 - 1
IMAGE_FIELDS = ("image", "image[]")
# Form fields of /edits beyond the images: the engine's fields and OpenAI's are a few short strings.
MAX_FORM_FIELDS = 64

# The gRPC field paths in errors, as these endpoints name them.
FIELDS: dict[str, str] = {
    "params.prompt": "prompt", "params.model": "model", "params.width": "size", "params.height": "size",
    "params.negative_prompt": "negative_prompt", "params.num_inference_steps": "num_inference_steps",
    "params.guidance_scale": "guidance_scale", "params.guidance_scale_2": "guidance_scale_2", "params.seed": "seed",
    "params.num_frames": "model", "params.output_format": "output_format", "params.images": "image", "priority": "priority",
    **{f"params.images[{i}].{source}": "image" for i in range(MAX_IMAGES) for source in ("data", "path", "url", "source")},
    **CACHE_LORAS_FIELDS,
}
# How a field path reads inside an error message ("params.width: must be ..." → "size (width): must be ...").
_MESSAGE_NAMES = {"params.width": "size (width)", "params.height": "size (height)", "params.num_frames": "num_frames (1 for an image)"}
_PATH = re.compile(r"params\.[a-z_0-9]+(?:\[(\d+)\](?:\.[a-z]+)?)?")


def openai_message(message: str) -> str:
    """An engine error message with its gRPC field paths in this API's names."""
    def name(match: re.Match) -> str:
        path = match.group(0)
        if path.startswith("params.images["):
            return f"image[{match.group(1)}]"
        return _MESSAGE_NAMES.get(path, FIELDS.get(path, path))

    return _PATH.sub(name, message)


def parse_size(size: str | None) -> tuple[int, int] | None:
    """OpenAI's "WxH" as (width, height); None for unset or "auto" (the model's default size, or
    for editing models the input image's). 400 (param size) for anything else."""
    if size is None or size == "auto":
        return None
    match = re.fullmatch(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})", size)
    if match is None:
        raise bad_request(f"size: must be \"WIDTHxHEIGHT\" in pixels (e.g. \"1024x1024\") or \"auto\"; got {size[:40]!r}", "size")
    return int(match.group(1)), int(match.group(2))


class ImageRequest(BaseModel):
    """The fields both endpoints take. OpenAI's that change nothing here are accepted and ignored
    (user, safety_identifier, quality, style, moderation, output_compression); those asking for
    something this server cannot do are refused by `check_supported`."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    # OpenAI's, accepted and ignored
    user: str | None = None
    safety_identifier: str | None = None
    quality: str | None = None
    style: str | None = None
    moderation: str | None = None
    output_compression: int | None = None
    # OpenAI's, accepted where they ask for what this server does anyway (check_supported)
    background: str | None = None
    output_format: str | None = None
    stream: bool | None = None
    partial_images: int | None = None
    # OpenAI's, refused when set (check_supported)
    complexity: str | None = None
    frame_count: int | None = None
    frame_duration_ms: int | None = None
    svg: object | None = None
    # diffserve's (GenerationParams); unset takes the model's default
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    num_inference_steps: int | None = Field(default=None, ge=-INT32, le=INT32)
    guidance_scale: float | None = None
    guidance_scale_2: float | None = None
    negative_prompt: str | None = None
    priority: int | None = Field(default=None, ge=-INT32, le=INT32)
    # GenerationParams.cache (a StepCache) and .loras (LoraAdapter list) in their JSON form (docs/acceleration.md)
    cache: dict | None = None
    loras: list[dict] | None = None


class EditRequest(ImageRequest):
    """/edits' form fields (the images come apart, as files)."""

    input_fidelity: str | None = None  # accepted and ignored
    mask: object | None = None  # refused when set
    markup: object | None = None  # refused when set


def check_supported(req: ImageRequest) -> None:
    """400 naming the first OpenAI field that asks for something this server does not do."""
    if req.background not in (None, "auto", "opaque"):
        raise bad_request(f"background: only \"auto\" and \"opaque\" (images are RGB PNGs); got {req.background!r}", "background")
    if req.output_format not in (None, "png"):
        raise bad_request(f"output_format: only \"png\"; got {req.output_format!r}", "output_format")
    if req.stream:
        raise bad_request("stream: not supported; follow a job's steps with GET /v1/jobs/{id}/events", "stream")
    if req.partial_images:
        raise bad_request("partial_images: not supported (needs stream)", "partial_images")
    for name in ("complexity", "frame_count", "frame_duration_ms", "svg", "mask", "markup"):
        if getattr(req, name, None) is not None:
            extra = " (edits change the whole image)" if name == "mask" else ""
            raise bad_request(f"{name}: not supported{extra}", name)
    if req.seed is not None and req.seed + (req.n or 1) - 1 > MAX_SEED:
        raise bad_request(f"seed: seed + n - 1 must be at most {MAX_SEED}", "seed")


def to_params(req: ImageRequest, images: list[bytes] = ()) -> pb.GenerationParams:
    """The GenerationParams of each of the request's images (the caller sets each one's seed): one
    PNG frame; fields the request leaves unset stay unset (the model's defaults)."""
    params = pb.GenerationParams(model=req.model or "", prompt=req.prompt, num_frames=1, output_format=pb.OUTPUT_FORMAT_PNG)
    size = parse_size(req.size)
    if size is not None:
        params.width, params.height = size
    for name in ("negative_prompt", "num_inference_steps", "guidance_scale", "guidance_scale_2", "seed"):
        value = getattr(req, name)
        if value is not None:
            setattr(params, name, value)
    set_cache_and_loras(params, req.cache, req.loras)
    for data in images:
        params.images.add(data=data)
    return params


def seeds(req: ImageRequest) -> list[int | None]:
    """Each image's seed: seed, seed + 1, ... when the request sets one; None (the engine picks)
    otherwise."""
    n = req.n or 1
    return [None] * n if req.seed is None else [req.seed + i for i in range(n)]


def check_model(card: pb.Model, endpoint: str) -> None:
    """400 (param model) when `card`'s model cannot serve `endpoint` ("generations" or "edits")."""
    task = card.task or "unknown"
    if endpoint == "generations":
        if card.limits.image_required:
            where = "POST /v1/images/edits" if card.limits.max_num_frames <= 1 else "POST /v1/videos"
            raise bad_request(f"model: {card.name} (task {task}) needs an input image; use {where}", "model")
        return
    if card.limits.max_images == 0:
        raise bad_request(f"model: {card.name} (task {task}) takes no input image; use POST /v1/images/generations", "model")
    if card.limits.max_num_frames > 1:
        raise bad_request(f"model: {card.name} (task {task}) animates its input image; use POST /v1/videos "
                          "(one frame of it would reproduce the input)", "model")


def validated(model: type[ImageRequest], data: dict) -> ImageRequest:
    """`model` from `data`; a problem is a validation error (400 naming the field, app.py)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def _http_error(exc: errors.RequestError, request: Request) -> HttpError:
    error = from_request_error(exc, FIELDS, door_of(request).engine.config.retry_after_s)
    error.message = openai_message(error.message)
    return error


async def _run(request: Request, req: ImageRequest, principal: Principal, endpoint: str, images: list[bytes] = ()) -> dict:
    """Submits the request's n jobs at once, waits for them, answers the ImagesResponse."""
    check_supported(req)
    door = door_of(request)
    card = served_card(door.engine.list_models(), req.model)
    if card is not None:
        check_model(card, endpoint)
    params = to_params(req, images)
    jobs: list[Job] = []
    try:
        for seed in seeds(req):
            one = pb.GenerationParams()
            one.CopyFrom(params)
            if seed is not None:
                one.seed = seed
            job, _ = await submit(request, one, principal, priority=req.priority, fields=FIELDS)
            jobs.append(job)
    except HttpError as exc:
        for job in jobs:  # all or nothing: the images already queued are of no use now
            door.cancel(job, errors.cancelled(f"another image of this call was refused: {exc.message}"))
        exc.message = openai_message(exc.message)
        raise
    except BaseException:
        for job in jobs:
            door.cancel_bound(job, True)
        raise
    await _wait_all(request, jobs)
    return await _response(request, req, jobs)


async def _wait_all(request: Request, jobs: list[Job]) -> None:
    """Waits for every job; a client gone cancels them all, a job that did not succeed ends the
    call with its error and cancels the others."""
    door = door_of(request)
    try:
        for job in jobs:
            await wait_done(request, job, True)
            if not job.done or await request.is_disconnected():
                raise HttpError(499, "the client closed the request", "CANCELLED")
            if job.state != pb.JOB_STATE_SUCCEEDED:
                failure = job_failure(job)
                failure.message = openai_message(failure.message)
                raise failure
    except BaseException:
        for job in jobs:
            if not job.done:
                door.cancel(job, errors.cancelled("another image of this call ended the call"))
        raise


async def _response(request: Request, req: ImageRequest, jobs: list[Job]) -> dict:
    door = door_of(request)
    data = []
    for job in jobs:
        item: dict = {}
        if req.response_format == "url":
            item["url"] = str(request.base_url.replace(query=None, fragment=None)).rstrip("/") + f"/v1/jobs/{job.id}/content"
        else:
            chunks = [chunk async for chunk in door.artifact_bytes(job.artifact)]
            item["b64_json"] = base64.b64encode(b"".join(chunks)).decode("ascii")
        item["job_id"] = job.id
        item["seed"] = job.params.seed
        data.append(item)
    first = jobs[0].artifact
    return {"created": int(time.time()), "data": data, "size": f"{first.width}x{first.height}", "output_format": "png"}


async def _errors_as_http(request: Request, coro):
    try:
        return await coro
    except errors.RequestError as exc:
        raise _http_error(exc, request) from None


@router.post("/v1/images/generations")
async def generations(request: Request, principal: Principal = Depends(caller)) -> dict:
    body = await request.body()
    try:
        data = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the body is not JSON: {exc}", "body") from None
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object", "body")
    req = validated(ImageRequest, data)
    return await _errors_as_http(request, _run(request, req, principal, "generations"))


@router.post("/v1/images/edits")
async def edits(request: Request, principal: Principal = Depends(caller)) -> dict:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise bad_request("the body must be multipart/form-data (image files and form fields)", "body")
    policy = door_of(request).image_policy
    try:
        form = await request.form(max_files=MAX_IMAGES + 1, max_fields=MAX_FORM_FIELDS)
    except Exception as exc:  # starlette's MultiPartException, a malformed body
        raise bad_request(f"the multipart body cannot be read: {exc}", "body") from None
    try:
        images: list[bytes] = []
        fields: dict[str, object] = {}
        for key in form.keys():
            values = form.getlist(key)
            if key in IMAGE_FIELDS:
                for value in values:
                    if not isinstance(value, UploadFile):
                        raise bad_request(f"{key}: must be a file (multipart with a filename)", "image")
                    if value.size is not None and value.size > policy.max_bytes:
                        raise bad_request(f"image: {value.filename or 'a file'} is larger than {policy.max_bytes} bytes", "image")
                    images.append(await value.read())
                continue
            if len(values) > 1:
                raise bad_request(f"{key}: given more than once", key)
            value = form_value(key, values[0])  # cache / loras: a JSON string
            fields[key] = value if not isinstance(value, UploadFile) else f"<file {value.filename}>"
        if not images:
            raise bad_request("image: at least one image file is required (image, or image[] for several)", "image")
        req = validated(EditRequest, fields)
    finally:
        await form.close()
    return await _errors_as_http(request, _run(request, req, principal, "edits", images))
