"""Through the real service (gRPC → scheduler → ZeroMQ → worker), FLUX.1-dev equals diffusers'
FluxPipeline, and concurrent FLUX jobs share step commands while each equals its solo output."""

from __future__ import annotations

from functools import lru_cache

import grpc
import numpy as np
import pytest
import torch

from conftest import ServerProcess
from diffserve.client import DiffserveError
from jobs_util import npy_output, settled, wait_step
from reference import max_level_diff
from tests.fixtures.tiny.flux import build_tiny_flux


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("ckpt") / "tiny-flux")


@pytest.fixture(scope="module")
def flux_server(tiny_flux, tmp_path_factory):
    server = ServerProcess(tiny_flux, tmp_path_factory.mktemp("server"), "--max-batch-size", "4")
    yield server
    server.stop()


@lru_cache(maxsize=1)
def _flux_pipeline(path: str):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(path, torch_dtype=torch.float32)


def flux_reference(path, *, prompt: str, height: int, width: int, steps: int, guidance: float, seed: int) -> np.ndarray:
    """uint8 (1, H, W, 3) from diffusers.FluxPipeline with a CPU generator seeded with `seed`."""
    out = _flux_pipeline(str(path))(
        prompt=prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
    ).images  # (1, H, W, 3) float in [0, 1]
    return (out * 255).round().astype(np.uint8)


@pytest.mark.parametrize(
    "height,width,steps,guidance,seed",
    [(64, 64, 4, 3.5, 1234), (32, 48, 3, 6.0, 7)],
)
def test_matches_diffusers(flux_server, tiny_flux, height, width, steps, guidance, seed):
    client = flux_server.client
    prompt = "a red cat walking on the beach at sunset"
    job = client.submit(prompt=prompt, height=height, width=width, num_frames=1, num_inference_steps=steps,
                        guidance_scale=guidance, seed=seed, output_format="npy")
    ours = npy_output(client, job.id)
    ref = flux_reference(tiny_flux, prompt=prompt, height=height, width=width, steps=steps, guidance=guidance, seed=seed)
    assert ours.shape == (1, height, width, 3)
    assert ours.std() > 1, "output is flat: the comparison would prove nothing"
    assert max_level_diff(ours, ref) <= 2


def test_card_defaults_and_limits(flux_server):
    (model,) = flux_server.client.list_models()
    assert model.family == "flux.1" and model.task == "text-to-image"
    d, lim = model.defaults, model.limits
    assert (d.height, d.width, d.num_frames, d.num_inference_steps) == (1024, 1024, 1, 28)
    assert d.guidance_scale == pytest.approx(3.5) and d.sampler == "FlowMatchEulerDiscreteScheduler"
    assert (lim.size_multiple, lim.max_height, lim.max_width, lim.frame_step, lim.max_num_frames) == (16, 2048, 2048, 1, 1)
    assert lim.max_images == 0 and lim.prompt_required


@pytest.mark.parametrize("bad", [dict(num_frames=5), dict(height=40), dict(width=4096)])
def test_refuses_what_flux_cannot_make(flux_server, bad):
    params = dict(prompt="a cat", height=32, width=32, num_inference_steps=2, output_format="npy") | bad
    with pytest.raises(DiffserveError) as err:
        flux_server.client.submit(**params)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


JOBS = [
    dict(prompt="a cat in the snow", num_inference_steps=16, seed=11, guidance_scale=3.5),
    dict(prompt="a small dog on the beach at night", num_inference_steps=6, seed=22, guidance_scale=5.0),
]
COMMON = dict(height=32, width=32, num_frames=1, output_format="npy")


def test_concurrent_jobs_equal_solo_and_share_steps(tiny_flux, start_server):
    server = start_server(tiny_flux, "--max-batch-size", "4")
    client = server.client
    solo = [npy_output(client, client.submit(**COMMON, **job).id) for job in JOBS]
    before = settled(server, 16 + 6)  # the solo runs' rows, so a heartbeat from between them is not taken for after

    first = client.submit(**COMMON, **JOBS[0])
    wait_step(client, first.id, 2)  # the second joins while the first is at step >= 2
    second = client.submit(**COMMON, **JOBS[1])
    ids = [first.id, second.id]
    sizes = [[e.step_completed.batch_jobs for e in client.events(i) if e.WhichOneof("event") == "step_completed"] for i in ids]
    outputs = [npy_output(client, i) for i in ids]

    for ours, alone in zip(outputs, solo):
        assert ours.std() > 1
        assert max_level_diff(ours, alone) <= 2
    assert not np.array_equal(outputs[0], outputs[1])
    assert len(sizes[0]) == 16 and len(sizes[1]) == 6
    assert all(max(s) >= 2 for s in sizes), sizes
    after = settled(server, 2 * (16 + 6))
    assert after.batched_step_commands > before.batched_step_commands
    assert after.step_commands - before.step_commands < 16 + 6
    assert after.denoise_rows - before.denoise_rows == 16 + 6  # guidance is embedded: one row per job and step
