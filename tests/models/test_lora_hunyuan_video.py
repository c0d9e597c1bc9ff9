"""Per-request LoRA on HunyuanVideo (issue 17), on the tiny checkpoint, against diffusers'
HunyuanVideoPipeline with load_lora_weights + set_adapters: requests with adapter a, adapter b, both
and none (prompts of different lengths: rows padded to the longest) share each step's one forward and
each draws what diffusers draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffserve.scheduler.requests import worker_request
from diffserve.v1 import generation_pb2 as pb
from diffserve.worker.v1 import worker_pb2 as wpb
from tests.fixtures.tiny.hunyuan_video import build_tiny_hunyuan_video
from tests.fixtures.tiny.lora import activate, reference_with_all, lora_pipeline, write_lora

STEPS = 3
SIZE = dict(height=32, width=32, num_frames=5)
# Double-stream blocks: both streams' attention projections and FFNs; single-stream blocks: all linears;
# the token refiner's attention (text rows, one per request).
HUNYUAN_TARGETS = (r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
                   r"transformer_blocks\.\d+\.ff(_context)?\.net\.(0\.proj|2)",
                   r"single_transformer_blocks\.\d+\.(proj_mlp|proj_out|attn\.to_q|attn\.to_k|attn\.to_v)",
                   r"context_embedder\.token_refiner\.refiner_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_hunyuan_video(tmp_path_factory.mktemp("ckpt") / "tiny-hunyuan-video")


@pytest.fixture(scope="module")
def loras(ckpt, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    write_lora(folder / "a.safetensors", ckpt / "transformer", HUNYUAN_TARGETS, seed=1)
    write_lora(folder / "b.safetensors", ckpt / "transformer", (r"single_transformer_blocks\.\d+\.proj_mlp", r"proj_out",
                                                                 r"transformer_blocks\.0\.attn\.to_q"), seed=2, alpha=8.0)
    return folder


@pytest.fixture(scope="module")
def pipe(ckpt, loras):
    return lora_pipeline(ckpt, loras)


def state(pipe, rid: str, prompt: str, seed: int, adapters):
    params = pb.GenerationParams(prompt=prompt, num_inference_steps=STEPS, guidance_scale=6.0, seed=seed, **SIZE)
    request = worker_request(params, pipe.card)
    request.loras.extend(wpb.LoraAdapter(name=n, scale=s) for n, s in adapters)
    s = pipe.admit(rid, request)
    pipe.encode(s)
    pipe.prepare(s)
    return s


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
    states = [state(pipe, rid, prompt, seed, adapters) for rid, prompt, seed, adapters in MIX]
    for _ in range(STEPS):
        assert pipe.denoise_step(states) == 4  # one forward, one row per request
    plain = state(pipe, "plain", MIX[0][1], MIX[0][2], [])
    for _ in range(STEPS):
        pipe.denoise_step([plain])
    assert (plain.latents - states[0].latents).abs().max() > 0.05, "the adapter must change the result"
    for s, (rid, prompt, seed, adapters) in zip(states, MIX):
        ours = pipe.decode(s).astype(np.int16)
        assert ours.std() > 1
        assert np.abs(ours - reference(ref, prompt, seed, adapters)).max() <= 2, rid


def test_an_unknown_adapter_is_refused_naming_it(pipe):
    request = worker_request(pb.GenerationParams(prompt="x", num_inference_steps=STEPS, seed=1, **SIZE), pipe.card)
    request.loras.append(wpb.LoraAdapter(name="nope", scale=1.0))
    with pytest.raises(ValueError, match="nope"):
        pipe.admit("r", request)
