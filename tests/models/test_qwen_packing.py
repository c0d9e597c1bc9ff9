"""Mixed-shape batching in the Qwen-Image worker pipeline (issue 15, item 4): one denoise_step over
images of different sizes runs one packed forward, and each request equals its own solo steps."""

from __future__ import annotations

import pytest
import torch

from diffserve.scheduler.requests import worker_request
from diffserve.v1 import generation_pb2 as pb
from diffserve.worker.registry import load_pipeline
from tests.fixtures.tiny.qwen_image import build_tiny_qwen_image


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return load_pipeline(build_tiny_qwen_image(tmp_path_factory.mktemp("tiny_qwen")), "m", torch.device("cpu"), torch.float32)


def state(pipe, rid: str, seed: int, prompt: str, guidance: float, height: int, width: int):
    params = pb.GenerationParams(prompt=prompt, height=height, width=width, num_frames=1, num_inference_steps=4,
                                 guidance_scale=guidance, seed=seed)
    s = pipe.admit(rid, worker_request(params, pipe.card))
    pipe.encode(s)
    pipe.prepare(s)
    return s


SIZES = [("a", 1, "a cat", 4.0, 32, 32), ("b", 2, "a dog", 1.0, 48, 32), ("c", 3, "a red fox on a hill at dawn", 2.5, 32, 64)]


def test_images_of_different_sizes_and_prompt_lengths_share_one_packed_forward_and_equal_their_solo_runs(pipe, monkeypatch):
    assert pipe.packs
    solo = [state(pipe, *spec) for spec in SIZES]
    for s in solo:
        for _ in range(2):
            pipe.denoise_step([s])

    calls = []
    original = pipe.transformer.forward_packed

    def counted(latents, *args):
        calls.append([tuple(x.shape) for x in latents])
        return original(latents, *args)

    monkeypatch.setattr(pipe.transformer, "forward_packed", counted)
    packed = [state(pipe, *spec) for spec in SIZES]
    for _ in range(2):
        assert pipe.denoise_step(packed) == 5  # a and c: cond + uncond rows (true CFG); b (guidance 1): one row
    assert len(calls) == 2 and len(set(calls[0])) == 3  # one forward a step, three sizes in it
    for p, s in zip(packed, solo):
        assert p.latents.shape == s.latents.shape
        torch.testing.assert_close(p.latents, s.latents, atol=1e-5, rtol=1e-5)
