"""The OpenAI Videos API's shapes over diffserve's jobs, as pure functions (no sockets, no engine):
a create request's fields → GenerationParams, `seconds` → frames, a job → the Video object and its
`progress`. The router is videos.py.

diffserve's cache and loras (docs/acceleration.md) are GenerationParams.cache / .loras in their
protobuf JSON form, as on the Images API (cache_loras.py; a JSON string in a form).

seconds → frames: frames = seconds × fps (the request's fps, else the model's), rounded to the
nearest count the model accepts (frame_step·k + 1; ties round up), at least 1 and at most the
model's max_num_frames (more is refused, naming `seconds`). Wan (16 fps, frame_step 4): "4" → 65
frames, "5" → 81. The Video object's `seconds` is the clip's real length, num_frames / fps.

progress (0–100, from the job's phase and denoising step; the denoising steps dominate):

    queued 0 · encode 1 · prepare 3 · denoise 5 + 85·step/total_steps · decode 90 · save 95 · completed 100

A job that failed or was cancelled keeps the progress it had reached (its last stage from its
events). A job whose worker group was lost runs again from step 0 (its `restarted` event), and its
progress starts again with it.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from google.rpc import code_pb2, error_details_pb2, status_pb2

from diffserve.v1 import generation_pb2 as pb

from diffserve.scheduler.http import cache_loras
from diffserve.scheduler.http.models import served_card

# The fields of POST /v1/videos: OpenAI's, then diffserve's own (extra body fields).
OPENAI_FIELDS = ("prompt", "model", "seconds", "size", "input_reference")
INT_FIELDS = ("seed", "num_inference_steps", "num_frames", "fps", "priority")
FLOAT_FIELDS = ("guidance_scale", "guidance_scale_2")
STRING_FIELDS = ("prompt", "model", "negative_prompt", "size", "client_request_id")
FIELDS = frozenset(OPENAI_FIELDS + INT_FIELDS + FLOAT_FIELDS + STRING_FIELDS + cache_loras.NAMES)

INT32 = (-(1 << 31), (1 << 31) - 1)
UINT64 = (0, (1 << 64) - 1)
INT_RANGES = {"seed": UINT64}
MAX_SECONDS = 3600.0  # far beyond any model's max_num_frames: keeps seconds × fps a small number

# gRPC field paths in the engine's errors → this endpoint's names (`param` of a 400).
ERROR_FIELDS = {
    "params.width": "size", "params.height": "size", "params.images": "input_reference", "params.prompt": "prompt",
    "params.model": "model", "params.negative_prompt": "negative_prompt", "params.num_inference_steps": "num_inference_steps",
    "params.guidance_scale": "guidance_scale", "params.guidance_scale_2": "guidance_scale_2", "params.seed": "seed",
    "params.fps": "fps", "params.num_frames": "seconds", **cache_loras.ERROR_FIELDS,
}

STATUS = {
    pb.JOB_STATE_QUEUED: "queued", pb.JOB_STATE_RUNNING: "in_progress", pb.JOB_STATE_SUCCEEDED: "completed",
    pb.JOB_STATE_FAILED: "failed", pb.JOB_STATE_CANCELLED: "failed",
}
STAGE_PROGRESS = {pb.STAGE_ENCODE: 1, pb.STAGE_PREPARE: 3, pb.STAGE_DECODE: 90, pb.STAGE_SAVE: 95}
DENOISE_FROM, DENOISE_SPAN = 5, 85

_SIZE = re.compile(r"(\d{1,6})[xX](\d{1,6})")
_DATA_URL = re.compile(r"data:[^,;]*(;[^,;]*)*;base64,(.*)", re.DOTALL)


class FieldError(ValueError):
    """A bad request field: 400 naming `param`."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass
class VideoRequest:
    """A POST /v1/videos body, checked: the engine's params and the submit's own fields."""

    params: pb.GenerationParams
    priority: int | None = None
    client_request_id: str = ""
    fields: dict[str, str] = field(default_factory=lambda: dict(ERROR_FIELDS))  # gRPC field → param, for the engine's errors


# ---- seconds, size, frames ----

def parse_seconds(value) -> float:
    """OpenAI's `seconds` ("4"; any positive decimal here, a number too)."""
    if isinstance(value, bool):
        raise FieldError("seconds", "must be a number of seconds such as \"4\"")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise FieldError("seconds", f"must be a number of seconds such as \"4\" (got {str(value)[:40]!r})") from None
    if not math.isfinite(seconds) or not 0 < seconds <= MAX_SECONDS:
        raise FieldError("seconds", f"must be more than 0 and at most {MAX_SECONDS:g} (got {str(value)[:40]})")
    return seconds


def parse_size(value) -> tuple[int, int]:
    """OpenAI's `size`, "WIDTHxHEIGHT" → (width, height)."""
    match = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise FieldError("size", f"must be WIDTHxHEIGHT such as \"832x480\" (got {str(value)[:40]!r})")
    width, height = int(match.group(1)), int(match.group(2))
    if width < 1 or height < 1:
        raise FieldError("size", f"width and height must be positive (got {value!r})")
    return width, height


def frames_for(seconds: float, fps: int, frame_step: int, max_frames: int) -> int:
    """The frame count for a clip of `seconds` at `fps`: the nearest frame_step·k + 1 to
    seconds × fps (ties round up), at least 1. FieldError (seconds) above max_frames."""
    step = max(1, frame_step)
    k = max(0, math.floor((seconds * fps - 1) / step + 0.5))
    frames = step * k + 1
    if max_frames and frames > max_frames:
        longest = (max_frames - 1) // step * step + 1
        raise FieldError("seconds", f"{seconds:g} s at {fps} fps is {frames} frames; this model makes at most {longest} "
                                    f"({seconds_text(longest, fps)} s)")
    return frames


def seconds_text(frames: int, fps: int) -> str:
    """A clip's length as OpenAI writes `seconds`: a decimal string ("4", "4.0625")."""
    if fps <= 0:
        return "0"
    return f"{round(frames / fps, 4):g}"


def size_text(width: int, height: int) -> str:
    return f"{width}x{height}"


# ---- the create request ----

def _int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise FieldError(name, f"must be an integer (got {str(value)[:40]!r})")
    try:
        number = int(value.strip()) if isinstance(value, str) else value
    except ValueError:
        raise FieldError(name, f"must be an integer (got {value[:40]!r})") from None
    low, high = INT_RANGES.get(name, INT32)
    if not low <= number <= high:
        raise FieldError(name, f"must lie in [{low}, {high}] (got {number})")
    return number


def _float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise FieldError(name, f"must be a number (got {str(value)[:40]!r})")
    try:
        return float(value)
    except ValueError:
        raise FieldError(name, f"must be a number (got {value[:40]!r})") from None


def image_input(value) -> pb.ImageInput:
    """input_reference → an ImageInput: the uploaded file's bytes, or {"image_url": URL} (http(s),
    fetched by the server under its image policy, or a base64 data: URL), or the URL as a string."""
    if isinstance(value, (bytes, bytearray)):
        if not value:
            raise FieldError("input_reference", "the uploaded file is empty")
        return pb.ImageInput(data=bytes(value))
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"image_url", "file_id"})
        if unknown:
            raise FieldError(f"input_reference.{unknown[0]}", "unknown field (give image_url, or upload the image as a file)")
        if "file_id" in value:
            raise FieldError("input_reference.file_id", "diffserve has no Files API: upload the image, or give image_url")
        value = value.get("image_url")
    if not isinstance(value, str) or not value.strip():
        raise FieldError("input_reference", "must be an image file (multipart upload) or {\"image_url\": URL}")
    url = value.strip()
    if url.startswith("data:"):
        match = _DATA_URL.fullmatch(url)
        if match is None:
            raise FieldError("input_reference", "a data: URL must be base64 (data:image/png;base64,...)")
        try:
            data = base64.b64decode(match.group(2), validate=True)
        except (binascii.Error, ValueError):
            raise FieldError("input_reference", "the data: URL's base64 does not decode") from None
        if not data:
            raise FieldError("input_reference", "the data: URL holds no bytes")
        return pb.ImageInput(data=data)
    return pb.ImageInput(url=url)


def video_request(body: Mapping[str, object], models: Iterable[pb.Model]) -> VideoRequest:
    """A create body (JSON object or form fields; input_reference as bytes for an upload) →
    VideoRequest. FieldError for an unknown field, a value of the wrong type, a model that makes
    no video, or a clip longer than the model makes; a cache / loras that is not a StepCache /
    LoraAdapter list: the HttpError 400 of cache_loras.set_cache_and_loras, naming it."""
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise FieldError(unknown[0], f"unknown field; accepted: {', '.join(sorted(FIELDS))}")
    values = {k: v for k, v in body.items() if v is not None}
    for name in STRING_FIELDS:
        if name in values and not isinstance(values[name], str):
            raise FieldError(name, "must be a string")
    params = pb.GenerationParams(prompt=values.get("prompt", ""), model=values.get("model", ""), output_format=pb.OUTPUT_FORMAT_MP4)
    ints = {name: _int(name, values[name]) for name in INT_FIELDS if name in values}
    floats = {name: _float(name, values[name]) for name in FLOAT_FIELDS if name in values}
    for name in ("seed", "num_inference_steps", "fps"):
        if name in ints:
            setattr(params, name, ints[name])
    for name, value in floats.items():
        setattr(params, name, value)
    if "negative_prompt" in values:
        params.negative_prompt = values["negative_prompt"]
    if "size" in values:
        params.width, params.height = parse_size(values["size"])
    if "input_reference" in values:
        params.images.append(image_input(values["input_reference"]))
    cache_loras.set_cache_and_loras(params, values.get("cache"), values.get("loras"))

    request = VideoRequest(params, priority=ints.get("priority"), client_request_id=values.get("client_request_id", ""))
    card = served_card(models, params.model)
    if card is not None and card.limits.max_num_frames == 1:
        raise FieldError("model", f"model {card.name} makes still images, not videos: use POST /v1/images/generations")
    if card is not None and params.images and card.limits.max_images == 0:
        raise FieldError("input_reference", f"model {card.name} takes no input image ({card.task or 'text only'})")
    if "seconds" in values and "num_frames" in ints:
        raise FieldError("num_frames", "give seconds or num_frames, not both")
    if "num_frames" in ints:
        params.num_frames = ints["num_frames"]
        request.fields["params.num_frames"] = "num_frames"
    elif "seconds" in values:
        seconds = parse_seconds(values["seconds"])
        if card is not None:  # else the engine refuses the model
            fps = params.fps if params.HasField("fps") else card.defaults.fps
            if fps < 1:
                raise FieldError("fps", f"must be positive (got {fps})")
            params.num_frames = frames_for(seconds, fps, card.limits.frame_step, card.limits.max_num_frames)
    return request


# ---- the Video object ----

def progress(state: int, stage: int, step: int, total_steps: int) -> int:
    """0–100 (module docstring). `stage` for a failed / cancelled job: the last it reached."""
    if state == pb.JOB_STATE_SUCCEEDED:
        return 100
    if state == pb.JOB_STATE_QUEUED:
        return 0
    if stage == pb.STAGE_DENOISE or (stage == pb.STAGE_UNSPECIFIED and step > 0):
        return DENOISE_FROM + (DENOISE_SPAN * min(step, total_steps) // total_steps if total_steps > 0 else 0)
    return STAGE_PROGRESS.get(stage, 0)


def last_stage(events: Iterable[pb.JobEvent]) -> int:
    """The last stage a job started (since its last restart), from its events; UNSPECIFIED if none."""
    stage = pb.STAGE_UNSPECIFIED
    for event in events:
        kind = event.WhichOneof("event")
        if kind == "stage_started":
            stage = event.stage_started.stage
        elif kind == "restarted":
            stage = pb.STAGE_UNSPECIFIED
    return stage


def error_code(status: status_pb2.Status) -> str:
    """The ErrorInfo reason of a status (CANCELLED, DEADLINE_EXCEEDED, WORKER_LOST, ...), else its code's name."""
    for any_ in status.details:
        if any_.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            any_.Unpack(info)
            if info.reason:
                return info.reason
    return code_pb2.Code.Name(status.code) if status.code in code_pb2.Code.values() else "UNKNOWN"


def is_video(job: pb.Job) -> bool:
    """Jobs the Videos API shows: those whose artifact is an MP4 (any API may have submitted them)."""
    return job.params.output_format == pb.OUTPUT_FORMAT_MP4


def video_object(job: pb.Job, stage: int, ttl_s: float | None) -> dict:
    """OpenAI's Video for a job (pb.Job as GetJob returns it; `stage`: last_stage of its events
    for a job that ended, ignored otherwise), with diffserve's fields beside OpenAI's."""
    p = job.params
    ended = job.state in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)
    running_stage = stage if ended else job.stage
    video = {
        "id": job.id,
        "object": "video",
        "model": p.model,
        "status": STATUS.get(job.state, "queued"),
        "progress": progress(job.state, running_stage, job.step, job.total_steps),
        "created_at": job.create_time.seconds,
        "completed_at": job.end_time.seconds if ended and job.HasField("end_time") else None,
        "expires_at": job.end_time.seconds + math.ceil(ttl_s) if ended and ttl_s and job.HasField("end_time") else None,
        "prompt": p.prompt,
        "remixed_from_video_id": None,
        "seconds": seconds_text(p.num_frames, p.fps),
        "size": size_text(p.width, p.height),
        "error": None,
        # diffserve's own
        "state": pb.JobState.Name(job.state),
        "seed": str(p.seed),
        "num_frames": p.num_frames,
        "fps": p.fps,
        "num_inference_steps": p.num_inference_steps,
        "step": job.step,
        "total_steps": job.total_steps,
        "queue_position": job.queue_position,
        "priority": job.priority,
    }
    if job.state in (pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED):
        status = job.error if job.HasField("error") else status_pb2.Status(code=code_pb2.UNKNOWN, message="the job failed")
        video["error"] = {"code": error_code(status), "message": status.message}
    return video
