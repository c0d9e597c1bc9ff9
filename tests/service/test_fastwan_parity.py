"""FastWan (FastVideo's DMD-distilled Wan2.1) through the real service equals diffusers' Wan
components driven by FastVideo's DMD step rule, written out here as the reference."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import io

import numpy as np
import pytest
import torch

from diffserve.client import DiffserveError
from diffserve.v1 import generation_pb2 as pb
from jobs_util import npy_output
from reference import max_level_diff
from tests.fixtures.tiny.wan22 import build_tiny_fastwan, build_tiny_fastwan22_ti2v

DMD_STEPS = (1000, 757, 522)  # FastVideo FastWan2_1_T2V_480P_Config.dmd_denoising_steps


@pytest.fixture(scope="module")
def tiny_fastwan(tmp_path_factory):
    return build_tiny_fastwan(tmp_path_factory.mktemp("ckpt") / "tiny-fastwan")


@pytest.fixture(scope="module")
def fastwan_server(tiny_fastwan, tmp_path_factory):
    from conftest import ServerProcess

    server = ServerProcess(tiny_fastwan, tmp_path_factory.mktemp("server"), "--max-batch-size", "4")
    yield server
    server.stop()


@torch.no_grad()
def fastwan_reference(path, *, prompt: str, height: int, width: int, num_frames: int, steps: int, seed: int) -> np.ndarray:
    """diffusers' WanTransformer3DModel / UMT5 / AutoencoderKLWan with FastVideo's DMD loop
    (DmdDenoisingStage): x0 = x_t - sigma_t * v, then x_next = (1 - sigma_next) * x0 + sigma_next * noise
    with fresh noise from the same generator; all noise drawn in FastVideo's (B, F, C, H, W) layout; sigma = nearest entry of
    FlowMatchEulerDiscreteScheduler(shift=8.0)'s training table. No CFG."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    pipe = WanPipeline.from_pretrained(str(path), torch_dtype=torch.float32)  # model_index says WanDMDPipeline
    embeds, _ = pipe.encode_prompt(prompt=prompt, do_classifier_free_guidance=False, max_sequence_length=512)
    table = FlowMatchEulerDiscreteScheduler(shift=8.0)

    def sigma(t: float) -> float:
        return float(table.sigmas[(table.timesteps - t).abs().argmin()])

    generator = torch.Generator("cpu").manual_seed(seed)
    spatial, temporal = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
    shape = (1, pipe.transformer.config.in_channels, (num_frames - 1) // temporal + 1, height // spatial, width // spatial)
    b, c, f, h, w = shape
    latents = torch.randn((b, f, c, h, w), generator=generator, dtype=torch.float32).permute(0, 2, 1, 3, 4)
    timesteps = DMD_STEPS[:steps]
    for i, t in enumerate(timesteps):
        v = pipe.transformer(latents, torch.tensor([float(t)]), embeds, return_dict=False)[0]
        x0 = latents - sigma(t) * v
        if i + 1 < len(timesteps):
            noise = torch.randn((b, f, c, h, w), generator=generator, dtype=torch.float32).permute(0, 2, 1, 3, 4)
            s_next = sigma(timesteps[i + 1])
            latents = (1 - s_next) * x0 + s_next * noise
        else:
            latents = x0
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)
    video = pipe.vae.decode(latents * std + mean, return_dict=False)[0]
    frames = pipe.video_processor.postprocess_video(video, output_type="np")[0]
    return (frames * 255).round().astype(np.uint8)


def run(client, **params) -> np.ndarray:
    job = client.wait(client.submit(output_format="npy", **params).id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    return np.load(io.BytesIO(client.download(job.id)))


def test_card(fastwan_server):
    (model,) = fastwan_server.client.list_models()
    assert model.family == "fastwan2.1" and model.defaults.sampler == "DMD" and model.defaults.flow_shift == 8.0
    d = model.defaults
    assert (d.height, d.width, d.num_frames, d.num_inference_steps, d.guidance_scale, d.fps) == (448, 832, 61, 3, 1.0, 16)
    assert model.limits.max_num_inference_steps == 3 and model.limits.size_multiple == 16
    with pytest.raises(DiffserveError):
        fastwan_server.client.submit(prompt="a cat", height=32, width=32, num_frames=1, num_inference_steps=4)
    # The distilled model runs without CFG: a guidance it would ignore is refused, naming the field.
    assert model.guidance_kind == pb.GUIDANCE_KIND_NONE
    with pytest.raises(DiffserveError) as info:
        fastwan_server.client.submit(prompt="a cat", height=32, width=32, num_frames=1, guidance_scale=5.0)
    assert info.value.code.name == "INVALID_ARGUMENT"
    assert [name for name, _ in info.value.field_violations] == ["params.guidance_scale"]


@pytest.mark.parametrize("num_frames,steps", [(5, 3), (1, 2)])
def test_matches_reference(fastwan_server, tiny_fastwan, num_frames, steps):
    prompt = "a red cat walking on the beach at sunset"
    ours = run(fastwan_server.client, prompt=prompt, height=32, width=48, num_frames=num_frames,
               num_inference_steps=steps, seed=1234)
    ref = fastwan_reference(tiny_fastwan, prompt=prompt, height=32, width=48, num_frames=num_frames, steps=steps, seed=1234)
    assert ours.shape == (num_frames, 32, 48, 3)
    assert ours.std() > 1, "output is flat: the comparison would prove nothing"
    assert max_level_diff(ours, ref) <= 2


def test_concurrent_jobs_equal_solo_and_share_steps(fastwan_server):
    client = fastwan_server.client
    jobs = [dict(prompt="a cat in the snow", seed=11), dict(prompt="a dog on the beach", seed=22),
            dict(prompt="a bird over the sea", seed=33)]
    common = dict(height=32, width=32, num_frames=5, num_inference_steps=3, output_format="npy")
    solo = [npy_output(client, client.submit(**common, **job).id) for job in jobs]
    # Submitted at once (three threads): one after another, the first job's three tiny steps could end
    # before the last submission arrives on a loaded machine (seen once in CI-like runs).
    with ThreadPoolExecutor(len(jobs)) as pool:
        ids = list(pool.map(lambda job: client.submit(**common, **job).id, jobs))
    sizes = [[e.step_completed.batch_jobs for e in client.events(i) if e.WhichOneof("event") == "step_completed"] for i in ids]
    for i, alone in zip(ids, solo):
        assert max_level_diff(npy_output(client, i), alone) <= 2
    assert all(max(s) >= 2 for s in sizes), sizes
    assert not np.array_equal(solo[0], solo[1])


def test_fastwan22_ti2v_matches_reference(tmp_path, start_server):
    """FastWan2.2-TI2V-5B layout (WanDMDPipeline + expand_timesteps + Wan2.2 VAE), text only."""
    ckpt = build_tiny_fastwan22_ti2v(tmp_path / "tiny-fastwan22")
    client = start_server(ckpt).client
    (model,) = client.list_models()
    assert model.family == "fastwan2.2" and model.limits.size_multiple == 32 and model.defaults.num_inference_steps == 3
    ours = run(client, prompt="a cat in the snow", height=64, width=64, num_frames=5, num_inference_steps=3, seed=8)
    ref = fastwan_reference(ckpt, prompt="a cat in the snow", height=64, width=64, num_frames=5, steps=3, seed=8)
    assert ours.std() > 1, "output is flat: the comparison would prove nothing"
    assert max_level_diff(ours, ref) <= 2


def test_step_runs_through_the_forward_hook(tiny_fastwan):
    """The runtime wraps `pipeline.forward` with the cfg row split; FastWan's step must go through it
    (it used to call its transformer directly, so no split could reach its rows)."""
    from diffserve.scheduler.requests import worker_request
    from diffserve.worker.registry import load_pipeline

    pipe = load_pipeline(tiny_fastwan, "m", torch.device("cpu"), torch.float32)
    rows, forward = [], pipe.forward

    def recording(*args):
        rows.append(args[pipe.forward_batched[0]].shape[0])
        return forward(*args)

    pipe.forward = recording
    states = []
    for seed in (1, 2):
        params = pb.GenerationParams(prompt="a cat", negative_prompt="", height=32, width=32, num_frames=1,
                                     num_inference_steps=3, guidance_scale=1.0, seed=seed)
        s = pipe.admit(str(seed), worker_request(params, pipe.card))
        pipe.encode(s)
        pipe.prepare(s)
        states.append(s)
    assert pipe.denoise_step(states) == 2 and rows == [2]


def test_cfg_parallel_splits_batched_rows(fastwan_server, tiny_fastwan, start_server):
    """--enable-cfg-parallel on FastWan (no CFG rows): the cfg axis splits the rows of batched requests
    (3 rows: padded on 2 ranks) and every output equals the single-process one."""
    common = dict(height=32, width=48, num_frames=5, num_inference_steps=3, output_format="npy")
    jobs = [dict(prompt="a cat in the snow", seed=1), dict(prompt="a dog on the beach", seed=2),
            dict(prompt="a bird over the sea", seed=3)]
    solo = [npy_output(fastwan_server.client, fastwan_server.client.submit(**common, **job).id) for job in jobs]
    group = start_server(tiny_fastwan, "--num-gpus", "2", "--enable-cfg-parallel", "--max-batch-size", "4")
    assert len(group.worker_pids()) == 2
    ids = [group.client.submit(**common, **job).id for job in jobs]
    for i, alone in zip(ids, solo):
        ours = npy_output(group.client, i)
        assert ours.std() > 1 and max_level_diff(ours, alone) <= 2


def _split_rank(rank: int, world_size: int, init_method: str, ckpt) -> None:
    from diffserve.scheduler.requests import worker_request
    from diffserve.worker.parallel import ParallelDims, ParallelState
    from diffserve.worker.registry import load_pipeline
    from diffserve.worker.runtime import Runtime

    parallel = ParallelState.init(ParallelDims(cfg=2), rank, init_method, torch.device("cpu"))
    pipe = load_pipeline(ckpt, "m", torch.device("cpu"), torch.float32)
    rows, forward = [], pipe.forward

    def recording(*args):
        rows.append(args[pipe.forward_batched[0]].shape[0])
        return forward(*args)

    pipe.forward = recording
    Runtime(pipe, parallel)  # wraps pipe.forward with the cfg row split

    def states():
        out = []
        for seed in (1, 2, 3):
            params = pb.GenerationParams(prompt=f"a cat {seed}", negative_prompt="", height=32, width=32, num_frames=1,
                                         num_inference_steps=3, guidance_scale=1.0, seed=seed)
            s = pipe.admit(str(seed), worker_request(params, pipe.card))
            pipe.encode(s)
            pipe.prepare(s)
            out.append(s)
        return out

    split, whole = states(), states()
    assert pipe.denoise_step(split) == 3
    assert rows == [2], rows  # 3 rows over 2 cfg ranks: 2 each (the last one repeated on rank 1)
    pipe.forward = forward  # unsplit
    pipe.denoise_step(whole)
    for a, b in zip(split, whole):
        torch.testing.assert_close(a.latents, b.latents, atol=1e-5, rtol=1e-5)


def test_runtime_splits_rows_over_cfg_ranks(tiny_fastwan):
    """gloo, 2 ranks, cfg=2: with the runtime's wrap each rank runs half of a step's rows, and the
    gathered step equals the unsplit one."""
    from dist_util import run_group

    run_group(_split_rank, 2, tiny_fastwan)
