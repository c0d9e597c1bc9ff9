"""Per-request LoRA through the service (issue 17): `serve --lora-dir` offers the folder's adapters in
ListModels, jobs with different adapters (and none) share denoising steps and each draws what
diffusers' WanPipeline draws with load_lora_weights + set_adapters; a bad adapter file fails only
its own job, naming the adapter; an unknown name or a scale out of range is refused at submission;
the HTTP API's /v1/jobs takes the same field. A cfg × tp worker group (gloo, 4 ranks) serves the
same adapters and draws the same."""

from __future__ import annotations

import io
from functools import lru_cache

import httpx2 as httpx  # the HTTP client the openai SDK brings
import numpy as np
import pytest
import torch

from diffserve.client.client import DiffserveError
from diffserve.v1 import generation_pb2 as pb
from jobs_util import npy_output
from reference import max_level_diff
from tests.fixtures.tiny.lora import WAN_ATTENTION_AND_FFN, set_reference_adapters, write_lora

PARAMS = dict(negative_prompt="", height=32, width=32, num_frames=1, num_inference_steps=10, guidance_scale=5.0, output_format="npy")
JOBS = [("a cat in the snow", 7, (("a", 0.8),)), ("a red car", 9, ()), ("a dog on the beach", 8, (("b", 1.0),))]


@pytest.fixture(scope="module")
def lora_dir(tiny_wan, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    # Strong adapters: the tiny model's pixels move little with its DiT, so a weak one would change them
    # by no more than the tolerance (each job's test checks that its adapters show).
    write_lora(folder / "a.safetensors", tiny_wan / "transformer", WAN_ATTENTION_AND_FFN, seed=1, strength=3.0)
    write_lora(folder / "b.safetensors", tiny_wan / "transformer", (r"blocks\.\d+\.attn1\.(to_q|to_v)", r"proj_out"), seed=2, alpha=8.0,
               strength=3.0)
    (folder / "junk.safetensors").write_bytes(b"not safetensors at all")
    return folder


@lru_cache(maxsize=8)
def reference(path, folder, prompt: str, seed: int, adapters: tuple, guidance: float = 5.0) -> np.ndarray:
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    set_reference_adapters(pipe, folder, adapters)
    out = pipe(prompt, negative_prompt="", height=32, width=32, num_frames=1, num_inference_steps=10, guidance_scale=guidance,
               output_type="np", generator=torch.Generator().manual_seed(seed)).frames[0]
    return (out * 255).round().astype(np.uint8)


def assert_adapters_show(path, folder, prompt: str, seed: int, adapters: tuple, guidance: float = 5.0) -> None:
    """A job's adapters move its reference by more than twice the parity tolerance (else the
    comparison could not tell a job run without them)."""
    if adapters:
        plain = reference(path, folder, prompt, seed, (), guidance)
        assert max_level_diff(reference(path, folder, prompt, seed, adapters, guidance), plain) > 4, adapters


def test_jobs_with_different_adapters_share_steps_and_match_diffusers(tiny_wan, lora_dir, start_server):
    server = start_server(tiny_wan, "--lora-dir", str(lora_dir), "--max-batch-size", "4", "--http-port", "0")
    client = server.client
    (model,) = client.list_models()
    assert list(model.lora_adapters) == ["a", "b", "junk"]

    jobs = [client.submit(prompt, seed=seed, loras=[f"{n}:{s}" for n, s in adapters], **PARAMS) for prompt, seed, adapters in JOBS]
    junk = client.submit("a cat", seed=1, loras=["junk"], **PARAMS)  # the worker finds the file bad: this job alone fails
    failed = client.wait(junk.id)
    assert failed.state == pb.JOB_STATE_FAILED and failed.error.code == 3  # INVALID_ARGUMENT
    assert "LoRA adapter 'junk': not a readable safetensors file" in failed.error.message
    outputs = [npy_output(client, job.id) for job in jobs]
    batched = [max(e.step_completed.batch_jobs for e in client.events(j.id) if e.WhichOneof("event") == "step_completed") for j in jobs]
    assert max(batched) >= 2, f"the jobs never shared a step: {batched}"
    assert [(x.name, x.scale) for x in client.get(jobs[0].id).params.loras] == [("a", pytest.approx(0.8))]
    for out, (prompt, seed, adapters) in zip(outputs, JOBS):
        assert max_level_diff(out, reference(tiny_wan, lora_dir, prompt, seed, adapters)) <= 2, adapters
        assert_adapters_show(tiny_wan, lora_dir, prompt, seed, adapters)

    with pytest.raises(DiffserveError, match=r"INVALID_ARGUMENT: params.loras\[0\].name: .*no LoRA adapter 'c' \(offered: a, b, junk\)"):
        client.submit("a cat", loras=["c"], **PARAMS)
    with pytest.raises(DiffserveError, match=r"INVALID_ARGUMENT: params.loras\[0\].scale: must be a finite number from -4 to 4"):
        client.submit("a cat", loras=["a:9"], **PARAMS)

    # The HTTP API's job endpoint takes the same field (the scale unset: 1.0), and draws the same.
    body = {"params": {"prompt": JOBS[2][0], "seed": JOBS[2][1], **PARAMS, "output_format": "OUTPUT_FORMAT_NPY", "loras": [{"name": "b"}]}}
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=60) as http:
        created = http.post("/v1/jobs", json=body)
        assert created.status_code == 201, created.text
        job = created.json()["job"]
        assert job["params"]["loras"] == [{"name": "b", "scale": 1.0}]
    assert np.array_equal(npy_output(client, job["id"]), outputs[2])


def test_a_cfg_and_tensor_parallel_group_serves_the_adapters_as_diffusers(tiny_wan, lora_dir, start_server):
    """The cfg axis splits the batched rows with their adapters (a CFG request's two rows on two ranks; a
    request without CFG makes the row count odd, so the last row's adapters pad the split), the tp axis
    each layer's features, the adapters cut as their layers are (the model-level checks of tp and
    ulysses with adapters: tests/distributed/test_tensor_parallel.py): every job still draws what
    diffusers draws."""
    group = start_server(tiny_wan, "--lora-dir", str(lora_dir), "--max-batch-size", "4", "--num-gpus", "4",
                         "--enable-cfg-parallel", "--tp-size", "2")
    client = group.client
    assert len(group.worker_pids()) == 4
    cases = [(*job, 5.0) for job in JOBS] + [("a blue bird", 5, (("a", 1.0),), 1.0)]  # the last: one row, no CFG
    jobs = [client.submit(prompt, seed=seed, loras=[f"{n}:{s}" for n, s in adapters], **{**PARAMS, "guidance_scale": guidance})
            for prompt, seed, adapters, guidance in cases]
    for job, case in zip(jobs, cases):
        out = npy_output(client, job.id)
        assert out.std() > 1
        assert max_level_diff(out, reference(tiny_wan, lora_dir, *case)) <= 2, case
        assert_adapters_show(tiny_wan, lora_dir, *case)
    batched = [max(e.step_completed.batch_jobs for e in client.events(j.id) if e.WhichOneof("event") == "step_completed") for j in jobs]
    assert max(batched) >= 2, f"the jobs never shared a step: {batched}"
