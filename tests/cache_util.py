"""Step caching tests' shared steps (tests/models/test_*_cache.py): a worker request with a step
cache resolved as the scheduler resolves it, run step by step, and diffusers' pipeline with the
matching hook, with the decisions its hook made."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch

from diffserve.scheduler.cards import public_model
from diffserve.scheduler.requests import worker_request
from diffserve.scheduler.validation import resolve_params
from diffserve.v1 import generation_pb2 as pb
from diffserve.worker.card import model_card
from diffserve.worker.registry import load_pipeline


# Fixtures of the Wan step-caching tests (import them by name into the test module).
@pytest.fixture(scope="module")
def ckpt(tiny_wan):
    """The session's tiny Wan checkpoint."""
    return tiny_wan


@pytest.fixture(scope="module")
def pipe(ckpt):
    """Its worker pipeline, float32 on the CPU."""
    return load_pipeline(ckpt, "m", torch.device("cpu"), torch.float32)


def cached_state(pipe, rid: str, prompt: str, seed: int, cache: dict | None, *, steps: int, height: int = 32, width: int = 32,
                 guidance: float = 5.0, negative_prompt: str | None = ""):
    """An encoded, prepared state; `cache` (StepCache fields) is checked and completed by the
    scheduler's resolve_params against the pipeline's own card."""
    params = pb.GenerationParams(prompt=prompt, height=height, width=width, num_frames=1, num_inference_steps=steps,
                                 guidance_scale=guidance, seed=seed, cache=pb.StepCache(**(cache or {})))
    if negative_prompt is not None:
        params.negative_prompt = negative_prompt
    card = public_model(model_card(pipe))
    s = pipe.admit(rid, worker_request(resolve_params(params, card), card))
    pipe.encode(s)
    pipe.prepare(s)
    return s


def run(pipe, states, steps: int) -> None:
    for _ in range(steps):
        pipe.denoise_step(states)


def frames(pipe, s) -> np.ndarray:
    return pipe.decode(s).astype(np.int16)


def uint8(images) -> np.ndarray:
    """diffusers' output_type="np" (floats in [0, 1]) as our decode's levels."""
    return (np.asarray(images) * 255).round().astype(np.int16)


def decisions(state) -> dict:
    """Per row kind (expert, unconditional): the steps that ran the model (True) or reused the cache."""
    return {key: list(cache.history) for key, cache in state.step_caches.items()}


@contextmanager
def spy(cls, method: str, record):
    """Calls `record(self, result, *args)` after each call of cls.method (a diffusers hook's decision)."""
    original = getattr(cls, method)

    def wrapped(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        record(self, result, *args)
        return result

    setattr(cls, method, wrapped)
    try:
        yield
    finally:
        setattr(cls, method, original)
