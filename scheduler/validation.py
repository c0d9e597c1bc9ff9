"""Checks a request against its model's limits and fills unset fields with the model's defaults.

Pure functions over protobuf messages: the scheduler calls `resolve_params` at admission, so a
bad request is refused with INVALID_ARGUMENT naming each bad field before it costs GPU time.
A request may only set the guidance its model uses (`check_guidance`; docs/api.md, "Guidance").
"""

from __future__ import annotations

import math
import secrets

from diffserve.v1 import generation_pb2 as pb

from diffserve.scheduler.errors import invalid_argument
from diffserve.scheduler.images import ImageRefused, edit_output_size, image_size
from diffserve.scheduler.requests import num_experts, uses_cfg

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
    if not out.HasField("guidance_scale_2") and num_experts(model) > 1:
        # diffusers: the low-noise expert's scale defaults to guidance_scale.
        out.guidance_scale_2 = d.guidance_scale_2 if d.guidance_scale_2 > 0 else out.guidance_scale
    derived = _derive_size(out, model)
    if not out.HasField("seed"):
        out.seed = secrets.randbits(63)
    if out.output_format == pb.OUTPUT_FORMAT_UNSPECIFIED:
        out.output_format = pb.OUTPUT_FORMAT_PNG if out.num_frames == 1 else pb.OUTPUT_FORMAT_MP4

    bad: list[tuple[str, str]] = check_guidance(params, out, model)
    if lim.prompt_required and not out.prompt.strip():
        bad.append(("params.prompt", "must not be empty"))
    if len(out.prompt) > MAX_PROMPT_CHARS:
        bad.append(("params.prompt", f"must be at most {MAX_PROMPT_CHARS} characters"))
    if len(out.negative_prompt) > MAX_PROMPT_CHARS:
        bad.append(("params.negative_prompt", f"must be at most {MAX_PROMPT_CHARS} characters"))
    for name, limit in (("height", lim.max_height), ("width", lim.max_width)):
        value = getattr(out, name)
        if value == 0 and getattr(d, name) == 0 and not out.images:
            continue  # derived from the input image, which is missing: reported on params.images
        if name in derived:
            if value <= 0:
                bad.append((f"params.{name}", f"derived from the input image's aspect ratio as {value}: set height and width"))
            continue  # ~1024² pixels at the image's aspect ratio, as the reference: not held to max_height / max_width
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


def check_guidance(params: pb.GenerationParams, out: pb.GenerationParams, model: pb.Model) -> list[tuple[str, str]]:
    """(field, why) for each guidance field the request sets that its model does not use.

    `params` is the request as sent (what the user set), `out` the same with defaults filled.
    The rules, by the model's guidance_kind and num_experts (docs/api.md, "Guidance"):
    - guidance_scale: finite and >= 0 everywhere; above 1 only where the model takes guidance
      (refused for GUIDANCE_KIND_NONE, where 1 and below mean "no guidance" and are accepted).
    - negative_prompt: only CFG models have an unconditional row; a non-blank one is refused on
      the others.
    - guidance_scale_2: only two-expert CFG models; there it must be finite and >= 0, and a value
      above 1 needs guidance_scale above 1 (CFG runs on both experts or on neither, as diffusers).
    """
    bad: list[tuple[str, str]] = []
    kind = pb.GuidanceKind.Name(model.guidance_kind).removeprefix("GUIDANCE_KIND_")
    cfg = uses_cfg(model)
    if not math.isfinite(out.guidance_scale) or out.guidance_scale < 0:
        bad.append(("params.guidance_scale", "must be a finite number >= 0"))
    elif model.guidance_kind == pb.GUIDANCE_KIND_NONE and params.HasField("guidance_scale") and params.guidance_scale > 1:
        bad.append(("params.guidance_scale", f"model {model.name} takes no guidance (guidance_kind {kind}): leave it unset or at most 1 (got {params.guidance_scale:g})"))
    if not cfg and params.HasField("negative_prompt") and params.negative_prompt.strip():
        bad.append(("params.negative_prompt", f"model {model.name} runs no classifier-free guidance (guidance_kind {kind}), so it has no use for a negative prompt"))
    if params.HasField("guidance_scale_2"):
        value = params.guidance_scale_2
        if num_experts(model) < 2:
            bad.append(("params.guidance_scale_2", f"model {model.name} has one expert; guidance_scale_2 is for two-expert models (Wan2.2 A14B)"))
        elif not cfg:
            bad.append(("params.guidance_scale_2", f"model {model.name} runs no classifier-free guidance (guidance_kind {kind})"))
        elif not math.isfinite(value) or value < 0:
            bad.append(("params.guidance_scale_2", "must be a finite number >= 0"))
        elif value > 1 and out.guidance_scale <= 1:
            bad.append(("params.guidance_scale_2", f"classifier-free guidance runs only when guidance_scale > 1 (got {out.guidance_scale:g}), on both experts or neither: raise guidance_scale or leave guidance_scale_2 unset"))
    return bad


def _derive_size(out: pb.GenerationParams, model: pb.Model) -> set[str]:
    """Fills an unset height / width whose default is 0 (image editing) from the first input
    image, as the model's reference does; returns the names of the fields it derived. Needs the
    images as bytes (images.resolve_images); leaves the size 0 when there is none."""
    d = model.defaults
    unset = [name for name in ("height", "width") if getattr(out, name) == 0 and getattr(d, name) == 0]
    if not unset or not out.images or out.images[0].WhichOneof("source") != "data":
        return set()
    try:
        width, height = edit_output_size(*image_size(out.images[0].data), model.limits.size_multiple)
    except ImageRefused:
        return set()  # resolve_images refuses it with the reason
    for name, value in (("height", height), ("width", width)):
        if name in unset:
            setattr(out, name, value)
    return set(unset)
