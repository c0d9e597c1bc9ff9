"""Through the real service (gRPC → scheduler → ZeroMQ → worker), Wan2.1 T2V equals diffusers' WanPipeline."""

from __future__ import annotations

import io

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from diffserve.v1 import generation_pb2 as pb
from reference import max_level_diff, wan_reference


def mp4_metadata(data: bytes, tmp_path) -> str:
    """ffmpeg's own description of the file (it prints container metadata on stderr)."""
    import subprocess

    import imageio_ffmpeg

    path = tmp_path / "probe.mp4"
    path.write_bytes(data)
    return subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr


def run(client, **params):
    job = client.submit(**params)
    job = client.wait(job.id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    return job, client.download(job.id)


@pytest.mark.parametrize("num_frames", [1, 5])
def test_matches_diffusers(wan_server, tiny_wan, num_frames):
    params = dict(prompt="a red cat walking on the beach at sunset", negative_prompt="blurry low quality",
                  height=32, width=48, num_frames=num_frames, num_inference_steps=4, guidance_scale=5.0, seed=1234)
    job, data = run(wan_server.client, output_format="npy", **params)
    ours = np.load(io.BytesIO(data))
    ref = wan_reference(tiny_wan, prompt=params["prompt"], negative_prompt=params["negative_prompt"], height=32, width=48,
                        num_frames=num_frames, steps=4, guidance=5.0, seed=1234)
    assert ours.shape == (num_frames, 32, 48, 3)
    assert ours.std() > 1, "output is flat: the comparison would prove nothing"
    assert max_level_diff(ours, ref) <= 2


def test_without_cfg_matches_diffusers(wan_server, tiny_wan):
    job, data = run(wan_server.client, prompt="a dog in the snow", height=32, width=32, num_frames=1,
                    num_inference_steps=3, guidance_scale=1.0, seed=5, output_format="npy")
    ref = wan_reference(tiny_wan, prompt="a dog in the snow", height=32, width=32, num_frames=1, steps=3, guidance=1.0, seed=5)
    assert max_level_diff(np.load(io.BytesIO(data)), ref) <= 2


def test_default_formats_png_and_mp4(wan_server, tiny_wan, tmp_path):
    """One frame → PNG with prompt and seed in its text chunks; several → H.264 MP4 of the right size and count."""
    common = dict(prompt="a boat on the lake", negative_prompt="", height=32, width=48, num_inference_steps=2, guidance_scale=5.0, seed=77)
    job, png = run(wan_server.client, num_frames=1, **common)
    assert job.artifact.media_type == "image/png" and job.artifact.file_name.endswith(".png")
    image = Image.open(io.BytesIO(png))
    assert image.size == (48, 32) and image.text["prompt"] == common["prompt"] and image.text["seed"] == "77"
    ref = wan_reference(tiny_wan, height=32, width=48, num_frames=1, steps=2, guidance=5.0, **{k: v for k, v in common.items() if k in ("prompt", "negative_prompt", "seed")})
    assert max_level_diff(np.asarray(image.convert("RGB"))[None], ref) <= 2

    job, mp4 = run(wan_server.client, num_frames=9, **common)
    assert job.artifact.media_type == "video/mp4" and job.artifact.num_frames == 9
    frames = iio.imread(mp4, extension=".mp4")
    assert frames.shape == (9, 32, 48, 3)
    assert f"title           : {common['prompt']}" in mp4_metadata(mp4, tmp_path)
    assert '"seed": "77"' in mp4_metadata(mp4, tmp_path)


def test_seed_is_reported_and_reproducible(wan_server):
    client = wan_server.client
    params = dict(prompt="a tree", height=32, width=32, num_frames=1, num_inference_steps=2, output_format="npy")
    job, first = run(client, **params)
    assert job.params.seed != 0 or job.params.HasField("seed")
    job2, again = run(client, seed=job.params.seed, **params)
    assert job2.params.seed == job.params.seed
    assert np.array_equal(np.load(io.BytesIO(first)), np.load(io.BytesIO(again)))
