"""Per-request LoRA on two-expert Wan2.2 A14B (issue 17), on the tiny checkpoint, against diffusers'
WanPipeline with load_lora_weights (folder/NAME.safetensors into `transformer`,
folder/transformer_2/NAME.safetensors with load_into_transformer_2=True) + set_adapters: adapters in
one expert, the other or both, requests on both sides of the boundary in one step, each drawing what
diffusers draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffserve.v1 import generation_pb2 as pb
from tests.fixtures.tiny.lora import WAN_ATTENTION_AND_FFN, activate, lora_pipeline, lora_state, reference_with_all, write_lora
from tests.fixtures.tiny.wan22 import build_tiny_wan22_a14b

STEPS = 4  # timesteps 999, 900 (high-noise expert) | 750, 500 (low-noise expert)
SIZE = dict(height=32, width=32, num_frames=1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_wan22_a14b(tmp_path_factory.mktemp("ckpt") / "tiny-wan22-a14b")


@pytest.fixture(scope="module")
def loras(ckpt, tmp_path_factory):
    """a: both experts (different weights); b: the high-noise expert only; c: the low-noise one only."""
    folder = tmp_path_factory.mktemp("loras")
    write_lora(folder / "a.safetensors", ckpt / "transformer", WAN_ATTENTION_AND_FFN, seed=1)
    write_lora(folder / "transformer_2" / "a.safetensors", ckpt / "transformer_2", WAN_ATTENTION_AND_FFN, seed=2)
    write_lora(folder / "b.safetensors", ckpt / "transformer", (r"blocks\.\d+\.attn1\.(to_q|to_v)", r"proj_out"), seed=3, alpha=8.0)
    write_lora(folder / "transformer_2" / "c.safetensors", ckpt / "transformer_2", (r"blocks\.\d+\.ffn\.net\.2",), seed=4)
    return folder


@pytest.fixture(scope="module")
def pipe(ckpt, loras):
    return lora_pipeline(ckpt, loras)


def state(pipe, rid: str, prompt: str, seed: int, adapters):
    params = pb.GenerationParams(prompt=prompt, negative_prompt="", num_inference_steps=STEPS, guidance_scale=5.0, seed=seed, **SIZE)
    return lora_state(pipe, rid, params, adapters)


@pytest.fixture(scope="module")
def ref(ckpt, loras):
    """diffusers' WanPipeline with every test adapter loaded once; `reference` activates a case's."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(ckpt, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return reference_with_all(pipe, loras, ("a", "b", "c"))


def reference(ref, prompt: str, seed: int, adapters) -> np.ndarray:
    activate(ref, adapters)
    out = ref(prompt=prompt, negative_prompt="", num_inference_steps=STEPS, guidance_scale=5.0,
              generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **SIZE).frames[0]
    return (out * 255).round().astype(np.int16)


MIX = [("a", "a red cat walking on the beach", 1, [("a", 0.8)]), ("none", "a blue car", 2, []),
       ("c", "a green tree at sunset", 3, [("c", 1.0)]), ("abc", "a dog", 4, [("a", 0.5), ("b", 1.5), ("c", 0.7)])]


def test_card_lists_both_experts_adapters(pipe):
    assert pipe.lora_adapters == ("a", "b", "c")


def test_a14b_steps_with_adapters_on_both_experts_match_diffusers_row_by_row(ref, pipe):
    first = [state(pipe, *case) for case in MIX[:2]]
    for _ in range(2):
        pipe.denoise_step(first)  # now on the low-noise expert
    later = [state(pipe, *case) for case in MIX[2:]]
    assert {pipe.expert_of(s) for s in first} == {1} and {pipe.expert_of(s) for s in later} == {0}
    for _ in range(2):
        assert pipe.denoise_step(first + later) == 8  # two forwards, one per expert, CFG rows included
    for _ in range(2):
        pipe.denoise_step(later)
    states = first + later
    plain = state(pipe, "plain", *MIX[2][1:3], [])
    for _ in range(STEPS):
        pipe.denoise_step([plain])
    assert (plain.latents - states[2].latents).abs().max() > 0.05, "c (low-noise expert only) must change the result"
    for s, (rid, prompt, seed, adapters) in zip(states, MIX):
        ours = pipe.decode(s).astype(np.int16)
        assert ours.std() > 1
        assert np.abs(ours - reference(ref, prompt, seed, adapters)).max() <= 2, rid


def test_an_adapter_no_expert_has_is_refused_naming_it(pipe):
    with pytest.raises(ValueError, match="'nope'.*offers: a, b, c"):
        lora_state(pipe, "r", pb.GenerationParams(prompt="x", num_inference_steps=STEPS, seed=1, **SIZE), [("nope", 1.0)])
