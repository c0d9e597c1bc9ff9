"""First-Block Cache per request (issue 17, step caching) in the FLUX and Qwen-Image worker pipelines,
against diffusers' own hook (FirstBlockCacheConfig on FluxPipeline's / QwenImagePipeline's
transformer): the same passes skipped, the same picture, alone, batched with an uncached request at
another step, and in one step with an uncached request of another size (rows that would pack)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cache_util import cached_state, decisions, frames, run, spy, uint8
from diffserve.worker.registry import load_pipeline
from tests.fixtures.tiny.flux import build_tiny_flux
from tests.fixtures.tiny.qwen_image import build_tiny_qwen_image

STEPS = 10
# family: (builder, threshold, guidance, negative prompt). The thresholds skip some passes on the tiny
# random checkpoints and stay clear of every ratio they see (measured: by 0.035 and 0.064).
CASES = {
    "flux": (build_tiny_flux, 0.52, 3.5, ""),  # embedded guidance: one row, one cache context
    "qwen-image": (build_tiny_qwen_image, 1.2, 4.0, " "),  # true CFG: cond and uncond contexts
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    build, threshold, guidance, negative = CASES[request.param]
    ckpt = build(tmp_path_factory.mktemp(request.param))
    pipe = load_pipeline(ckpt, "m", torch.device("cpu"), torch.float32)
    return request.param, ckpt, pipe, threshold, dict(guidance=guidance, negative_prompt=negative)


def reference(family: str, ckpt, prompt: str, seed: int, threshold: float, guidance: float, negative_prompt: str):
    """diffusers' pipeline with its First-Block Cache hook; per cache context, which passes ran every block."""
    import diffusers
    from diffusers.hooks import FirstBlockCacheConfig
    from diffusers.hooks.first_block_cache import FBCHeadBlockHook

    if family == "flux":
        ref, extra = diffusers.FluxPipeline.from_pretrained(ckpt), dict(guidance_scale=guidance)
    else:
        ref = diffusers.QwenImagePipeline.from_pretrained(ckpt)
        extra = dict(true_cfg_scale=guidance, negative_prompt=negative_prompt)
    ref.set_progress_bar_config(disable=True)
    ref.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    ran: dict[int, list[bool]] = {}

    def record(hook, compute, *args):
        ran.setdefault(id(hook.state_manager.get_state()), []).append(compute)

    with spy(FBCHeadBlockHook, "_should_compute_remaining_blocks", record):
        out = ref(prompt=prompt, height=32, width=32, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed),
                  output_type="np", **extra).images
    return uint8(out), list(ran.values())


def test_a_cached_request_skips_what_diffusers_skips_and_draws_the_same(case):
    family, ckpt, pipe, threshold, kwargs = case
    assert "first-block" in pipe.cache_policies
    ours = cached_state(pipe, "a", "a cat", 7, dict(policy="first-block", threshold=threshold), steps=STEPS, **kwargs)
    run(pipe, [ours], STEPS)
    expected, contexts = reference(family, ckpt, "a cat", 7, threshold, kwargs["guidance"], kwargs["negative_prompt"])
    mine = decisions(ours)
    assert [mine[key] for key in sorted(mine)] == contexts  # (0, False): cond first, then (0, True): uncond
    assert 2 <= sum(contexts[0]) < STEPS, "the threshold must skip some passes, not all"
    assert frames(pipe, ours).shape == expected.shape
    assert np.abs(frames(pipe, ours) - expected).max() <= 2
    exact = cached_state(pipe, "x", "a cat", 7, None, steps=STEPS, **kwargs)
    run(pipe, [exact], STEPS)
    assert (exact.latents - ours.latents).abs().max() > 1e-3  # skipping changed the result


@pytest.mark.parametrize("other_height", [32, 48])  # 48: the exact request would pack with the cached one
def test_batched_with_an_uncached_request_each_equals_its_solo_run(case, other_height):
    family, _, pipe, threshold, kwargs = case
    cache = dict(policy="first-block", threshold=threshold)

    def pair():
        return (cached_state(pipe, "a", "a cat", 7, cache, steps=STEPS, **kwargs),
                cached_state(pipe, "b", "a red dog", 8, None, steps=STEPS, height=other_height, **kwargs))

    solo_cached, solo_exact = pair()
    run(pipe, [solo_cached], STEPS)
    run(pipe, [solo_exact], STEPS)
    cached, exact = pair()
    run(pipe, [exact], 3)  # b is 3 steps ahead
    run(pipe, [cached, exact], STEPS - 3)
    run(pipe, [cached], 3)
    assert decisions(cached) == decisions(solo_cached) and solo_cached.step_caches[(0, False)].skipped > 0
    np.testing.assert_allclose(frames(pipe, cached), frames(pipe, solo_cached), atol=2)
    np.testing.assert_allclose(frames(pipe, exact), frames(pipe, solo_exact), atol=2)
    torch.testing.assert_close(cached.latents, solo_cached.latents, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(exact.latents, solo_exact.latents, atol=1e-4, rtol=1e-4)
