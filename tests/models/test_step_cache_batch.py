"""Step caching in batched steps (issue 17): requests of every policy and an exact one, at different
step indices, share the Wan worker's steps; each keeps its own cache state and decisions, and each
equals its solo run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cache_util import cached_state, decisions, frames, run
from diffserve.worker.registry import load_pipeline
from tests.fixtures.tiny.wan import build_tiny_wan

STEPS = 10
REQUESTS = [  # (id, prompt, seed, cache, the step command it joins at)
    ("fbc", "a cat", 7, dict(policy="first-block", threshold=0.2), 0),
    ("taylor", "a dog", 8, dict(policy="taylorseer", interval=3, max_order=2, warmup_steps=2), 1),
    ("mag", "a red fox", 9, dict(policy="mag", threshold=0.06, mag_ratios=[1.0, 1.018, 1.024, 0.990, 1.002, 0.994, 1.011]), 2),
    ("exact", "a bird", 10, None, 3),
]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return load_pipeline(build_tiny_wan(tmp_path_factory.mktemp("tiny_wan")), "m", torch.device("cpu"), torch.float32)


def test_every_policy_and_an_exact_request_share_steps_and_each_equals_its_solo_run(pipe):
    solo = {}
    for rid, prompt, seed, cache, _ in REQUESTS:
        solo[rid] = cached_state(pipe, rid, prompt, seed, cache, steps=STEPS)
        run(pipe, [solo[rid]], STEPS)

    states = {rid: cached_state(pipe, rid, prompt, seed, cache, steps=STEPS) for rid, prompt, seed, cache, _ in REQUESTS}
    last_join = max(join for *_, join in REQUESTS)
    for tick in range(STEPS + last_join):  # one step command for every running request, each at its own step index
        pipe.denoise_step([states[rid] for rid, *_, join in REQUESTS if join <= tick and states[rid].step < STEPS])
    for rid, *_ in REQUESTS:
        s = states[rid]
        assert s.step == STEPS
        assert decisions(s) == decisions(solo[rid]), rid
        np.testing.assert_allclose(frames(pipe, s), frames(pipe, solo[rid]), atol=2)
        torch.testing.assert_close(s.latents, solo[rid].latents, atol=1e-4, rtol=1e-4)
    skipped = {rid: sum(not c for h in decisions(states[rid]).values() for c in h) for rid, *_ in REQUESTS}
    assert all(skipped[rid] > 0 for rid in ("fbc", "taylor", "mag")) and skipped["exact"] == 0
