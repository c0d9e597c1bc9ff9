"""Per-request LoRA on HunyuanVideo (issue 17), on the tiny checkpoint, against diffusers'
HunyuanVideoPipeline with load_lora_weights + set_adapters: requests with adapter a, adapter b, both
and none (prompts of different lengths: rows padded to the longest) share each step's one forward and
each draws what diffusers draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffserve.v1 import generation_pb2 as pb
from tests.fixtures.tiny.hunyuan_video import build_tiny_hunyuan_video
from tests.fixtures.tiny.lora import (DOUBLE_AND_SINGLE_STREAM, SOME_STREAM_LINEARS, activate, assert_mix_matches, lora_pipeline, lora_state,
                                     reference_with_all, write_lora)

STEPS = 3
SIZE = dict(height=32, width=32, num_frames=5)
# The double- and single-stream blocks, and the token refiner's attention (text rows, one per request).
HUNYUAN_TARGETS = (*DOUBLE_AND_SINGLE_STREAM, r"context_embedder\.token_refiner\.refiner_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_hunyuan_video(tmp_path_factory.mktemp("ckpt") / "tiny-hunyuan-video")


@pytest.fixture(scope="module")
def loras(ckpt, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    write_lora(folder / "a.safetensors", ckpt / "transformer", HUNYUAN_TARGETS, seed=1)
    write_lora(folder / "b.safetensors", ckpt / "transformer", SOME_STREAM_LINEARS, seed=2, alpha=8.0)
    return folder


@pytest.fixture(scope="module")
def pipe(ckpt, loras):
    return lora_pipeline(ckpt, loras)


def state(pipe, rid: str, prompt: str, seed: int, adapters):
    params = pb.GenerationParams(prompt=prompt, num_inference_steps=STEPS, guidance_scale=6.0, seed=seed, **SIZE)
    return lora_state(pipe, rid, params, adapters)


@pytest.fixture(scope="module")
def ref(ckpt, loras):
    """diffusers' HunyuanVideoPipeline with every test adapter loaded once; `reference` activates a case's."""
    from diffusers import HunyuanVideoPipeline

    pipe = HunyuanVideoPipeline.from_pretrained(ckpt, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return reference_with_all(pipe, loras, ("a", "b"))


def reference(ref, prompt: str, seed: int, adapters) -> np.ndarray:
    activate(ref, adapters)
    out = ref(prompt=prompt, num_inference_steps=STEPS, guidance_scale=6.0, generator=torch.Generator("cpu").manual_seed(seed),
              output_type="np", **SIZE).frames[0]
    return (out * 255).round().astype(np.int16)


MIX = [("a", "a red cat walking on the beach at sunset", 1, [("a", 0.8)]), ("none", "a blue car", 2, []),
       ("b", "a green tree", 3, [("b", 1.0)]), ("ab", "a dog", 4, [("a", 0.5), ("b", 1.5)])]


def test_card_lists_the_folder_adapters(pipe):
    assert pipe.lora_adapters == ("a", "b")


def test_a_hunyuan_video_batch_mixing_adapters_matches_diffusers_lora_row_by_row(ref, pipe):
    assert_mix_matches(pipe, lambda *case: state(pipe, *case), lambda *case: reference(ref, *case), MIX, STEPS,
                       rows=4)  # one forward, one row per request


def test_an_unknown_adapter_is_refused_naming_it(pipe):
    with pytest.raises(ValueError, match="nope"):
        lora_state(pipe, "r", pb.GenerationParams(prompt="x", num_inference_steps=STEPS, seed=1, **SIZE), [("nope", 1.0)])
