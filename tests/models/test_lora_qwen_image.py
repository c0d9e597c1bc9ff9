"""Per-request LoRA on Qwen-Image (issue 17), on the tiny checkpoint, against diffusers' QwenImagePipeline
with load_lora_weights + set_adapters: requests with adapter a, adapter b and none (true CFG: two rows
each, prompts of different lengths, padded and masked) share each step's one forward and each draws
what diffusers draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffserve.v1 import generation_pb2 as pb
from tests.fixtures.tiny.lora import activate, assert_mix_matches, lora_pipeline, lora_state, reference_with_all, write_lora
from tests.fixtures.tiny.qwen_image import build_tiny_qwen_image

STEPS = 4
QWEN_TARGETS = (r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
                r"transformer_blocks\.\d+\.(img|txt)_mlp\.net\.(0\.proj|2)")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_qwen_image(tmp_path_factory.mktemp("ckpt") / "tiny-qwen")


@pytest.fixture(scope="module")
def loras(ckpt, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    write_lora(folder / "a.safetensors", ckpt / "transformer", QWEN_TARGETS, seed=1)
    write_lora(folder / "b.safetensors", ckpt / "transformer", (r"transformer_blocks\.1\.img_mlp\.net\.2", r"proj_out",
                                                                 r"transformer_blocks\.\d+\.attn\.to_v"), seed=2, alpha=8.0)
    return folder


@pytest.fixture(scope="module")
def pipe(ckpt, loras):
    return lora_pipeline(ckpt, loras)


def state(pipe, rid: str, prompt: str, seed: int, adapters):
    params = pb.GenerationParams(prompt=prompt, negative_prompt="blurry", height=32, width=32, num_frames=1,
                                 num_inference_steps=STEPS, guidance_scale=4.0, seed=seed)
    return lora_state(pipe, rid, params, adapters)


@pytest.fixture(scope="module")
def ref(ckpt, loras):
    """diffusers' QwenImagePipeline with every test adapter loaded once; `reference` activates a case's."""
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(ckpt, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return reference_with_all(pipe, loras, ("a", "b"))


def reference(ref, prompt: str, seed: int, adapters) -> np.ndarray:
    activate(ref, adapters)
    out = ref(prompt=prompt, negative_prompt="blurry", height=32, width=32, num_inference_steps=STEPS, true_cfg_scale=4.0,
              generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images
    return (out * 255).round().astype(np.int16)


MIX = [("a", "a red cat walking on the beach at sunset", 1, [("a", 0.8)]), ("none", "a blue car", 2, []),
       ("b", "a green tree", 3, [("b", 1.0)]), ("ab", "a dog", 4, [("a", 0.5), ("b", 1.5)])]


def test_a_qwen_image_batch_mixing_adapters_matches_diffusers_lora_row_by_row(ref, pipe):
    assert_mix_matches(pipe, lambda *case: state(pipe, *case), lambda *case: reference(ref, *case), MIX, STEPS,
                       rows=8)  # one forward: cond and uncond rows of 4 requests