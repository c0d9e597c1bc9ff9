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
