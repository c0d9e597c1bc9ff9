"""Wan image-to-video through the real service equals diffusers' WanImageToVideoPipeline.

Three tiny variants: Wan2.1 I2V (CLIP image K/V cross-attention + first-frame condition channels),
Wan2.2 I2V-A14B (two experts switched at boundary_ratio) and Wan2.2 TI2V-5B with an image
(expand_timesteps: per-token timesteps, Wan2.2 VAE). Plus batching: concurrent I2V jobs equal their
solo outputs, also when their steps fall on different experts.
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ServerProcess
from jobs_util import npy_output, wait_step
from reference import max_level_diff
from tests.fixtures.tiny.wan_i2v import BUILDERS

# variant -> (height, width) of the test requests (multiples of 16, or 32 for the Wan2.2 VAE)
SIZES = {"wan21-i2v": (32, 48), "wan22-i2v": (32, 48), "wan22-ti2v": (64, 32)}


def make_png(width: int = 56, height: int = 40, shift: int = 0) -> bytes:
    """A structured RGB test image whose size differs from the requests' (so it gets resized)."""
    y, x = np.mgrid[0:height, 0:width]
    a = np.stack([(x * 4 + shift) % 256, y * 6 % 256, (x + y) * 3 % 256], -1).astype(np.uint8)
    a[10:20, 15 + shift % 10 : 35] = [250, 30, 60]
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("i2v-ckpt")
    return {name: build(root / name) for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def servers(checkpoints, tmp_path_factory):
    """One server per variant, shared by the module's tests; started and stopped side by side."""
    from concurrent.futures import ThreadPoolExecutor

    def start(variant: str) -> ServerProcess:
        return ServerProcess(checkpoints[variant], tmp_path_factory.mktemp(f"srv-{variant}"), "--max-batch-size", "4", "--http-port", "0")

    with ThreadPoolExecutor(len(checkpoints)) as pool:
        started = dict(zip(checkpoints, pool.map(start, checkpoints)))
    yield started.__getitem__
    with ThreadPoolExecutor(len(started)) as pool:
        list(pool.map(ServerProcess.stop, started.values()))


@lru_cache(maxsize=3)
def reference_pipeline(path: str):
    from diffusers import WanImageToVideoPipeline

    return WanImageToVideoPipeline.from_pretrained(path, torch_dtype=torch.float32)


def i2v_reference(path: Path, png: bytes, *, prompt: str, negative_prompt: str, height: int, width: int,
                  num_frames: int, steps: int, guidance: float, seed: int) -> np.ndarray:
    """uint8 (F, H, W, 3) from diffusers.WanImageToVideoPipeline with a CPU generator seeded with `seed`."""
    pipe = reference_pipeline(str(path))
    out = pipe(
        image=Image.open(io.BytesIO(png)).convert("RGB"), prompt=prompt, negative_prompt=negative_prompt,
        height=height, width=width, num_frames=num_frames, num_inference_steps=steps, guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
    ).frames[0]
    return (out * 255).round().astype(np.uint8)


@pytest.mark.parametrize("num_frames", [1, 5])
@pytest.mark.parametrize("variant", list(BUILDERS))
def test_matches_diffusers(servers, checkpoints, variant, num_frames):
    height, width = SIZES[variant]
    png = make_png()
    params = dict(prompt="a red cat walking on the beach at sunset", negative_prompt="blurry low quality",
                  height=height, width=width, num_frames=num_frames, num_inference_steps=4, guidance_scale=5.0, seed=1234)
    client = servers(variant).client
    ours = npy_output(client, client.submit(output_format="npy", images=[png], **params).id)
    ref = i2v_reference(checkpoints[variant], png, prompt=params["prompt"], negative_prompt=params["negative_prompt"],
                        height=height, width=width, num_frames=num_frames, steps=4, guidance=5.0, seed=1234)
    assert ours.shape == (num_frames, height, width, 3)
    assert ours.std() > 1, "output is flat: the comparison would prove nothing"
    assert max_level_diff(ours, ref) <= 2


def test_without_cfg_matches_diffusers(servers, checkpoints):
    variant = "wan21-i2v"
    png = make_png(shift=7)
    client = servers(variant).client
    ours = npy_output(client, client.submit(prompt="a dog in the snow", images=[png], height=32, width=32, num_frames=1,
                                            num_inference_steps=3, guidance_scale=1.0, seed=5, output_format="npy").id)
    ref = i2v_reference(checkpoints[variant], png, prompt="a dog in the snow", negative_prompt="", height=32, width=32,
                        num_frames=1, steps=3, guidance=1.0, seed=5)
    assert max_level_diff(ours, ref) <= 2


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK marks its Videos API deprecated; the calls are unchanged
def test_openai_videos_image_to_video(servers):
    """input_reference through the official openai SDK (a multipart upload) and as a JSON data: URL
    give the MP4 that gRPC gives with the same image in params.images, byte for byte."""
    import base64
    import time

    import httpx2
    import openai

    server = servers("wan21-i2v")
    png = make_png(shift=3)
    params = dict(seed=9, num_inference_steps=3)
    sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused", max_retries=0)

    def mp4(video_id: str) -> bytes:
        deadline = time.monotonic() + 120
        while (video := sdk.videos.retrieve(video_id)).status not in ("completed", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert video.status == "completed", video.error
        return sdk.videos.download_content(video_id).content

    # One at a time: jobs that share a denoising step run other GEMM shapes, which may move a pixel by a
    # level, and the bytes are compared.
    uploaded = sdk.videos.create(prompt="a cat", input_reference=("ref.png", png, "image/png"), seconds="0.25", size="48x32",
                                 extra_body=params)
    assert (uploaded.size, uploaded.num_frames) == ("48x32", 5)
    from_upload = mp4(uploaded.id)
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    posted = httpx2.post(f"http://127.0.0.1:{server.http_port}/v1/videos", timeout=60, json={
        "prompt": "a cat", "input_reference": {"image_url": data_url}, "seconds": "0.25", "size": "48x32", **params})
    assert posted.status_code == 200, posted.text
    from_data_url = mp4(posted.json()["id"])
    client = server.client
    job = client.submit(prompt="a cat", images=[png], height=32, width=48, num_frames=5, **params)
    client.wait(job.id)
    over_grpc = client.download(job.id)
    assert over_grpc[4:8] == b"ftyp" and from_upload == over_grpc and from_data_url == over_grpc
    with pytest.raises(openai.BadRequestError) as exc:  # an image-to-video model needs its image
        sdk.videos.create(prompt="a cat", seconds="0.25", size="48x32")
    assert exc.value.body["param"] == "input_reference"


def test_card_and_missing_image(servers):
    from diffserve.client import DiffserveError

    client = servers("wan22-ti2v").client
    (model,) = client.list_models()
    assert model.task == "image-to-video" and model.family == "wan2.2"
    assert model.limits.image_required and model.limits.max_images == 1 and model.limits.size_multiple == 32
    assert (model.defaults.height, model.defaults.width, model.defaults.num_frames) == (480, 832, 81)
    with pytest.raises(DiffserveError):
        client.submit(prompt="no image", height=32, width=32, num_frames=1)


@pytest.mark.parametrize("variant", ["wan22-i2v", "wan21-i2v"])
def test_concurrent_jobs_equal_solo(servers, variant):
    """Two I2V jobs (different images, prompts, seeds, step counts) share step commands and each equals
    its solo run. On Wan2.2 A14B the first job crosses the expert boundary while the second is still on
    the high-noise expert, so one step command runs both experts on their own rows."""
    height, width = SIZES[variant]
    common = dict(height=height, width=width, num_frames=5, output_format="npy")
    jobs = [
        dict(prompt="a cat in the snow", num_inference_steps=8, seed=11, images=[make_png(shift=0)]),
        dict(prompt="a dog on the beach", negative_prompt="ugly", num_inference_steps=6, seed=22, images=[make_png(shift=40)]),
    ]
    client = servers(variant).client
    solo = [npy_output(client, client.submit(**common, **job).id) for job in jobs]

    first = client.submit(**common, **jobs[0])
    wait_step(client, first.id, 2)
    second = client.submit(**common, **jobs[1])
    ids = [first.id, second.id]
    sizes = [[e.step_completed.batch_jobs for e in client.events(i) if e.WhichOneof("event") == "step_completed"] for i in ids]
    outputs = [npy_output(client, i) for i in ids]
    for ours, alone in zip(outputs, solo):
        assert ours.std() > 1
        assert max_level_diff(ours, alone) <= 2
    assert all(max(s) >= 2 for s in sizes), sizes
    assert not np.array_equal(outputs[0], outputs[1])


def test_mixed_experts_in_one_step_equal_solo(checkpoints):
    """In-process: one denoise_step over two requests on opposite sides of the boundary (each expert
    runs its own rows) gives exactly the latents of stepping each request alone."""
    from diffserve.v1 import generation_pb2 as pb
    from diffserve.scheduler.requests import worker_request
    from diffserve.worker.pipelines.wan import WanPipeline

    pipe = WanPipeline(checkpoints["wan22-i2v"], "m", torch.device("cpu"), torch.float32)

    def state(seed: int, guidance: float):
        params = pb.GenerationParams(prompt="a boat", negative_prompt="", height=32, width=32, num_frames=5,
                                     num_inference_steps=4, guidance_scale=guidance, seed=seed)
        params.images.add(data=make_png(shift=seed))
        s = pipe.admit(str(seed), worker_request(params, pipe.card))
        pipe.encode(s)
        pipe.prepare(s)
        return s

    def advance(s, n):
        for _ in range(n):
            pipe.denoise_step([s])

    a, b = state(1, 5.0), state(2, 3.0)
    advance(a, 2)  # a at t=833 (low-noise expert), b at t=999 (high-noise expert)
    assert pipe.expert_of(a) == 1 and pipe.expert_of(b) == 0
    a_solo, b_solo = state(1, 5.0), state(2, 3.0)
    advance(a_solo, 3)
    advance(b_solo, 1)
    assert pipe.denoise_step([a, b]) == 4
    assert torch.allclose(a.latents, a_solo.latents, atol=1e-6) and torch.allclose(b.latents, b_solo.latents, atol=1e-6)
