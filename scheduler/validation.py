"""Checks a request against its model's limits and fills unset fields with the model's defaults.

Pure functions over protobuf messages: the scheduler calls `resolve_params` at admission, so a
bad request is refused with INVALID_ARGUMENT naming each bad field before it costs GPU time.
A request may only set the guidance its model uses (`check_guidance`; docs/api.md, "Guidance").

Bounds on every input (`check_request`, run by the service before anything is fetched, and again
inside `resolve_params`): every string has a length limit in UTF-8 bytes and no NUL byte, a
required prompt needs a visible character (not only spaces, zero-width or format characters), the
image count is capped, output_format must be a known value, a timeout lies in (0, 7 days] and a
priority in [MIN_PRIORITY, MAX_PRIORITY] (`check_priority`). A request names at most MAX_LORAS LoRA
adapters, each one the model lists, once, with a scale in [-MAX_LORA_SCALE, MAX_LORA_SCALE]
(`check_loras`; the adapter file itself is checked by the worker, which fails the job naming it).
"""

from __future__ import annotations

import math
import secrets
import unicodedata
from collections.abc import Iterable

from diffserve.v1 import generation_pb2 as pb

from diffserve.scheduler.errors import RequestError, invalid_argument, unavailable
from diffserve.scheduler.images import ImageRefused, edit_output_size, image_size
from diffserve.scheduler.requests import num_experts, uses_cfg

MAX_PROMPT_CHARS = 20_000
MAX_PROMPT_BYTES = 4 * MAX_PROMPT_CHARS  # UTF-8: 20,000 characters of any script, emoji included
MAX_CLIENT_REQUEST_ID_BYTES = 128
MAX_MODEL_NAME_BYTES = 256
MAX_IMAGES = 16  # per request, before the model's own max_images
MAX_IMAGE_PATH_BYTES = 4096
MAX_IMAGE_URL_BYTES = 8192
MAX_TIMEOUT_S = 7 * 24 * 3600
MAX_FPS = 120
MIN_PRIORITY, MAX_PRIORITY = -100, 100  # a job's priority (higher runs sooner)
MAX_LORAS = 8  # LoRA adapters per request
MAX_LORA_NAME_BYTES = 128  # the worker's adapter names are at most 128 ASCII characters
MAX_LORA_SCALE = 4.0  # |scale|: trained adapters run at 0..~1.5; far beyond, the output is noise
DEFAULT_LORA_SCALE = 1.0

# Characters that draw nothing: a prompt made only of these is empty. Categories Cc (controls),
# Cf (format: zero-width space / joiners, bidi marks, BOM, tags), Zs / Zl / Zp (separators),
# Mn / Me (combining marks with no base), Co / Cn / Cs (private use, unassigned, surrogates), and
# blank letters / symbols: Hangul fillers, the braille blank.
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp", "Mn", "Me", "Co", "Cn", "Cs"})
_BLANK_CHARS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def visible(text: str) -> bool:
    """Whether `text` has at least one character that draws something."""
    return any(c not in _BLANK_CHARS and unicodedata.category(c) not in _INVISIBLE_CATEGORIES for c in text)


def _check_string(field: str, value: str, max_bytes: int) -> list[tuple[str, str]]:
    if "\0" in value:
        return [(field, "must not contain NUL bytes")]
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        return [(field, f"must be at most {max_bytes} bytes in UTF-8 (got {size})")]
    return []


def check_strings(params: pb.GenerationParams) -> list[tuple[str, str]]:
    """(field, why) for each string, count or enum of `params` out of bounds; needs no model."""
    bad = _check_string("params.model", params.model, MAX_MODEL_NAME_BYTES)
    for field, value in (("params.prompt", params.prompt), ("params.negative_prompt", params.negative_prompt)):
        wrong = _check_string(field, value, MAX_PROMPT_BYTES)
        if not wrong and len(value) > MAX_PROMPT_CHARS:
            wrong = [(field, f"must be at most {MAX_PROMPT_CHARS} characters")]
        bad += wrong
    if params.output_format not in pb.OutputFormat.values():
        names = ", ".join(pb.OutputFormat.keys())
        bad.append(("params.output_format", f"unknown value {params.output_format}; one of {names}"))
    if len(params.loras) > MAX_LORAS:
        bad.append(("params.loras", f"at most {MAX_LORAS} LoRA adapters per request (got {len(params.loras)})"))
    else:
        for i, lora in enumerate(params.loras):
            bad += _check_string(f"params.loras[{i}].name", lora.name, MAX_LORA_NAME_BYTES)
    if len(params.images) > MAX_IMAGES:
        bad.append(("params.images", f"at most {MAX_IMAGES} images per request (got {len(params.images)})"))
    else:
        for i, image in enumerate(params.images):
            source = image.WhichOneof("source")
            if source == "path":
                bad += _check_string(f"params.images[{i}].path", image.path, MAX_IMAGE_PATH_BYTES)
            elif source == "url":
                bad += _check_string(f"params.images[{i}].url", image.url, MAX_IMAGE_URL_BYTES)
    return bad


def check_request(params: pb.GenerationParams, client_request_id: str = "", models: Iterable[pb.Model] | None = None) -> None:
    """Refuses, before any image is fetched, a request whose fields are out of bounds
    (check_strings, client_request_id) or, when `models` (the served models' cards) are given
    and the request has images, one whose model takes fewer images. Raises RequestError."""
    bad = _check_string("client_request_id", client_request_id, MAX_CLIENT_REQUEST_ID_BYTES)
    bad += check_strings(params)
    if bad:
        raise invalid_argument(bad)
    if params.images and models is not None:
        model = _served_model(params.model, {m.name: m for m in models})
        if len(params.images) > model.limits.max_images:
            raise invalid_argument([("params.images", f"model {model.name} takes at most {model.limits.max_images} input images")])


def _served_model(name: str, served: dict[str, pb.Model]) -> pb.Model:
    """The card `name` selects, refused as admission would refuse it (registry.model_for): so that
    no image is fetched for a request that cannot be admitted."""
    if not served:
        raise RequestError(unavailable("no model is loaded yet; retry when health is SERVING", "NO_MODEL"))
    if not name:
        if len(served) == 1:
            return next(iter(served.values()))
        raise invalid_argument([("params.model", f"required when several models are served: {sorted(served)}")])
    if name not in served:
        raise invalid_argument([("params.model", f"unknown model {name!r}; served: {sorted(served)}")])
    return served[name]


def timeout_seconds(timeout) -> float:
    """Seconds of a google.protobuf.Duration job timeout, which must lie in (0, MAX_TIMEOUT_S];
    raises RequestError (field "timeout") otherwise."""
    seconds, nanos = timeout.seconds, timeout.nanos
    if not -999_999_999 <= nanos <= 999_999_999 or (seconds > 0 and nanos < 0) or (seconds < 0 and nanos > 0):
        raise invalid_argument([("timeout", "is not a valid duration")])
    value = seconds + nanos / 1e9
    if not 0 < value <= MAX_TIMEOUT_S:
        raise invalid_argument([("timeout", f"must be more than 0 and at most {MAX_TIMEOUT_S} s (7 days); got {value:g} s")])
    return value


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
    for lora in out.loras:
        if not lora.HasField("scale"):
            lora.scale = DEFAULT_LORA_SCALE

    bad: list[tuple[str, str]] = check_guidance(params, out, model) + resolve_cache(params, out, model) + check_loras(out.loras, model)
    if lim.prompt_required and not visible(out.prompt):
        bad.append(("params.prompt", "must not be empty" if not out.prompt.strip() else "must have a visible character (not only spaces, zero-width or format characters)"))
    bad += [v for v in check_strings(out) if v[0] != "params.model"]  # the model is known: it was found by name
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


MAX_CACHE_THRESHOLD = 10.0
MAX_TAYLOR_ORDER = 4  # higher orders extrapolate noise; diffusers sets no bound
MAX_CACHE_COUNT = 1000  # interval, max_skip_steps, mag_ratios entries: the most steps a model allows

# The knobs each step-caching policy uses (docs/acceleration.md); a request that sets another is refused.
CACHE_KNOBS = {
    "first-block": ("threshold",),
    "taylorseer": ("interval", "max_order", "warmup_steps", "cooldown_step"),
    "mag": ("threshold", "warmup_steps", "max_skip_steps", "mag_ratios"),
}


def cache_knobs_set(cache: pb.StepCache) -> list[str]:
    """The knobs a request set (0 / empty is unset, except for the optional step counts)."""
    return [f.name for f, _ in cache.ListFields() if f.name != "policy"]


def cache_defaults(policy: str, steps: int) -> dict[str, int]:
    """diffusers' defaults for the knobs a policy uses: TaylorSeerCacheConfig's cache_interval 5,
    max_order 1, disable_cache_before_step 3; MagCacheConfig's max_skip_steps 3 and retention_ratio
    0.2, as steps the way its hook rounds them."""
    if policy == "taylorseer":
        return {"interval": 5, "max_order": 1, "warmup_steps": 3}
    if policy == "mag":
        return {"max_skip_steps": 3, "warmup_steps": int(0.2 * steps + 0.5)}
    return {}


def check_cache(cache: pb.StepCache, model: pb.Model, steps: int = MAX_CACHE_COUNT) -> list[tuple[str, str]]:
    """(field, why) for a step-caching policy the model does not offer, a knob the policy does not
    use, or a knob out of range; `steps` is the request's num_inference_steps."""
    knobs = cache_knobs_set(cache)
    if not cache.policy:
        return [("params.cache.policy", f"a cache with {', '.join(knobs)} set needs a policy (e.g. first-block)")] if knobs else []
    if cache.policy not in model.cache_policies:
        offered = ", ".join(model.cache_policies) or "none"
        return [("params.cache.policy", f"model {model.name} offers no step-caching policy {cache.policy!r} (offered: {offered})")]
    uses = CACHE_KNOBS[cache.policy]
    bad = [(f"params.cache.{k}", f"policy {cache.policy} does not use it (it takes {', '.join(uses)})") for k in knobs if k not in uses]
    if "threshold" in uses and (not math.isfinite(cache.threshold) or not 0 < cache.threshold <= MAX_CACHE_THRESHOLD):
        bad.append(("params.cache.threshold", f"must be more than 0 and at most {MAX_CACHE_THRESHOLD:g} (got {cache.threshold:g})"))
    ranges = {"interval": (1, MAX_CACHE_COUNT), "max_order": (1, MAX_TAYLOR_ORDER), "max_skip_steps": (1, MAX_CACHE_COUNT),
              # TaylorSeer's first step has nothing to predict from (diffusers' hook raises there).
              "warmup_steps": (1 if cache.policy == "taylorseer" else 0, steps), "cooldown_step": (1, steps)}
    for name, (low, high) in ranges.items():
        if name in uses and name in knobs and not low <= getattr(cache, name) <= high:
            bad.append((f"params.cache.{name}", f"must be from {low} to {high} (got {getattr(cache, name)})"))
    if "mag_ratios" in uses:
        ratios = cache.mag_ratios
        if not 1 <= len(ratios) <= MAX_CACHE_COUNT:
            bad.append(("params.cache.mag_ratios", f"mag needs the model's magnitude ratios, 1 to {MAX_CACHE_COUNT} of them "
                                                   f"(got {len(ratios)}; docs/acceleration.md says how to calibrate them)"))
        elif not all(math.isfinite(r) and r > 0 for r in ratios):
            bad.append(("params.cache.mag_ratios", "must be finite numbers > 0"))
    return bad


def resolve_cache(params: pb.GenerationParams, out: pb.GenerationParams, model: pb.Model) -> list[tuple[str, str]]:
    """Checks the request's step cache (check_cache) and fills the unset knobs its policy uses into
    `out.cache` (cache_defaults); returns (field, why) for what is wrong."""
    bad = check_cache(params.cache, model, out.num_inference_steps)
    if not bad and out.cache.policy:
        set_knobs = cache_knobs_set(params.cache)
        for name, value in cache_defaults(out.cache.policy, out.num_inference_steps).items():
            if name not in set_knobs:
                setattr(out.cache, name, value)
    return bad


def check_loras(loras: Iterable[pb.LoraAdapter], model: pb.Model) -> list[tuple[str, str]]:
    """(field, why) for each LoRA adapter the model does not list, named twice, or whose scale is
    not a finite number in [-MAX_LORA_SCALE, MAX_LORA_SCALE]. The count and name lengths are
    check_strings'."""
    bad: list[tuple[str, str]] = []
    seen: set[str] = set()
    offered = list(model.lora_adapters)
    for i, lora in enumerate(loras):
        field = f"params.loras[{i}]"
        if lora.name not in offered:
            if not offered:
                why = f"model {model.name} takes no LoRA adapters (its workers serve none: `serve --lora-dir`)"
            else:
                listed = ", ".join(offered[:10]) + (f", ... ({len(offered)} in all)" if len(offered) > 10 else "")
                why = f"model {model.name} has no LoRA adapter {lora.name!r} (offered: {listed})"
            bad.append((f"{field}.name", why))
        elif lora.name in seen:
            bad.append((f"{field}.name", f"LoRA adapter {lora.name!r} is named twice"))
        seen.add(lora.name)
        if not math.isfinite(lora.scale) or abs(lora.scale) > MAX_LORA_SCALE:
            bad.append((f"{field}.scale", f"must be a finite number from {-MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g} (got {lora.scale:g})"))
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


def check_priority(priority: int) -> int:
    """The priority, which must lie in [MIN_PRIORITY, MAX_PRIORITY]; raises RequestError (field
    "priority") otherwise."""
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise invalid_argument([("priority", f"must be from {MIN_PRIORITY} to {MAX_PRIORITY}; got {priority}")])
    return priority
