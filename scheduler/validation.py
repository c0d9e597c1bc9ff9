"""Checks a request against its model's limits and fills unset fields with the model's defaults.

Pure functions over protobuf messages: the scheduler calls `resolve_params` at admission, so a
bad request is refused with INVALID_ARGUMENT naming each bad field before it costs GPU time.
"""

from __future__ import annotations

import math
import secrets

from diffserve.v1 import generation_pb2 as pb

from diffserve.scheduler.errors import invalid_argument

MAX_PROMPT_CHARS = 20_000
MAX_FPS = 120


def resolve_params(params: pb.GenerationParams, model: pb.Model) -> pb.GenerationParams:
    """Returns a copy of `params` with defaults applied and a seed set; raises RequestError."""
    d, lim = model.defaults, model.limits
    size_multiple, frame_step = max(1, lim.size_multiple), max(1, lim.frame_step)
    out = pb.GenerationParams()
    out.CopyFrom(params)
    out.model = model.name
    if not out.HasField("negative_prompt"):
        out.negative_prompt = d.negative_prompt
    for name in ("height", "width", "num_frames", "num_inference_steps", "guidance_scale", "fps"):
        if not out.HasField(name):
            setattr(out, name, getattr(d, name))
    if not out.HasField("guidance_scale_2") and d.guidance_scale_2 > 0:
        out.guidance_scale_2 = d.guidance_scale_2
    if not out.HasField("seed"):
        out.seed = secrets.randbits(63)
    if out.output_format == pb.OUTPUT_FORMAT_UNSPECIFIED:
        out.output_format = pb.OUTPUT_FORMAT_PNG if out.num_frames == 1 else pb.OUTPUT_FORMAT_MP4

    bad: list[tuple[str, str]] = []
    if lim.prompt_required and not out.prompt.strip():
        bad.append(("params.prompt", "must not be empty"))
    if len(out.prompt) > MAX_PROMPT_CHARS:
        bad.append(("params.prompt", f"must be at most {MAX_PROMPT_CHARS} characters"))
    if len(out.negative_prompt) > MAX_PROMPT_CHARS:
        bad.append(("params.negative_prompt", f"must be at most {MAX_PROMPT_CHARS} characters"))
    for name, limit in (("height", lim.max_height), ("width", lim.max_width)):
        value = getattr(out, name)
        if value == 0 and getattr(d, name) == 0:
            continue  # the model derives it from the input image (e.g. image editing)
        if value <= 0:
            bad.append((f"params.{name}", "must be positive"))
        elif value % size_multiple:
            bad.append((f"params.{name}", f"must be a multiple of {size_multiple} (got {value})"))
        elif value > limit:
            bad.append((f"params.{name}", f"must be at most {limit} (got {value})"))
    if out.height > 0 and out.width > 0 and lim.max_pixels and out.height * out.width > lim.max_pixels:
        bad.append(("params.height", f"height × width must be at most {lim.max_pixels} pixels"))
    frames = out.num_frames
    if frames < 1 or (frames - 1) % frame_step:
        bad.append(("params.num_frames", f"must be {frame_step}k+1 for some k >= 0 (1, {frame_step + 1}, {2 * frame_step + 1}, ...; got {frames})"))
    elif frames > lim.max_num_frames:
        bad.append(("params.num_frames", f"must be at most {lim.max_num_frames} (got {frames})"))
    steps = out.num_inference_steps
    if not 1 <= steps <= lim.max_num_inference_steps:
        bad.append(("params.num_inference_steps", f"must be between 1 and {lim.max_num_inference_steps} (got {steps})"))
    if not math.isfinite(out.guidance_scale) or out.guidance_scale < 0:
        bad.append(("params.guidance_scale", "must be a finite number >= 0"))
    if out.HasField("guidance_scale_2") and (not math.isfinite(out.guidance_scale_2) or out.guidance_scale_2 < 0):
        bad.append(("params.guidance_scale_2", "must be a finite number >= 0"))
    if not 1 <= out.fps <= MAX_FPS:
        bad.append(("params.fps", f"must be between 1 and {MAX_FPS} (got {out.fps})"))
    if lim.image_required and not out.images:
        bad.append(("params.images", f"model {model.name} needs an input image"))
    if len(out.images) > lim.max_images:
        bad.append(("params.images", f"model {model.name} takes at most {lim.max_images} input images"))
    if out.output_format == pb.OUTPUT_FORMAT_PNG and frames > 1:
        bad.append(("params.output_format", "PNG holds one frame; use MP4 or NPY for video"))
    if bad:
        raise invalid_argument(bad)
    return out
