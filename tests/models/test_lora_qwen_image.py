"""Per-request LoRA on Qwen-Image (issue 17), on the tiny checkpoint, against diffusers' QwenImagePipeline
with load_lora_weights + set_adapters: requests with adapter a, adapter b and none (true CFG: two rows
each, prompts of different lengths, padded and masked) share each step's one forward and each draws
what diffusers draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffserve.scheduler.requests import worker_request
from diffserve.v1 import generation_pb2 as pb
from diffserve.worker.v1 import worker_pb2 as wpb
from tests.fixtures.tiny.lora import activate, reference_with_all, lora_pipeline, write_lora
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
    request = worker_request(params, pipe.card)
    request.loras.extend(wpb.LoraAdapter(name=n, scale=s) for n, s in adapters)
    s = pipe.admit(rid, request)
    pipe.encode(s)
    pipe.prepare(s)
    return s


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
    states = [state(pipe, rid, prompt, seed, adapters) for rid, prompt, seed, adapters in MIX]
    for _ in range(STEPS):
        assert pipe.denoise_step(states) == 8  # one forward: cond and uncond rows of 4 requests
    plain = state(pipe, "plain", MIX[0][1], MIX[0][2], [])
    for _ in range(STEPS):
        pipe.denoise_step([plain])
    assert (plain.latents - states[0].latents).abs().max() > 0.05, "the adapter must change the result"
    for s, (rid, prompt, seed, adapters) in zip(states, MIX):
        ours = pipe.decode(s).astype(np.int16)
        assert ours.std() > 1
        assert np.abs(ours - reference(ref, prompt, seed, adapters)).max() <= 2, rid
