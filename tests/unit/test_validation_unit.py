"""resolve_params: defaults applied, seed chosen, every limit enforced with the field named."""

from __future__ import annotations

import pytest

from diffserve.scheduler.errors import RequestError
from diffserve.scheduler.validation import resolve_params
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
