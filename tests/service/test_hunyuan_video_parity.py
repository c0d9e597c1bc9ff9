"""Through the real service, HunyuanVideo T2V equals diffusers' HunyuanVideoPipeline, and concurrent
jobs (different prompts, so different text lengths) share step commands and equal their solo runs."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch

from jobs_util import npy_output, settled, wait_step
from reference import max_level_diff
from tests.fixtures.tiny.hunyuan_video import build_tiny_hunyuan_video

from diffserve.v1 import generation_pb2 as pb


@pytest.fixture(scope="module")
def tiny_hunyuan(tmp_path_factory):
    return build_tiny_hunyuan_video(tmp_path_factory.mktemp("ckpt") / "tiny-hunyuan-video")


@lru_cache(maxsize=1)
def _reference_pipeline(path: str):
    from diffusers import HunyuanVideoPipeline

    pipe = HunyuanVideoPipeline.from_pretrained(path, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def hunyuan_reference(path, *, prompt, height, width, num_frames, steps, guidance, seed) -> np.ndarray:
    """uint8 (F, H, W, 3) from diffusers.HunyuanVideoPipeline with a CPU generator seeded with `seed`."""
    out = _reference_pipeline(str(path))(
        prompt=prompt, height=height, width=width, num_frames=num_frames, num_inference_steps=steps,
        guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
    ).frames[0]
    return (out * 255).round().astype(np.uint8)


def test_card_and_matches_diffusers(tiny_hunyuan, start_server):
    server = start_server(tiny_hunyuan, "--max-batch-size", "4")
    client = server.client
    (model,) = client.list_models()
    d, lim = model.defaults, model.limits
    assert (d.height, d.width, d.num_frames, d.num_inference_steps, d.fps) == (720, 1280, 129, 50, 24)
    assert d.guidance_scale == pytest.approx(6.0) and d.flow_shift == pytest.approx(7.0)
    assert d.sampler == "FlowMatchEulerDiscreteScheduler"
    assert (lim.size_multiple, lim.frame_step, lim.max_num_frames, lim.max_images) == (16, 4, 129, 0)

    outputs = []
    for num_frames, size, seed in ((5, (32, 48), 1234), (1, (64, 32), 5)):
        params = dict(prompt="a red cat walking on the beach at sunset", height=size[0], width=size[1],
                      num_frames=num_frames, num_inference_steps=4, guidance_scale=6.0, seed=seed)
        ours = npy_output(client, client.submit(output_format="npy", **params).id)
        ref = hunyuan_reference(tiny_hunyuan, prompt=params["prompt"], height=size[0], width=size[1],
                                num_frames=num_frames, steps=4, guidance=6.0, seed=seed)
        assert ours.shape == (num_frames, *size, 3)
        assert ours.std() > 1, "output is flat: the comparison would prove nothing"
        assert max_level_diff(ours, ref) <= 2
        outputs.append(ours)

    # A different prompt (same seed) changes the output, and it still equals the reference.
    other = dict(prompt="a dog", height=32, width=48, num_frames=5, num_inference_steps=4, guidance_scale=3.0, seed=1234)
    ours_other = npy_output(client, client.submit(output_format="npy", **other).id)
    ref_other = hunyuan_reference(tiny_hunyuan, prompt="a dog", height=32, width=48, num_frames=5, steps=4, guidance=3.0, seed=1234)
    assert max_level_diff(ours_other, ref_other) <= 2
    assert max_level_diff(ours_other, outputs[0]) > 2


def test_concurrent_jobs_equal_solo_and_share_steps(tiny_hunyuan, start_server):
    server = start_server(tiny_hunyuan, "--max-batch-size", "4")
    client = server.client
    common = dict(height=32, width=32, num_frames=5, output_format="npy")
    jobs = [
        dict(prompt="a cat in the snow with a small red book on a table", num_inference_steps=8, seed=11),
        dict(prompt="a dog", num_inference_steps=5, seed=22, guidance_scale=4.0),
    ]
    solo = [npy_output(client, client.submit(**common, **job).id) for job in jobs]

    first = client.submit(**common, **jobs[0])
    wait_step(client, first.id, 2)  # the second joins while the first is at step >= 2
    second = client.submit(**common, **jobs[1])
    ids = [first.id, second.id]
    batched = [[e.step_completed.batch_jobs for e in client.events(i) if e.WhichOneof("event") == "step_completed"] for i in ids]
    outputs = [npy_output(client, i) for i in ids]

    for ours, alone in zip(outputs, solo):
        assert ours.std() > 1
        assert max_level_diff(ours, alone) <= 2
    assert all(max(sizes) >= 2 for sizes in batched), batched
    assert len(batched[0]) == 8 and len(batched[1]) == 5
    # Worker counters arrive with heartbeats: a heartbeat from between the solo runs and the
    # concurrent ones also shows no resident job, so wait for all the rows.
    status = settled(server, 2 * (8 + 5))
    assert status.batched_step_commands >= 1
    assert status.denoise_rows == 2 * (8 + 5)  # solo + concurrent runs, one row per job and step (no CFG rows)
    assert client.get(first.id).state == pb.JOB_STATE_SUCCEEDED
