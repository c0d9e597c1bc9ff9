"""Mixed-shape batching in the worker pipelines (issue 15, item 4): one denoise_step over requests of
different sizes runs one packed forward, and each request's latents equal its own solo steps.
Wan (video, CFG), FLUX (embedded guidance) and Qwen-Image (true CFG, prompts of different lengths)."""

from __future__ import annotations

import pytest
import torch

from diffserve.scheduler.requests import worker_request
from diffserve.v1 import generation_pb2 as pb
from diffserve.worker.registry import load_pipeline
from tests.fixtures.tiny.flux import build_tiny_flux
from tests.fixtures.tiny.qwen_image import build_tiny_qwen_image
from tests.fixtures.tiny.wan import build_tiny_wan

# family: (builder, requests as (id, seed, prompt, guidance, height, width, frames), transformer rows a step)
CASES = {
    "wan": (build_tiny_wan, [("a", 1, "a cat", 5.0, 32, 32, 1), ("b", 2, "a dog", 1.0, 48, 32, 5),
                             ("c", 3, "a red fox", 3.0, 32, 64, 1)], 5),  # CFG rows for a and c
    "flux": (build_tiny_flux, [("a", 1, "a cat", 3.5, 32, 32, 1), ("b", 2, "a dog", 1.0, 48, 32, 1),
                               ("c", 3, "a red fox", 6.0, 32, 64, 1)], 3),  # one row each: embedded guidance
    "qwen-image": (build_tiny_qwen_image, [("a", 1, "a cat", 4.0, 32, 32, 1), ("b", 2, "a dog", 1.0, 48, 32, 1),
                                           ("c", 3, "a red fox on a hill at dawn", 2.5, 32, 64, 1)], 5),  # true CFG for a and c
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    build, specs, rows = CASES[request.param]
    pipe = load_pipeline(build(tmp_path_factory.mktemp(request.param)), "m", torch.device("cpu"), torch.float32)
    return pipe, specs, rows


def state(pipe, rid: str, seed: int, prompt: str, guidance: float, height: int, width: int, frames: int):
    params = pb.GenerationParams(prompt=prompt, negative_prompt="", height=height, width=width, num_frames=frames,
                                 num_inference_steps=4, guidance_scale=guidance, seed=seed)
    s = pipe.admit(rid, worker_request(params, pipe.card))
    pipe.encode(s)
    pipe.prepare(s)
    return s


def test_requests_of_different_sizes_share_one_packed_forward_and_equal_their_solo_runs(case, monkeypatch):
    pipe, specs, rows = case
    assert pipe.packs
    solo = [state(pipe, *spec) for spec in specs]
    for s in solo:
        for _ in range(2):
            pipe.denoise_step([s])

    model, calls = getattr(pipe, "experts", [pipe.transformer])[0], []
    original = model.forward_packed

    def counted(latents, *args):
        calls.append([tuple(x.shape) for x in latents])
        return original(latents, *args)

    monkeypatch.setattr(model, "forward_packed", counted)
    packed = [state(pipe, *spec) for spec in specs]
    for _ in range(2):
        assert pipe.denoise_step(packed) == rows
    assert len(calls) == 2 and len(calls[0]) == rows and len(set(calls[0])) == 3  # one forward a step, three sizes
    for p, s in zip(packed, solo):
        assert p.latents.shape == s.latents.shape
        torch.testing.assert_close(p.latents, s.latents, atol=1e-5, rtol=1e-5)


def test_same_size_requests_still_stack(case):
    """Equal sizes take the plain batched forward (no packing work)."""
    pipe, specs, _ = case
    a, b = state(pipe, *specs[0]), state(pipe, "b", 2, "a dog", 1.0, *specs[0][4:])
    assert torch.is_tensor(pipe._rows([a, b], [False, False])[1 if hasattr(pipe, "experts") else 0])
