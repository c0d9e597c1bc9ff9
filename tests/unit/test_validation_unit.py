"""resolve_params: defaults applied, seed chosen, every limit enforced with the field named."""

from __future__ import annotations

import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2

from diffserve.scheduler import errors
from diffserve.scheduler.errors import RequestError
from diffserve.scheduler.validation import (
    MAX_CLIENT_REQUEST_ID_BYTES, MAX_IMAGES, MAX_PROMPT_BYTES, MAX_TIMEOUT_S, check_request, resolve_params, timeout_seconds, visible,
)
from diffserve.v1 import generation_pb2 as pb

MODEL = pb.Model(
    name="m",
    defaults=pb.ModelDefaults(height=480, width=832, num_frames=81, num_inference_steps=50, guidance_scale=5.0, fps=16, negative_prompt="neg"),
    limits=pb.ModelLimits(size_multiple=16, max_height=2048, max_width=2048, max_pixels=1920 * 1088, frame_step=4,
                          max_num_frames=257, max_num_inference_steps=1000, prompt_required=True, max_images=0),
)


def test_defaults_and_seed():
    out = resolve_params(pb.GenerationParams(prompt="x"), MODEL)
    assert (out.height, out.width, out.num_frames, out.num_inference_steps, out.fps) == (480, 832, 81, 50, 16)
    assert out.guidance_scale == pytest.approx(5.0) and out.negative_prompt == "neg" and out.model == "m"
    assert out.HasField("seed") and out.output_format == pb.OUTPUT_FORMAT_MP4
    other = resolve_params(pb.GenerationParams(prompt="x"), MODEL)
    assert other.seed != out.seed


def test_explicit_values_kept():
    out = resolve_params(pb.GenerationParams(prompt="x", negative_prompt="", num_frames=1, seed=0, guidance_scale=0.0), MODEL)
    assert out.negative_prompt == "" and out.seed == 0 and out.guidance_scale == 0.0
    assert out.output_format == pb.OUTPUT_FORMAT_PNG


@pytest.mark.parametrize("fields,bad", [
    (dict(height=1920, width=1920), "params.height"),  # over max_pixels
    (dict(num_frames=261), "params.num_frames"),
    (dict(num_frames=3), "params.num_frames"),
    (dict(prompt="x" * 20_001), "params.prompt"),
    (dict(fps=500), "params.fps"),
])
def test_limits(fields, bad):
    with pytest.raises(RequestError) as info:
        resolve_params(pb.GenerationParams(**{"prompt": "x", **fields}), MODEL)
    assert bad in info.value.status.message


def test_all_violations_reported_at_once():
    with pytest.raises(RequestError) as info:
        resolve_params(pb.GenerationParams(prompt="", width=17, num_frames=2), MODEL)
    message = info.value.status.message
    assert "params.prompt" in message and "params.width" in message and "params.num_frames" in message


# ---- guidance: a request may set only the guidance its model uses ----

def card(kind, experts=1, **defaults):
    model = pb.Model()
    model.CopyFrom(MODEL)
    model.guidance_kind, model.num_experts = kind, experts
    for name, value in defaults.items():
        setattr(model.defaults, name, value)
    return model


CFG = card(pb.GUIDANCE_KIND_CFG)
CFG_2 = card(pb.GUIDANCE_KIND_CFG, experts=2, guidance_scale=4.0, guidance_scale_2=3.0)  # Wan2.2 T2V-A14B
CFG_2_NO_DEFAULT = card(pb.GUIDANCE_KIND_CFG, experts=2)  # Wan2.2 I2V-A14B: no card default of its own
RESCALE = card(pb.GUIDANCE_KIND_CFG_NORM_RESCALE, negative_prompt=" ")
EMBEDDED = card(pb.GUIDANCE_KIND_EMBEDDED, guidance_scale=3.5, negative_prompt="")
NONE = card(pb.GUIDANCE_KIND_NONE, guidance_scale=1.0, negative_prompt="")


def refused(model, **fields) -> str:
    with pytest.raises(RequestError) as info:
        resolve_params(pb.GenerationParams(prompt="x", **fields), model)
    return info.value.status.message


@pytest.mark.parametrize("model,fields", [
    (CFG, {}), (CFG, dict(guidance_scale=7.5, negative_prompt="blurry")), (CFG, dict(guidance_scale=1.0, negative_prompt="blurry")),
    (RESCALE, dict(guidance_scale=4.0, negative_prompt="low quality")),
    (CFG_2, {}), (CFG_2, dict(guidance_scale=5.0, guidance_scale_2=2.5)), (CFG_2, dict(guidance_scale=1.0)),
    (CFG_2, dict(guidance_scale=1.0, guidance_scale_2=1.0)), (CFG_2, dict(guidance_scale_2=0.0)),
    (EMBEDDED, {}), (EMBEDDED, dict(guidance_scale=5.0)), (EMBEDDED, dict(guidance_scale=0.0, negative_prompt="")),
    (NONE, {}), (NONE, dict(guidance_scale=1.0)), (NONE, dict(guidance_scale=0.0, negative_prompt=" ")),
])
def test_guidance_the_model_uses_is_accepted(model, fields):
    resolve_params(pb.GenerationParams(prompt="x", **fields), model)


@pytest.mark.parametrize("model,fields,field,words", [
    (NONE, dict(guidance_scale=5.0), "params.guidance_scale", "takes no guidance"),  # FastWan: was silently ignored
    (NONE, dict(negative_prompt="blurry"), "params.negative_prompt", "no use for a negative prompt"),
    (EMBEDDED, dict(negative_prompt="blurry"), "params.negative_prompt", "no use for a negative prompt"),
    (CFG, dict(guidance_scale_2=3.0), "params.guidance_scale_2", "one expert"),
    (RESCALE, dict(guidance_scale_2=1.0), "params.guidance_scale_2", "one expert"),
    (EMBEDDED, dict(guidance_scale_2=3.0), "params.guidance_scale_2", "one expert"),
    (NONE, dict(guidance_scale_2=0.0), "params.guidance_scale_2", "one expert"),
    (CFG_2, dict(guidance_scale=1.0, guidance_scale_2=3.0), "params.guidance_scale_2", "guidance_scale > 1"),
    (CFG_2, dict(guidance_scale_2=float("nan")), "params.guidance_scale_2", "finite"),
    (CFG_2, dict(guidance_scale_2=-1.0), "params.guidance_scale_2", "finite"),
    (EMBEDDED, dict(guidance_scale=float("inf")), "params.guidance_scale", "finite"),
    (NONE, dict(guidance_scale=-1.0), "params.guidance_scale", "finite"),
])
def test_guidance_the_model_does_not_use_is_refused(model, fields, field, words):
    message = refused(model, **fields)
    assert f"{field}:" in message and words in message, message


def test_guidance_refusals_reported_with_the_other_violations():
    message = refused(NONE, guidance_scale=5.0, guidance_scale_2=2.0, negative_prompt="blurry", num_frames=2)
    for field in ("params.guidance_scale:", "params.guidance_scale_2:", "params.negative_prompt:", "params.num_frames:"):
        assert field in message, message


def test_guidance_scale_2_defaults():
    # Two experts: the card's own default, else guidance_scale (diffusers' default); one expert: unset.
    assert resolve_params(pb.GenerationParams(prompt="x"), CFG_2).guidance_scale_2 == pytest.approx(3.0)
    assert resolve_params(pb.GenerationParams(prompt="x", guidance_scale=6.0), CFG_2).guidance_scale_2 == pytest.approx(3.0)
    assert resolve_params(pb.GenerationParams(prompt="x", guidance_scale=6.0), CFG_2_NO_DEFAULT).guidance_scale_2 == pytest.approx(6.0)
    assert not resolve_params(pb.GenerationParams(prompt="x"), CFG).HasField("guidance_scale_2")


# ---- image editing: an unset size is derived from the input image ----

def png(width, height) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


EDIT = pb.Model(
    name="edit",
    guidance_kind=pb.GUIDANCE_KIND_CFG_NORM_RESCALE,
    defaults=pb.ModelDefaults(height=0, width=0, num_frames=1, num_inference_steps=50, guidance_scale=4.0, fps=16, negative_prompt=" "),
    limits=pb.ModelLimits(size_multiple=16, max_height=2048, max_width=2048, max_pixels=2048 * 2048, frame_step=1,
                          max_num_frames=1, max_num_inference_steps=1000, prompt_required=True, image_required=True, max_images=1),
)


def test_edit_size_derived_from_the_image():
    out = resolve_params(pb.GenerationParams(prompt="x", images=[pb.ImageInput(data=png(40, 56))]), EDIT)
    assert (out.width, out.height) == (864, 1216)  # ~1024² at 40:56, as the worker derived it before


def test_edit_size_set_by_the_user_is_kept_and_checked():
    image = [pb.ImageInput(data=png(40, 56))]
    out = resolve_params(pb.GenerationParams(prompt="x", images=image, height=48, width=32), EDIT)
    assert (out.width, out.height) == (32, 48)
    out = resolve_params(pb.GenerationParams(prompt="x", images=image, height=512), EDIT)
    assert (out.width, out.height) == (864, 512)  # the unset one alone is derived
    assert "params.width:" in refused(EDIT, images=image, width=33)


def test_edit_size_of_a_very_wide_image():
    # Over max_width: the reference's ~1024² pixels are kept, not refused.
    out = resolve_params(pb.GenerationParams(prompt="x", images=[pb.ImageInput(data=png(600, 100))]), EDIT)
    assert out.width > 2048 and out.width % 16 == 0 and out.height % 16 == 0
    # A degenerate ratio rounds to 0 pixels: refused, naming the field.
    assert "params.height: derived from the input image" in refused(EDIT, images=[pb.ImageInput(data=png(8000, 1))])


def test_edit_without_image_is_refused_on_images_only():
    message = refused(EDIT)
    assert "params.images:" in message and "params.height" not in message and "params.width" not in message


# ---- bounds on every input (issue 12, part 5) ----


def violations(exc: RequestError) -> dict[str, str]:
    bad = error_details_pb2.BadRequest()
    for detail in exc.status.details:
        if detail.Is(bad.DESCRIPTOR):
            detail.Unpack(bad)
    return {v.field: v.description for v in bad.field_violations}


INVISIBLE = ["\u200b", "\u200b\u200c\u200d\u2060\ufeff", " \u00a0\u3000\t\n", "\u202e\u2066\u2069", "\u3164\u2800", "\U000e0041\U000e0042", "\u034f"]


@pytest.mark.parametrize("prompt", INVISIBLE, ids=range(len(INVISIBLE)))
def test_invisible_prompt_is_empty(prompt):
    assert not visible(prompt)
    with pytest.raises(RequestError) as info:
        resolve_params(pb.GenerationParams(prompt=prompt), MODEL)
    assert "params.prompt" in violations(info.value)


@pytest.mark.parametrize("prompt", ["a", "\u200bcat\u200b", "猫", "😀", "é"])
def test_visible_prompt_accepted(prompt):
    assert visible(prompt)
    assert resolve_params(pb.GenerationParams(prompt=prompt), MODEL).prompt == prompt


BOUNDS = [
    (dict(prompt="a\0b"), "params.prompt"),
    (dict(negative_prompt="x\0"), "params.negative_prompt"),
    (dict(model="m\0"), "params.model"),
    (dict(prompt="😀" * (MAX_PROMPT_BYTES // 4 + 1)), "params.prompt"),  # bytes, not characters
    (dict(negative_prompt="x" * (MAX_PROMPT_BYTES + 1)), "params.negative_prompt"),
    (dict(model="m" * 1000), "params.model"),
    (dict(output_format=99), "params.output_format"),
    (dict(images=[pb.ImageInput(path="a\0.png")]), "params.images[0].path"),
    (dict(images=[pb.ImageInput(url="http://x/\0")]), "params.images[0].url"),
    (dict(images=[pb.ImageInput(url="http://x/" + "a" * 10_000)]), "params.images[0].url"),
    (dict(images=[pb.ImageInput(data=b"x")] * (MAX_IMAGES + 1)), "params.images"),
    (dict(loras=[pb.LoraAdapter(name=f"l{i}") for i in range(9)]), "params.loras"),
    (dict(loras=[pb.LoraAdapter(name="ok"), pb.LoraAdapter(name="x" * 129)]), "params.loras[1].name"),
    (dict(loras=[pb.LoraAdapter(name="a\0")]), "params.loras[0].name"),
]


@pytest.mark.parametrize("fields,field", BOUNDS, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BOUNDS)])
def test_bounds_refused_before_anything_is_fetched(fields, field):
    params = pb.GenerationParams(**{"prompt": "x", **fields})
    with pytest.raises(RequestError) as info:
        check_request(params)
    assert info.value.code.name == "INVALID_ARGUMENT" and field in violations(info.value)


def test_bounds_also_checked_at_admission():
    for fields, field in BOUNDS:
        if field.startswith("params.images") or field == "params.model":
            continue  # images: the model takes none (its own refusal); the model name: resolved already
        with pytest.raises(RequestError) as info:
            resolve_params(pb.GenerationParams(**{"prompt": "x", **fields}), MODEL)
        assert field in violations(info.value), fields


def test_a_20000_emoji_prompt_is_within_bounds():
    check_request(pb.GenerationParams(prompt="😀" * 20_000))
    assert resolve_params(pb.GenerationParams(prompt="😀" * 20_000), MODEL).prompt == "😀" * 20_000


def test_client_request_id_bounded():
    check_request(pb.GenerationParams(prompt="x"), "k" * MAX_CLIENT_REQUEST_ID_BYTES)
    for key in ("k" * (MAX_CLIENT_REQUEST_ID_BYTES + 1), "é" * 65, "a\0b"):
        with pytest.raises(RequestError) as info:
            check_request(pb.GenerationParams(prompt="x"), key)
        assert "client_request_id" in violations(info.value)


def test_images_refused_for_a_model_that_takes_none():
    params = pb.GenerationParams(prompt="x", images=[pb.ImageInput(url="http://203.0.113.9/never-fetched.png")])
    with pytest.raises(RequestError) as info:
        check_request(params, "", [MODEL])
    assert "takes at most 0" in violations(info.value)["params.images"]
    check_request(params)  # no cards given: the model's own check comes at admission
    with pytest.raises(RequestError) as info:
        check_request(params, "", [])  # no model loaded yet: nothing is fetched
    assert info.value.code.name == "UNAVAILABLE"
    with pytest.raises(RequestError) as info:
        check_request(pb.GenerationParams(prompt="x", model="other", images=params.images), "", [MODEL])
    assert "params.model" in violations(info.value)


@pytest.mark.parametrize("seconds,nanos,ok", [
    (1, 0, True), (0, 1, True), (MAX_TIMEOUT_S, 0, True), (0, 0, False), (-1, 0, False), (MAX_TIMEOUT_S, 1, False),
    (2**63 - 1, 0, False), (-(2**63), 0, False), (1, -5, False),
])
def test_timeout_bounds(seconds, nanos, ok):
    duration = duration_pb2.Duration(seconds=seconds, nanos=nanos)
    if ok:
        assert 0 < timeout_seconds(duration) <= MAX_TIMEOUT_S
    else:
        with pytest.raises(RequestError) as info:
            timeout_seconds(duration)
        assert "timeout" in violations(info.value)


def test_error_echoing_a_long_input_stays_small():
    huge = "é" * 1_000_000
    exc = errors.invalid_argument([("params.model", f"unknown model {huge!r}")] * 40)
    assert len(exc.status.message.encode()) <= errors.MAX_MESSAGE_BYTES
    assert exc.status.ByteSize() <= errors.MAX_STATUS_BYTES
    assert all(len(d.encode()) <= errors.MAX_DESCRIPTION_BYTES for d in violations(exc).values())
    assert exc.status.message.startswith("40 invalid fields")
    status = errors.make_status(3, "x" * 100_000)
    assert len(status.message) <= errors.MAX_MESSAGE_BYTES
    big = errors.make_status(3, "m")
    for _ in range(100):
        big.details.add().Pack(error_details_pb2.ErrorInfo(reason="R" * 500))
    assert errors.bounded(big).ByteSize() <= errors.MAX_STATUS_BYTES and errors.bounded(big).code == 3


def test_truncate_keeps_characters_whole():
    assert errors.truncate("ab", 10) == "ab"
    cut = errors.truncate("😀" * 10, 9)
    assert cut == "😀…" and len(cut.encode()) <= 9
