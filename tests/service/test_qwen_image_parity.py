"""Through the real service, Qwen-Image and Qwen-Image-Edit equal diffusers' QwenImagePipeline /
QwenImageEditPipeline, and concurrent jobs (prompts of different lengths: padded + masked text)
share denoising steps and still equal their solo outputs."""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ServerProcess
from jobs_util import npy_output, wait_step
from reference import max_level_diff
from tests.fixtures.tiny.qwen_image import build_tiny_qwen_image, build_tiny_qwen_image_edit, load_reference_processor


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    return build_tiny_qwen_image(tmp_path_factory.mktemp("ckpt") / "tiny-qwen-image")


@pytest.fixture(scope="module")
def tiny_qwen_edit(tmp_path_factory):
    return build_tiny_qwen_image_edit(tmp_path_factory.mktemp("ckpt") / "tiny-qwen-image-edit")


@pytest.fixture(scope="module")
def qwen_server(tiny_qwen, tmp_path_factory):
    server = ServerProcess(tiny_qwen, tmp_path_factory.mktemp("server"), "--max-batch-size", "4")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def edit_server(tiny_qwen_edit, tmp_path_factory):
    server = ServerProcess(tiny_qwen_edit, tmp_path_factory.mktemp("server"), "--max-batch-size", "4")
    yield server
    server.stop()


@lru_cache(maxsize=2)
def reference_pipeline(path: str, edit: bool):
    from diffusers import QwenImageEditPipeline, QwenImagePipeline

    if edit:
        return QwenImageEditPipeline.from_pretrained(path, torch_dtype=torch.float32, processor=load_reference_processor(path))
    return QwenImagePipeline.from_pretrained(path, torch_dtype=torch.float32)


def reference(path, *, prompt, negative_prompt, height, width, steps, guidance, seed, image=None) -> np.ndarray:
    """uint8 (1, H, W, 3) from diffusers with a CPU generator; `guidance` is true_cfg_scale."""
    pipe = reference_pipeline(str(path), image is not None)
    extra = {} if image is None else {"image": Image.open(io.BytesIO(image)).convert("RGB")}
    out = pipe(prompt=prompt, negative_prompt=negative_prompt, height=height, width=width, num_inference_steps=steps,
               true_cfg_scale=guidance, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **extra).images
    return (out * 255).round().astype(np.uint8)


def submit(client, **params):
    """A job's id; `images` are encoded image bytes (sent as ImageInput.data)."""
    return client.submit(output_format="npy", num_frames=1, **params).id


def batch_sizes(client, job_id):
    return [e.step_completed.batch_jobs for e in client.events(job_id) if e.WhichOneof("event") == "step_completed"]


def input_png() -> bytes:
    """A smooth, non-square test image (the reference resizes it to ~1024^2 pixels, 864x1216)."""
    y, x = np.mgrid[0:56, 0:40]
    rgb = np.stack([x * 6, y * 4, 255 - (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


# ---- Qwen-Image -------------------------------------------------------------------------------


def test_card(qwen_server):
    (model,) = qwen_server.client.list_models()
    d, lim = model.defaults, model.limits
    assert (d.height, d.width, d.num_frames, d.num_inference_steps, d.guidance_scale) == (1024, 1024, 1, 50, 4.0)
    assert d.negative_prompt == " " and d.sampler == "FlowMatchEulerDiscreteScheduler"
    assert (lim.size_multiple, lim.frame_step, lim.max_num_frames, lim.max_images, lim.image_required) == (16, 1, 1, 0, False)


@pytest.mark.parametrize("guidance", [4.0, 1.0], ids=["true-cfg", "no-cfg"])
def test_matches_diffusers(qwen_server, tiny_qwen, guidance):
    params = dict(prompt="a red cat walking on the beach at sunset", negative_prompt="blurry low quality",
                  height=64, width=48, num_inference_steps=4, guidance_scale=guidance, seed=1234)
    ours = npy_output(qwen_server.client, submit(qwen_server.client, **params))
    ref = reference(tiny_qwen, prompt=params["prompt"], negative_prompt=params["negative_prompt"], height=64, width=48,
                    steps=4, guidance=guidance, seed=1234)
    assert ours.shape == (1, 64, 48, 3)
    assert ours.std() > 1, "output is flat: the comparison would prove nothing"
    assert max_level_diff(ours, ref) <= 2


def test_concurrent_jobs_equal_solo_and_share_steps(qwen_server):
    """Prompts (and negatives) of different token lengths: the batched rows are padded and masked."""
    client = qwen_server.client
    common = dict(height=32, width=48, guidance_scale=4.0)
    jobs = [
        dict(prompt="a cat", negative_prompt=" ", num_inference_steps=8, seed=11),
        dict(prompt="a big brown dog running on the beach at sunset with the sea behind", negative_prompt="blurry",
             num_inference_steps=5, seed=22),
        dict(prompt="a bird over the sea", num_inference_steps=6, seed=33, guidance_scale=1.0),
    ]
    solo = [npy_output(client, submit(client, **{**common, **job})) for job in jobs]

    first = submit(client, **{**common, **jobs[0]})
    wait_step(client, first, 2)  # the others join while the first is at step >= 2
    ids = [first] + [submit(client, **{**common, **job}) for job in jobs[1:]]
    sizes = [batch_sizes(client, i) for i in ids]
    outputs = [npy_output(client, i) for i in ids]
    for ours, alone in zip(outputs, solo):
        assert max_level_diff(ours, alone) <= 2
    assert all(max(s) >= 2 for s in sizes), sizes


# ---- Qwen-Image-Edit --------------------------------------------------------------------------

EDIT_JOBS = [
    dict(prompt="make the cat blue", negative_prompt=" ", num_inference_steps=3, seed=7),
    dict(prompt="turn the sky into a golden sunset with many clouds", negative_prompt="blurry low quality",
         num_inference_steps=2, seed=8),
]
EDIT_COMMON = dict(height=48, width=32, guidance_scale=4.0)


@pytest.fixture(scope="module")
def edit_solo(edit_server):
    """Each edit job run alone (its VAE encode of the ~1 MP input dominates: seconds on a CPU)."""
    client = edit_server.client
    return [npy_output(client, submit(client, images=[input_png()], **EDIT_COMMON, **job)) for job in EDIT_JOBS]


def test_edit_card(edit_server):
    (model,) = edit_server.client.list_models()
    assert model.task == "image-edit" and model.limits.image_required and model.limits.max_images == 1
    assert model.defaults.guidance_scale == 4.0 and model.defaults.num_inference_steps == 50


def test_edit_matches_diffusers(edit_solo, tiny_qwen_edit):
    job = EDIT_JOBS[0]
    ref = reference(tiny_qwen_edit, prompt=job["prompt"], negative_prompt=job["negative_prompt"], height=48, width=32,
                    steps=job["num_inference_steps"], guidance=4.0, seed=job["seed"], image=input_png())
    ours = edit_solo[0]
    assert ours.shape == (1, 48, 32, 3)
    assert ours.std() > 1, "output is flat: the comparison would prove nothing"
    assert max_level_diff(ours, ref) <= 2


def test_edit_concurrent_jobs_equal_solo(edit_server, edit_solo):
    client = edit_server.client
    # Submitted together: both are encoded before any denoising step (stages go first), then share steps.
    ids = [submit(client, images=[input_png()], **EDIT_COMMON, **job) for job in EDIT_JOBS]
    sizes = [batch_sizes(client, i) for i in ids]
    for job_id, alone in zip(ids, edit_solo):
        assert max_level_diff(npy_output(client, job_id), alone) <= 2
    assert all(max(s) >= 2 for s in sizes), sizes


def test_edit_requires_an_image(edit_server):
    from diffserve.client import DiffserveError

    with pytest.raises(DiffserveError):
        edit_server.client.submit(prompt="make it blue", height=32, width=32, num_frames=1, output_format="npy")


def test_edit_size_from_input_image_when_unset(edit_server):
    """Unset height/width: the card's 0 defaults let the scheduler derive the size from the input
    (~1024^2 pixels at its aspect ratio: 864x1216 for the 40x56 test image), as the reference does,
    so the job shows its real size from the start (and batches with jobs of that size only)."""
    client = edit_server.client
    (model,) = client.list_models()
    assert (model.defaults.height, model.defaults.width) == (0, 0)
    job = client.submit(prompt="make the cat blue", images=[input_png()], num_inference_steps=1, seed=3, guidance_scale=1.0)
    assert (job.params.width, job.params.height) == (864, 1216)
    job = client.wait(job.id)
    assert job.state == job_state_succeeded(), job.error
    assert (job.artifact.width, job.artifact.height) == (864, 1216)


def job_state_succeeded() -> int:
    from diffserve.v1 import generation_pb2 as pb

    return pb.JOB_STATE_SUCCEEDED
