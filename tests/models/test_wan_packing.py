"""Mixed-shape batching in the Wan worker pipeline (issue 15, item 4): one denoise_step over requests
of different sizes runs one packed forward, and each request's latents equal its own solo steps."""

from __future__ import annotations

import pytest
import torch

from diffserve.scheduler.requests import worker_request
from diffserve.v1 import generation_pb2 as pb
from diffserve.worker.registry import load_pipeline
from tests.fixtures.tiny.wan import build_tiny_wan


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return load_pipeline(build_tiny_wan(tmp_path_factory.mktemp("tiny_wan")), "m", torch.device("cpu"), torch.float32)


def state(pipe, rid: str, seed: int, prompt: str, guidance: float, height: int, width: int, frames: int):
    params = pb.GenerationParams(prompt=prompt, negative_prompt="", height=height, width=width, num_frames=frames,
                                 num_inference_steps=4, guidance_scale=guidance, seed=seed)
    s = pipe.admit(rid, worker_request(params, pipe.card))
    pipe.encode(s)
    pipe.prepare(s)
    return s


SIZES = [("a", 1, "a cat", 5.0, 32, 32, 1), ("b", 2, "a dog", 1.0, 48, 32, 5), ("c", 3, "a red fox", 3.0, 32, 64, 1)]


def test_requests_of_different_sizes_share_one_packed_forward_and_equal_their_solo_runs(pipe, monkeypatch):
    assert pipe.packs
    solo = [state(pipe, *spec) for spec in SIZES]
    for s in solo:
        for _ in range(2):
            pipe.denoise_step([s])

    model, calls = pipe.experts[0], []
    original = model.forward_packed

    def counted(latents, *args):
        calls.append([tuple(x.shape) for x in latents])
        return original(latents, *args)

    monkeypatch.setattr(model, "forward_packed", counted)
    packed = [state(pipe, *spec) for spec in SIZES]
    for _ in range(2):
        assert pipe.denoise_step(packed) == 5  # a and c: cond + uncond rows; b (guidance 1): one row
    assert len(calls) == 2 and len(calls[0]) == 5 and len(set(calls[0])) == 3  # one forward, three sizes
    for p, s in zip(packed, solo):
        assert p.latents.shape == s.latents.shape
        torch.testing.assert_close(p.latents, s.latents, atol=1e-5, rtol=1e-5)


def test_same_size_requests_still_stack(pipe):
    """Equal sizes take the plain batched forward (no packing work)."""
    a, b = state(pipe, "a", 1, "a cat", 5.0, 32, 32, 1), state(pipe, "b", 2, "a dog", 5.0, 32, 32, 1)
    rows = pipe._rows([a, b], [True, True])
    assert torch.is_tensor(rows[1]) and rows[1].shape[0] == 4
