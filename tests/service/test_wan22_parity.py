"""Wan2.2 through the real service equals diffusers' WanPipeline with the same tiny checkpoints.

A14B: two experts switched at boundary_ratio; a batched step may hold requests on both sides of
the boundary, each row going through its own expert. TI2V-5B (text only): expand_timesteps and
the Wan2.2 VAE.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from diffserve.v1 import generation_pb2 as pb
from jobs_util import npy_output, wait_step
from reference import max_level_diff, wan_reference
from tests.fixtures.tiny.wan22 import build_tiny_wan22_a14b, build_tiny_wan22_ti2v

PROMPT, NEGATIVE = "a red cat walking on the beach at sunset", "blurry low quality"


@pytest.fixture(scope="module")
def tiny_a14b(tmp_path_factory):
    return build_tiny_wan22_a14b(tmp_path_factory.mktemp("ckpt") / "tiny-wan22-a14b")


@pytest.fixture(scope="module")
def tiny_ti2v(tmp_path_factory):
    return build_tiny_wan22_ti2v(tmp_path_factory.mktemp("ckpt") / "tiny-wan22-ti2v")


def run(client, **params) -> np.ndarray:
    job = client.submit(output_format="npy", **params)
    job = client.wait(job.id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    return np.load(io.BytesIO(client.download(job.id)))


def step_sizes(client, job_id: str) -> list[int]:
    return [e.step_completed.batch_jobs for e in client.events(job_id) if e.WhichOneof("event") == "step_completed"]


def test_a14b_matches_diffusers_and_batches_across_the_boundary(tiny_a14b, start_server):
    server = start_server(tiny_a14b, "--max-batch-size", "4")
    client = server.client
    (model,) = client.list_models()
    assert model.family == "wan2.2" and model.limits.size_multiple == 16 and model.limits.frame_step == 4
    assert (model.defaults.height, model.defaults.width, model.defaults.num_frames) == (720, 1280, 81)
    assert (model.defaults.num_inference_steps, model.defaults.guidance_scale, model.defaults.fps) == (40, 4.0, 16)
    assert model.defaults.guidance_scale_2 == 3.0  # the low-noise expert's own guidance
    assert model.num_experts == 2  # so it takes guidance_scale_2

    # 4 steps at shift 3: timesteps 999, 900 (high-noise expert) then 750, 500 (low-noise expert).
    params = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=32, width=48, num_frames=5, num_inference_steps=4,
                  guidance_scale=5.0, guidance_scale_2=2.5, seed=1234)
    ours = run(client, **params)
    ref = wan_reference(tiny_a14b, prompt=PROMPT, negative_prompt=NEGATIVE, height=32, width=48, num_frames=5,
                        steps=4, guidance=5.0, guidance_2=2.5, seed=1234)
    assert ours.shape == (5, 32, 48, 3)
    assert ours.std() > 1, "output is flat: the comparison would prove nothing"
    assert max_level_diff(ours, ref) <= 2

    # Batching: the first job is past the boundary (8 steps: 999, 954, 900 high; 833... low) when
    # the others join at step 0, so shared step commands run both experts.
    jobs = [
        dict(prompt="a dog in the snow", negative_prompt="", num_inference_steps=8, seed=11),
        dict(prompt="a bird over the sea", negative_prompt="ugly", num_inference_steps=6, seed=22),
        dict(prompt="a boat on the lake", num_inference_steps=5, seed=33, guidance_scale=1.0),
    ]
    common = dict(height=32, width=32, num_frames=1, output_format="npy")
    solo = [npy_output(client, client.submit(**common, **job).id) for job in jobs]
    first = client.submit(**common, **jobs[0])
    wait_step(client, first.id, 4)
    rest = [client.submit(**common, **job) for job in jobs[1:]]
    ids = [first.id] + [j.id for j in rest]
    sizes = [step_sizes(client, i) for i in ids]
    for i, alone in zip(ids, solo):
        assert max_level_diff(npy_output(client, i), alone) <= 2
    assert all(max(s) >= 2 for s in sizes), sizes


def test_ti2v_matches_diffusers(tiny_ti2v, start_server):
    server = start_server(tiny_ti2v, "--max-batch-size", "4")
    client = server.client
    (model,) = client.list_models()
    assert model.family == "wan2.2" and model.limits.size_multiple == 32  # 16x VAE x 2x2 patches
    assert (model.defaults.height, model.defaults.width, model.defaults.num_frames, model.defaults.fps) == (704, 1280, 121, 24)
    assert (model.defaults.num_inference_steps, model.defaults.guidance_scale, model.defaults.flow_shift) == (50, 5.0, 5.0)

    params = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=64, width=64, num_frames=5, num_inference_steps=4,
                  guidance_scale=5.0, seed=99)
    ours = run(client, **params)
    ref = wan_reference(tiny_ti2v, prompt=PROMPT, negative_prompt=NEGATIVE, height=64, width=64, num_frames=5,
                        steps=4, guidance=5.0, seed=99)
    assert ours.shape == (5, 64, 64, 3)
    assert ours.std() > 1, "output is flat: the comparison would prove nothing"
    assert max_level_diff(ours, ref) <= 2

    # Two concurrent jobs (different seeds and prompts) equal their solo runs and share steps.
    jobs = [dict(prompt="a cat in the snow", num_inference_steps=6, seed=5), dict(prompt="a dog on the beach", num_inference_steps=4, seed=6)]
    common = dict(height=32, width=32, num_frames=1, output_format="npy", negative_prompt="")
    solo = [npy_output(client, client.submit(**common, **job).id) for job in jobs]
    first = client.submit(**common, **jobs[0])
    wait_step(client, first.id, 1)
    second = client.submit(**common, **jobs[1])
    sizes = [step_sizes(client, i) for i in (first.id, second.id)]
    for i, alone in zip((first.id, second.id), solo):
        assert max_level_diff(npy_output(client, i), alone) <= 2
    assert all(max(s) >= 2 for s in sizes), sizes

    # The same WanPipeline checkpoint with an input image: text + image to video, as diffusers'
    # WanImageToVideoPipeline runs it (expand_timesteps: the image's latent frame stays known).
    assert model.task == "text-image-to-video" and not model.limits.image_required and model.limits.max_images == 1
    from test_wan_i2v_parity import i2v_reference, make_png

    png = make_png()
    ours = run(client, images=[png], **params)
    ref = i2v_reference(tiny_ti2v, png, prompt=PROMPT, negative_prompt=NEGATIVE, height=64, width=64, num_frames=5,
                        steps=4, guidance=5.0, seed=99)
    assert ours.std() > 1 and max_level_diff(ours, ref) <= 2
    assert max_level_diff(ours, run(client, **params)) > 2, "the image must change the output"


def test_a14b_batched_step_runs_each_expert_on_its_rows(tiny_a14b):
    """In-process: one denoise_step over requests on both sides of the boundary equals their solo steps."""
    from diffserve.scheduler.requests import worker_request
    from diffserve.worker.registry import load_pipeline

    pipe = load_pipeline(tiny_a14b, "m", torch.device("cpu"), torch.float32)

    def state(rid, seed, prompt, guidance):
        params = pb.GenerationParams(prompt=prompt, negative_prompt="", height=32, width=32, num_frames=1,
                                     num_inference_steps=4, guidance_scale=guidance, seed=seed)
        s = pipe.admit(rid, worker_request(params, pipe.card))
        pipe.encode(s)
        pipe.prepare(s)
        return s

    probe = state("x", 0, "a", 5.0)
    sides = []
    for probe.step in range(4):
        sides.append(pipe.expert_of(probe))
    assert sides == [0, 0, 1, 1]  # timesteps 999, 900 | 750, 500 around the boundary 875
    solo_a, solo_b = state("a", 1, "a cat", 5.0), state("b", 2, "a dog", 1.0)
    for _ in range(2):
        pipe.denoise_step([solo_a])  # a now at its low-noise steps
    pipe.denoise_step([solo_a])
    pipe.denoise_step([solo_b])

    a, b = state("a", 1, "a cat", 5.0), state("b", 2, "a dog", 1.0)
    pipe.denoise_step([a])
    pipe.denoise_step([a])
    assert pipe.expert_of(a) == 1 and pipe.expert_of(b) == 0
    assert pipe.denoise_step([a, b]) == 3  # a: cond + uncond rows (low-noise expert); b: one row (high-noise)
    torch.testing.assert_close(a.latents, solo_a.latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.latents, solo_b.latents, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(
        pipe.experts[0](a.latents, a.timesteps[a.step : a.step + 1], a.cond),
        pipe.experts[1](a.latents, a.timesteps[a.step : a.step + 1], a.cond),
    ), "the two experts must differ for this test to mean anything"
