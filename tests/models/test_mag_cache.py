"""MagCache per request (issue 17, step caching) in the Wan worker pipeline, against diffusers' own
hooks (MagCacheConfig on WanPipeline's transformer): our calibration gives diffusers' magnitude
ratios, and with ratios given a request skips the steps diffusers skips and draws the same picture,
alone and batched with an uncached request at another step; a skipping row leaves the block stack."""

from __future__ import annotations

import numpy as np
import torch

from bench.mag_calibrate import calibrate
from cache_util import cached_state, ckpt, decisions, frames, pipe, run, spy, uint8  # noqa: F401 (ckpt, pipe: fixtures)
from diffserve.v1 import generation_pb2 as pb

STEPS = 10
# Calibrated on the tiny checkpoint (test_our_calibration_gives_diffusers_ratios), 7 entries for
# 10 steps so that the nearest-neighbour interpolation runs too.
RATIOS = [1.0, 1.01822, 1.02447, 0.99043, 1.00217, 0.99450, 1.01088]
THRESHOLD = 0.06


def reference(ckpt, prompt: str, seed: int, **config) -> tuple[np.ndarray, list[list[bool]], list[list[float]]]:
    """diffusers' WanPipeline with its MagCache hooks; per cache context (cond, then uncond) the
    steps that ran the blocks and, when calibrating, the ratios."""
    from diffusers import WanPipeline
    from diffusers.hooks import MagCacheConfig
    from diffusers.hooks.mag_cache import MagCacheBlockHook, MagCacheHeadHook

    ran: dict[int, list[bool]] = {}
    ratios: dict[int, list[float]] = {}

    def head(hook, result, *args):
        state = hook.state_manager.get_state()
        ran.setdefault(id(state), []).append(state.should_compute)

    def calibration(hook, result, state, residual):
        ratios[id(state)] = list(state.calibration_ratios)

    # Spies first: the registry binds a hook's new_forward when the hook is registered.
    with spy(MagCacheHeadHook, "new_forward", head), spy(MagCacheBlockHook, "_perform_calibration_step", calibration):
        ref = WanPipeline.from_pretrained(ckpt)
        ref.set_progress_bar_config(disable=True)
        ref.transformer.enable_cache(MagCacheConfig(num_inference_steps=STEPS, **config))
        out = ref(prompt, negative_prompt="", height=32, width=32, num_frames=1, num_inference_steps=STEPS, guidance_scale=5.0,
                  output_type="np", generator=torch.Generator().manual_seed(seed)).frames[0]
    return uint8(out), list(ran.values()), list(ratios.values())


def test_our_calibration_gives_diffusers_ratios(ckpt, pipe):
    ours = calibrate(pipe, pb.GenerationParams(prompt="a cat", negative_prompt="", height=32, width=32, num_frames=1,
                                               num_inference_steps=STEPS, guidance_scale=5.0, seed=7))
    _, _, expected = reference(ckpt, "a cat", 7, calibrate=True)
    assert list(ours) == ["cond", "uncond"] and len(ours["cond"]) == STEPS
    np.testing.assert_allclose([ours["cond"], ours["uncond"]], expected, rtol=1e-4)
    assert all(min(abs(r - c) for c in ours["cond"]) < 1e-4 for r in RATIOS), "RATIOS are this checkpoint's"


def test_a_cached_request_skips_what_diffusers_skips_and_draws_the_same(ckpt, pipe):
    cache = dict(policy="mag", threshold=THRESHOLD, mag_ratios=RATIOS)  # max_skip_steps 3, warm-up 2 steps: the defaults
    ours = cached_state(pipe, "a", "a cat", 7, cache, steps=STEPS)
    run(pipe, [ours], STEPS)
    expected, contexts, _ = reference(ckpt, "a cat", 7, threshold=THRESHOLD, mag_ratios=RATIOS)
    mine = decisions(ours)
    assert [mine[(0, False)], mine[(0, True)]] == contexts
    assert 2 <= sum(contexts[0]) < STEPS, "the threshold must skip some steps, not all"
    assert np.abs(frames(pipe, ours) - expected).max() <= 2
    exact = cached_state(pipe, "x", "a cat", 7, None, steps=STEPS)
    run(pipe, [exact], STEPS)
    assert (exact.latents - ours.latents).abs().max() > 1e-3  # skipping changed the result


def test_knobs_reach_the_rule_as_diffusers_reads_them(ckpt, pipe):
    """max_skip_steps and warmup_steps (diffusers' retention_ratio, as a step count)."""
    cache = dict(policy="mag", threshold=0.2, mag_ratios=RATIOS, max_skip_steps=2, warmup_steps=4)
    ours = cached_state(pipe, "a", "a cat", 7, cache, steps=STEPS)
    run(pipe, [ours], STEPS)
    expected, contexts, _ = reference(ckpt, "a cat", 7, threshold=0.2, mag_ratios=RATIOS, max_skip_steps=2, retention_ratio=0.4)
    assert [decisions(ours)[(0, False)], decisions(ours)[(0, True)]] == contexts
    assert contexts[0][:4] == [True] * 4 and True in contexts[0][4:] and False in contexts[0]
    assert np.abs(frames(pipe, ours) - expected).max() <= 2


def test_batched_with_an_uncached_request_at_another_step_each_equals_its_solo_run(pipe, monkeypatch):
    cache = dict(policy="mag", threshold=THRESHOLD, mag_ratios=RATIOS)
    solo_cached, solo_exact = cached_state(pipe, "a", "a cat", 7, cache, steps=STEPS), cached_state(pipe, "b", "a dog", 8, None, steps=STEPS)
    run(pipe, [solo_cached], STEPS)
    run(pipe, [solo_exact], STEPS)
    schedule = decisions(solo_cached)[(0, False)]

    model, rows = pipe.experts[0], []
    original = model.blocks[0].forward

    def counted(x, *args, **kwargs):
        rows.append(x.shape[0])
        return original(x, *args, **kwargs)

    monkeypatch.setattr(model.blocks[0], "forward", counted)
    cached, exact = cached_state(pipe, "a", "a cat", 7, cache, steps=STEPS), cached_state(pipe, "b", "a dog", 8, None, steps=STEPS)
    run(pipe, [exact], 3)  # b is 3 steps ahead
    rows.clear()
    run(pipe, [cached, exact], STEPS - 3)
    # A skipping step's two rows never reach the blocks: 4 rows where a runs them, b's 2 where it skips.
    assert rows == [4 if compute else 2 for compute in schedule[: STEPS - 3]] and 2 in rows
    run(pipe, [cached], 3)
    np.testing.assert_allclose(frames(pipe, cached), frames(pipe, solo_cached), atol=2)
    np.testing.assert_allclose(frames(pipe, exact), frames(pipe, solo_exact), atol=2)
    torch.testing.assert_close(cached.latents, solo_cached.latents, atol=1e-4, rtol=1e-4)
