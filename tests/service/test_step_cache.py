"""Step caching through the service (issue 17): ListModels offers First-Block Cache, TaylorSeer and
MagCache for Wan, a job that asks for First-Block Cache or TaylorSeer draws what diffusers' WanPipeline
draws with the same hook, Job.params shows the knobs used, and a policy the model does not offer (or
a knob its policy does not take) is refused naming the field."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffserve.client.client import DiffserveError
from jobs_util import npy_output
from reference import max_level_diff

PARAMS = dict(prompt="a cat in the snow", negative_prompt="", height=32, width=32, num_frames=1, num_inference_steps=10,
              guidance_scale=5.0, seed=7, output_format="npy")


def reference_with_cache(path, config) -> np.ndarray:
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.enable_cache(config)
    out = pipe(PARAMS["prompt"], negative_prompt="", height=32, width=32, num_frames=1, num_inference_steps=10, guidance_scale=5.0,
               output_type="np", generator=torch.Generator().manual_seed(7)).frames[0]
    return (out * 255).round().astype(np.uint8)


def test_jobs_with_a_step_cache_match_diffusers_hooks(tiny_wan, start_server):
    from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

    server = start_server(tiny_wan)
    client = server.client
    (model,) = client.list_models()
    assert list(model.cache_policies) == ["first-block", "taylorseer", "mag"]
    job = client.submit(**PARAMS, cache="first-block:0.2")
    ours = npy_output(client, job.id)
    assert client.get(job.id).params.cache.policy == "first-block"
    assert max_level_diff(ours, reference_with_cache(tiny_wan, FirstBlockCacheConfig(threshold=0.2))) <= 2

    job = client.submit(**PARAMS, cache="taylorseer:interval=3:max_order=2")
    ours = npy_output(client, job.id)
    used = client.get(job.id).params.cache
    assert (used.policy, used.interval, used.max_order, used.warmup_steps) == ("taylorseer", 3, 2, 3)  # warm-up: the default
    expected = reference_with_cache(tiny_wan, TaylorSeerCacheConfig(cache_interval=3, max_order=2, use_lite_mode=True,
                                                                    taylor_factors_dtype=torch.float32))
    assert max_level_diff(ours, expected) <= 2

    with pytest.raises(DiffserveError, match="INVALID_ARGUMENT: params.cache.policy: .* no step-caching policy 'teacache'"):
        client.submit(**PARAMS, cache="teacache:0.1")
    with pytest.raises(DiffserveError, match="INVALID_ARGUMENT: params.cache.mag_ratios: mag needs the model's magnitude ratios"):
        client.submit(**PARAMS, cache="mag:0.06")
