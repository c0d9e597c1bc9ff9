"""The batching policy: stages first, then one step for same-shape jobs, oldest first, capped."""

from __future__ import annotations

import asyncio

import pytest

from diffserve.scheduler.jobs import Job
from diffserve.scheduler.lifecycle import Phase
from diffserve.scheduler.policy import next_plan
from diffserve.v1 import generation_pb2 as pb


@pytest.fixture(autouse=True)
def event_loop_for_jobs():
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield
    loop.close()


def job(age: float, phase: Phase = Phase.DENOISE, height: int = 32, step: int = 0) -> Job:
    j = Job(params=pb.GenerationParams(prompt="x", height=height, width=32, num_frames=1, num_inference_steps=10))
    j.phase, j.admitted_at, j.step = phase, age, step
    return j


def test_stage_before_denoise():
    a, b = job(1), job(2, phase=Phase.ENCODE)
    plan = next_plan([a, b], 4)
    assert plan.stage == pb.STAGE_ENCODE and plan.jobs == [b]


def test_same_shape_batched_across_steps_oldest_first():
    a, b, c, d = job(1, step=5), job(2, height=64), job(3, step=1), job(4)
    plan = next_plan([d, c, b, a], 2)
    assert plan.stage == pb.STAGE_DENOISE and plan.jobs == [a, c]


def test_in_flight_and_done_jobs_skipped():
    a, b = job(1), job(2)
    a.in_flight = True
    b.phase = Phase.CANCELLED
    assert next_plan([a, b], 4) is None
