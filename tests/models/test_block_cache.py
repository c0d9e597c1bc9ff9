"""First-Block Cache per request (issue 17, step caching) in the Wan worker pipeline, against
diffusers' own implementation (diffusers.hooks.FirstBlockCacheConfig on WanPipeline's transformer):
the same threshold skips the same steps and draws the same picture, alone and batched with an
uncached request at another step."""

from __future__ import annotations

import numpy as np
import torch

from cache_util import ckpt, frames, pipe, run  # noqa: F401 (ckpt, pipe: fixtures)
from diffserve.scheduler.requests import worker_request
from diffserve.v1 import generation_pb2 as pb

THRESHOLD = 0.2  # on the tiny random checkpoint this skips most steps (measured: 4 of 20 passes computed)
STEPS = 10


def state(pipe, rid: str, prompt: str, seed: int, threshold: float | None, height: int = 32):
    params = pb.GenerationParams(prompt=prompt, negative_prompt="", height=height, width=32, num_frames=1,
                                 num_inference_steps=STEPS, guidance_scale=5.0, seed=seed)
    request = worker_request(params, pipe.card)
    if threshold is not None:
        request.cache.policy, request.cache.threshold = "first-block", threshold
    s = pipe.admit(rid, request)
    pipe.encode(s)
    pipe.prepare(s)
    return s


def reference(ckpt, prompt: str, seed: int, threshold: float) -> tuple[np.ndarray, list[bool]]:
    """diffusers' WanPipeline with its First-Block Cache hook; also which passes ran every block."""
    import diffusers.hooks.first_block_cache as fbc
    from diffusers import WanPipeline
    from diffusers.hooks import FirstBlockCacheConfig

    ref = WanPipeline.from_pretrained(ckpt)
    ref.set_progress_bar_config(disable=True)
    ref.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    decisions, original = [], fbc.FBCHeadBlockHook._should_compute_remaining_blocks

    def spy(self, residual):
        decisions.append(original(self, residual))
        return decisions[-1]

    fbc.FBCHeadBlockHook._should_compute_remaining_blocks = spy
    try:
        out = ref(prompt, negative_prompt="", height=32, width=32, num_frames=1, num_inference_steps=STEPS, guidance_scale=5.0,
                  output_type="np", generator=torch.Generator().manual_seed(seed)).frames[0]
    finally:
        fbc.FBCHeadBlockHook._should_compute_remaining_blocks = original
    return (out * 255).round().astype(np.int16), decisions



def test_a_cached_request_skips_what_diffusers_skips_and_draws_the_same(ckpt, pipe):
    ours = state(pipe, "a", "a cat", 7, THRESHOLD)
    run(pipe, [ours], STEPS)
    expected, decisions = reference(ckpt, "a cat", 7, THRESHOLD)
    caches = ours.step_caches
    computed = sum(c.computed for c in caches.values())
    assert computed + sum(c.skipped for c in caches.values()) == len(decisions) == 2 * STEPS
    assert computed == sum(decisions) and 2 <= computed < 2 * STEPS, "the threshold must skip some passes, not all"
    assert np.abs(frames(pipe, ours) - expected).max() <= 2
    exact = state(pipe, "x", "a cat", 7, None)
    run(pipe, [exact], STEPS)
    # Skipping must change the result for the test to mean anything (on these random weights the
    # change stays under 2 levels in pixels, so it is checked on the latents).
    assert (exact.latents - ours.latents).abs().max() > 1e-3


def test_batched_with_an_uncached_request_at_another_step_each_equals_its_solo_run(pipe, monkeypatch):
    solo_cached, solo_exact = state(pipe, "a", "a cat", 7, THRESHOLD), state(pipe, "b", "a dog", 8, None)
    run(pipe, [solo_cached], STEPS)
    run(pipe, [solo_exact], STEPS)

    model, calls = pipe.experts[0], []
    original = model.forward_cached

    def counted(latents, timestep, context, image, caches):
        calls.append([c is None for c in caches])
        return original(latents, timestep, context, image, caches)

    monkeypatch.setattr(model, "forward_cached", counted)
    cached, exact = state(pipe, "a", "a cat", 7, THRESHOLD), state(pipe, "b", "a dog", 8, None)
    run(pipe, [exact], 3)  # b is 3 steps ahead
    run(pipe, [cached, exact], STEPS - 3)  # shared steps: a's rows skip or run, b's always run
    # One forward a shared step for all four rows (a's cond and uncond with caches, b's two without).
    assert calls == [[False, False, True, True]] * (STEPS - 3)
    run(pipe, [cached], 3)
    np.testing.assert_allclose(frames(pipe, cached), frames(pipe, solo_cached), atol=2)
    np.testing.assert_allclose(frames(pipe, exact), frames(pipe, solo_exact), atol=2)
    assert sum(c.skipped for c in cached.step_caches.values()) > 0


def test_a_cached_request_and_an_exact_one_of_another_size_each_equal_their_solo_runs(pipe):
    """Packing is on (one process), but a cached row does not pack: one cached forward per size."""
    solo = [state(pipe, "a", "a cat", 7, THRESHOLD), state(pipe, "b", "a dog", 8, None, height=48)]
    for s in solo:
        run(pipe, [s], STEPS)
    both = [state(pipe, "a", "a cat", 7, THRESHOLD), state(pipe, "b", "a dog", 8, None, height=48)]
    run(pipe, both, STEPS)
    for s, alone in zip(both, solo):
        np.testing.assert_allclose(frames(pipe, s), frames(pipe, alone), atol=2)
