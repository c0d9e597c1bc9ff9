"""Step caching through the service (issue 17): ListModels offers First-Block Cache for Wan, a job
that asks for it draws what diffusers' WanPipeline draws with its FirstBlockCache hook at the same
threshold, and a policy the model does not offer is refused naming the field."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffserve.client.client import DiffserveError
from jobs_util import npy_output
from reference import max_level_diff

PARAMS = dict(prompt="a cat in the snow", negative_prompt="", height=32, width=32, num_frames=1, num_inference_steps=10,
              guidance_scale=5.0, seed=7, output_format="npy")


def reference_with_cache(path, threshold: float) -> np.ndarray:
    from diffusers import WanPipeline
    from diffusers.hooks import FirstBlockCacheConfig

    pipe = WanPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    out = pipe(PARAMS["prompt"], negative_prompt="", height=32, width=32, num_frames=1, num_inference_steps=10, guidance_scale=5.0,
               output_type="np", generator=torch.Generator().manual_seed(7)).frames[0]
    return (out * 255).round().astype(np.uint8)


def test_a_job_with_first_block_cache_matches_diffusers_hook(tiny_wan, start_server):
    server = start_server(tiny_wan)
    client = server.client
    (model,) = client.list_models()
    assert list(model.cache_policies) == ["first-block"]
    job = client.submit(**PARAMS, cache="first-block:0.2")
    ours = npy_output(client, job.id)
    assert client.get(job.id).params.cache.policy == "first-block"
    assert max_level_diff(ours, reference_with_cache(tiny_wan, 0.2)) <= 2
    with pytest.raises(DiffserveError, match="INVALID_ARGUMENT: params.cache.policy: .* no step-caching policy 'taylorseer'"):
        client.submit(**PARAMS, cache="taylorseer:0.1")
