"""Per-request LoRA on FLUX.1-dev (issue 17), on the tiny checkpoint, against diffusers' FluxPipeline with
load_lora_weights + set_adapters: requests with adapter a, adapter b and none share each step's one
forward and each draws what diffusers draws; a step with a LoRA row and another size does not pack
and each request equals its run alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffserve.v1 import generation_pb2 as pb
from tests.fixtures.tiny.flux import build_tiny_flux
from tests.fixtures.tiny.lora import (DOUBLE_AND_SINGLE_STREAM, SOME_STREAM_LINEARS, activate, assert_mix_matches, lora_pipeline, lora_state,
                                     reference_with_all, write_lora)

STEPS = 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("ckpt") / "tiny-flux")


@pytest.fixture(scope="module")
def loras(ckpt, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    write_lora(folder / "a.safetensors", ckpt / "transformer", DOUBLE_AND_SINGLE_STREAM, seed=1)
    write_lora(folder / "b.safetensors", ckpt / "transformer", SOME_STREAM_LINEARS, seed=2, alpha=8.0)
    return folder


@pytest.fixture(scope="module")
def pipe(ckpt, loras):
    return lora_pipeline(ckpt, loras)


def state(pipe, rid: str, prompt: str, seed: int, adapters, height: int = 32, width: int = 32):
    params = pb.GenerationParams(prompt=prompt, height=height, width=width, num_frames=1, num_inference_steps=STEPS,
                                 guidance_scale=3.5, seed=seed)
    return lora_state(pipe, rid, params, adapters)


@pytest.fixture(scope="module")
def ref(ckpt, loras):
    """diffusers' FluxPipeline with every test adapter loaded once; `reference` activates a case's."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(ckpt, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return reference_with_all(pipe, loras, ("a", "b"))


def reference(ref, prompt: str, seed: int, adapters) -> np.ndarray:
    activate(ref, adapters)
    out = ref(prompt=prompt, height=32, width=32, num_inference_steps=STEPS, guidance_scale=3.5,
              generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images
    return (out * 255).round().astype(np.int16)


MIX = [("a", "a red cat walking on the beach", 1, [("a", 0.8)]), ("none", "a blue car", 2, []),
       ("b", "a green tree at sunset", 3, [("b", 1.0)]), ("ab", "a dog", 4, [("a", 0.5), ("b", 1.5)])]


def test_a_flux_batch_mixing_adapters_matches_diffusers_lora_row_by_row(ref, pipe):
    assert_mix_matches(pipe, lambda *case: state(pipe, *case), lambda *case: reference(ref, *case), MIX, STEPS,
                       rows=4)  # one forward, one row per request


def test_a_flux_step_with_a_lora_row_and_another_size_equals_solo_runs(pipe):
    cases = [("a", "a cat", 1, [("a", 1.0)], 32, 32), ("x", "a car", 2, [], 48, 32)]
    solo = [state(pipe, *c) for c in cases]
    for s in solo:
        for _ in range(STEPS):
            pipe.denoise_step([s])
    together = [state(pipe, *c) for c in cases]
    for _ in range(STEPS):
        pipe.denoise_step(together)
    for a, b in zip(solo, together):
        torch.testing.assert_close(b.latents, a.latents, atol=1e-5, rtol=1e-5)
