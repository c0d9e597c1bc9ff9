"""TaylorSeer per request (issue 17, step caching) in the Wan worker pipeline, against diffusers' own
hook (TaylorSeerCacheConfig in lite mode on WanPipeline's transformer, factors in float32 as the
model): the same steps run, the same picture, alone and batched with an uncached request at another
step; a predicted row leaves the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cache_util import cached_state, ckpt, decisions, frames, pipe, run, spy, uint8  # noqa: F401 (ckpt, pipe: fixtures)

STEPS = 10
CACHE = dict(policy="taylorseer", interval=3, max_order=2, warmup_steps=2)
# Steps 0-1 warm up, then one in three runs: (s - 2 - 1) % 3 == 0.
SCHEDULE = [True, True, False, True, False, False, True, False, False, True]


def reference(ckpt, prompt: str, seed: int, **config) -> tuple[np.ndarray, list[list[bool]]]:
    """diffusers' WanPipeline with its TaylorSeer hook; also, per cache context (cond, then uncond),
    which steps ran the model (the decisions of the hook on proj_out, the one that predicts)."""
    from diffusers import WanPipeline
    from diffusers.hooks import TaylorSeerCacheConfig
    from diffusers.hooks.taylorseer_cache import TaylorSeerCacheHook

    ref = WanPipeline.from_pretrained(ckpt)
    ref.set_progress_bar_config(disable=True)
    ref.transformer.enable_cache(TaylorSeerCacheConfig(use_lite_mode=True, taylor_factors_dtype=torch.float32, **config))
    seen: dict[int, list[bool]] = {}

    def record(hook, result, *args):
        compute, state = result
        if not state.is_inactive:
            seen.setdefault(id(state), []).append(compute)

    with spy(TaylorSeerCacheHook, "_measure_should_compute", record):
        out = ref(prompt, negative_prompt="", height=32, width=32, num_frames=1, num_inference_steps=STEPS, guidance_scale=5.0,
                  output_type="np", generator=torch.Generator().manual_seed(seed)).frames[0]
    return uint8(out), list(seen.values())


@pytest.mark.parametrize("cache,config", [
    (CACHE, dict(cache_interval=3, max_order=2, disable_cache_before_step=2)),
    (dict(policy="taylorseer", cooldown_step=8), dict(disable_cache_after_step=8)),  # the defaults: interval 5, order 1, warm-up 3
])
def test_a_cached_request_runs_the_steps_diffusers_runs_and_draws_the_same(ckpt, pipe, cache, config):
    ours = cached_state(pipe, "a", "a cat", 7, cache, steps=STEPS)
    run(pipe, [ours], STEPS)
    expected, contexts = reference(ckpt, "a cat", 7, **config)
    mine = decisions(ours)
    assert [mine[(0, False)], mine[(0, True)]] == contexts
    assert 2 <= sum(contexts[0]) < STEPS, "the schedule must predict some steps, not all"
    assert np.abs(frames(pipe, ours) - expected).max() <= 2
    exact = cached_state(pipe, "x", "a cat", 7, None, steps=STEPS)
    run(pipe, [exact], STEPS)
    # Predicting must change the result for the test to mean anything (on these random weights the
    # change stays within a level or two in pixels, so it is checked on the latents).
    assert (exact.latents - ours.latents).abs().max() > 1e-3


def test_batched_with_an_uncached_request_at_another_step_each_equals_its_solo_run(pipe, monkeypatch):
    solo_cached, solo_exact = cached_state(pipe, "a", "a cat", 7, CACHE, steps=STEPS), cached_state(pipe, "b", "a dog", 8, None, steps=STEPS)
    run(pipe, [solo_cached], STEPS)
    run(pipe, [solo_exact], STEPS)
    assert decisions(solo_cached)[(0, False)] == SCHEDULE

    model, rows = pipe.experts[0], []
    original = model._embed

    def counted(latents, *args):
        rows.append(latents.shape[0])
        return original(latents, *args)

    monkeypatch.setattr(model, "_embed", counted)
    cached, exact = cached_state(pipe, "a", "a cat", 7, CACHE, steps=STEPS), cached_state(pipe, "b", "a dog", 8, None, steps=STEPS)
    run(pipe, [exact], 3)  # b is 3 steps ahead
    rows.clear()
    run(pipe, [cached, exact], STEPS - 3)  # shared steps: a's rows run or predict, b's always run
    # A predicted step's two rows never reach the model: 4 rows where a runs, b's 2 where it predicts.
    assert rows == [4 if compute else 2 for compute in SCHEDULE[: STEPS - 3]]
    run(pipe, [cached], 3)
    np.testing.assert_allclose(frames(pipe, cached), frames(pipe, solo_cached), atol=2)
    np.testing.assert_allclose(frames(pipe, exact), frames(pipe, solo_exact), atol=2)
    torch.testing.assert_close(cached.latents, solo_cached.latents, atol=1e-4, rtol=1e-4)
