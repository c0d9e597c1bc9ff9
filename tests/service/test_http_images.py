"""OpenAI's Images API on a real `serve --http-port` (tiny Wan, tiny Qwen-Image-Edit), driven by the
official openai SDK unchanged (sync and async clients, engine fields through `extra_body`):

- parity: the PNG from /v1/images/generations and /v1/images/edits (b64_json) is byte for byte the
  PNG the gRPC API gives for the same seed and params (same pixels, same metadata: the artifact
  is the same job record encoded the same way);
- n > 1: seeds seed, seed + 1, ...; the jobs share denoising steps;
- response_format=url: the job's /content, with the same bearer token;
- errors in OpenAI's shape naming OpenAI's fields; 429 + Retry-After at the queue bound (the
  call's other jobs cancelled); a client that hangs up cancels its job; 503 while draining;
- the README's SDK example, verbatim (README_EXAMPLE below).

The last test drains the Wan server (SIGINT): keep it last.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import socket
import threading
import time

import httpx2 as httpx  # the HTTP client the openai SDK brings
import numpy as np
import openai
import pytest
from PIL import Image

from diffserve.v1 import generation_pb2 as pb

from tests.conftest import ServerProcess
from tests.readme import example

ALICE = "alice-token-0123456789abcdef"
SMALL = dict(size="32x32")


@pytest.fixture(scope="module")
def wan_http(tiny_wan, tmp_path_factory):
    """Tokens (a url needs the bearer token), a queue bound of 2 (the 429 test), a drain timeout
    the last test's in-flight call fits in."""
    workdir = tmp_path_factory.mktemp("images")
    tokens = workdir / "tokens.txt"
    tokens.write_text(f"alice {ALICE}\n")
    tokens.chmod(0o600)
    server = ServerProcess(tiny_wan, workdir, "--http-port", "0", "--auth-tokens", str(tokens), "--max-queue", "2",
                           "--drain-timeout", "60", "--warmup-shape", "32x32x1")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def edit_http(tmp_path_factory):
    from tests.fixtures.tiny.qwen_image import build_tiny_qwen_image_edit

    path = build_tiny_qwen_image_edit(tmp_path_factory.mktemp("ckpt") / "tiny-qwen-image-edit")
    server = ServerProcess(path, tmp_path_factory.mktemp("edit"), "--http-port", "0")
    yield server
    server.stop()


def sdk(server: ServerProcess, token: str = ALICE, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key=token, timeout=120, **kwargs)


def grpc(server: ServerProcess, token: str | None = ALICE):
    from diffserve.client import Client

    return Client(server.target, token=token)


def png(item) -> bytes:
    return base64.b64decode(item.b64_json)


def input_png() -> bytes:
    y, x = np.mgrid[0:24, 0:16]
    rgb = np.stack([x * 12, y * 8, 255 - (x + y) * 4], axis=-1).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def grpc_png(client, **params) -> bytes:
    """The PNG the gRPC API makes for `params` (Generate, then DownloadArtifact)."""
    events = list(client.generate(**params))
    assert events[-1].WhichOneof("event") == "completed", events[-1]
    return client.download(events[-1].completed.artifact.id)


def http_jobs(server: ServerProcess) -> dict[str, dict]:
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", headers={"Authorization": f"Bearer {ALICE}"}, timeout=30) as http:
        return {job["id"]: job for job in http.get("/v1/jobs").json()["data"]}


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


# ---- generations ----------------------------------------------------------------------------------


def test_generate_equals_grpc(wan_http):
    client = sdk(wan_http)
    model = client.models.list().data[0].id
    result = client.images.generate(model=model, prompt="a red fox", **SMALL, extra_body={"seed": 11, "num_inference_steps": 3})
    (item,) = result.data
    assert result.size == "32x32" and result.output_format == "png" and result.created > 0
    assert item.seed == 11 and item.job_id
    ours = png(item)
    assert Image.open(io.BytesIO(ours)).size == (32, 32)
    with grpc(wan_http) as rpc:
        theirs = grpc_png(rpc, prompt="a red fox", model=model, width=32, height=32, num_frames=1, num_inference_steps=3, seed=11)
        assert rpc.get(item.job_id).state == pb.JOB_STATE_SUCCEEDED  # the HTTP call's job is an engine job like any other
    assert ours == theirs  # byte for byte: same pixels, same PNG metadata


def test_async_n_images_batch(wan_http):
    async def main():
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{wan_http.http_port}/v1", api_key=ALICE, timeout=120) as client:
            return await client.images.generate(prompt="two foxes", n=2, **SMALL, extra_body={"seed": 21, "num_inference_steps": 3})

    result = asyncio.run(main())
    assert [item.seed for item in result.data] == [21, 22]
    assert png(result.data[0]) != png(result.data[1])
    with grpc(wan_http) as rpc:
        batches = [[e.step_completed.batch_jobs for e in rpc.events(item.job_id) if e.WhichOneof("event") == "step_completed"] for item in result.data]
    assert max(batches[0]) == 2 and max(batches[1]) == 2, batches  # submitted together, they share steps


def test_step_cache_and_loras_ride_along_as_json(wan_http):
    """The opt-ins of docs/acceleration.md in the body: a cached job equals the gRPC job with the same
    cache; bad values are 400s naming this API's field."""
    client = sdk(wan_http, max_retries=0)
    cache = {"policy": "first-block", "threshold": 0.2}
    result = client.images.generate(prompt="a red fox", **SMALL, extra_body={"seed": 12, "num_inference_steps": 4, "cache": cache})
    (item,) = result.data
    job = http_jobs(wan_http)[item.job_id]
    assert job["params"]["cache"]["policy"] == "first-block", job["params"]
    with grpc(wan_http) as rpc:
        theirs = grpc_png(rpc, prompt="a red fox", width=32, height=32, num_frames=1, num_inference_steps=4, seed=12, cache=cache)
    assert png(item) == theirs
    cases = [({"cache": {"policy": "first-block", "threshold": 11}}, "cache.threshold"),
             ({"cache": {"policy": 3}}, "cache"), ({"cache": {"nonsense": 1}}, "cache"),
             ({"loras": [{"name": "ink"}]}, "loras[0].name"), ({"loras": [{"name": "ink", "scale": "lots"}]}, "loras[0]")]
    for body, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.images.generate(prompt="a fox", **SMALL, extra_body={"num_inference_steps": 2, **body})
        assert info.value.body["param"] == param, (body, info.value.body)


def test_url_needs_the_token(wan_http):
    result = sdk(wan_http).images.generate(prompt="a fox", response_format="url", **SMALL, extra_body={"num_inference_steps": 2})
    (item,) = result.data
    assert item.b64_json is None and item.url.endswith(f"/v1/jobs/{item.job_id}/content")
    assert item.url.startswith(f"http://127.0.0.1:{wan_http.http_port}/")
    assert httpx.get(item.url, timeout=30).status_code == 401
    content = httpx.get(item.url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=30)
    assert content.headers["content-type"] == "image/png" and Image.open(io.BytesIO(content.content)).size == (32, 32)


def test_errors_name_openai_fields(wan_http):
    client = sdk(wan_http, max_retries=0)

    def refused(call, **kwargs) -> openai.APIStatusError:
        with pytest.raises(openai.APIStatusError) as info:
            call(**kwargs)
        return info.value

    cases = [(dict(size="33x32"), "size", "multiple of"), (dict(size="large"), "size", "WIDTHxHEIGHT"), (dict(n=11), "n", "10"),
             (dict(model="dall-e-3"), "model", "unknown model"), (dict(extra_body={"steps": 3}), "steps", "not permitted"),
             (dict(extra_body={"guidance_scale": -1}), "guidance_scale", ">= 0"), (dict(output_format="webp"), "output_format", "png"),
             (dict(extra_body={"num_inference_steps": 0}), "num_inference_steps", "between")]
    for kwargs, param, words in cases:
        error = refused(client.images.generate, prompt="a fox", **{**SMALL, **kwargs})
        assert error.status_code == 400 and isinstance(error, openai.BadRequestError), kwargs
        assert error.body["param"] == param and error.body["type"] == "invalid_request_error" and words in error.body["message"], error.body
    assert refused(client.images.generate, prompt=" ", **SMALL).body["param"] == "prompt"
    # Wan takes no input image: edits are refused, naming the model
    error = refused(client.images.edit, image=("in.png", input_png(), "image/png"), prompt="blue")
    assert error.status_code == 400 and error.body["param"] == "model" and "/v1/images/generations" in error.body["message"]
    assert isinstance(refused(sdk(wan_http, token="not-a-token-at-all-xxxxxxxx", max_retries=0).images.generate, prompt="x"),
                      openai.AuthenticationError)


def test_queue_bound_is_429_and_the_call_leaves_nothing_queued(wan_http):
    before = set(http_jobs(wan_http))
    with pytest.raises(openai.RateLimitError) as info:  # n = 3 over a queue bound of 2
        sdk(wan_http, max_retries=0).images.generate(prompt="many foxes", n=3, **SMALL, extra_body={"num_inference_steps": 2})
    assert info.value.body["code"] == "QUEUE_FULL" and int(info.value.response.headers["retry-after"]) >= 1
    new = [job for job_id, job in http_jobs(wan_http).items() if job_id not in before]
    assert len(new) == 2 and all(job["state"] == "JOB_STATE_CANCELLED" for job in new), new


def test_client_hangup_cancels_its_job(wan_http):
    before = set(http_jobs(wan_http))
    body = json.dumps({"prompt": "a slow fox", **SMALL, "num_inference_steps": 1000}).encode()
    with socket.create_connection(("127.0.0.1", wan_http.http_port), timeout=30) as raw:
        raw.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ALICE.encode() +
                    b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

        def running():
            new = [job for job_id, job in http_jobs(wan_http).items() if job_id not in before]
            return new[0] if new and new[0].get("step", 0) >= 1 else None

        job = wait_for(running, 60, "the call's job to run")
    # the socket is closed: the job stops at its next step
    with grpc(wan_http) as rpc:
        final = wait_for(lambda: (j := rpc.get(job["id"])).state in (pb.JOB_STATE_CANCELLED, pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED) and j, 30,
                         "the job to end")
    assert final.state == pb.JOB_STATE_CANCELLED and final.step < 1000


# ---- edits ----------------------------------------------------------------------------------------


def test_edit_equals_grpc(edit_http):
    image = input_png()

    async def main():
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{edit_http.http_port}/v1", api_key="anything", timeout=120) as client:
            return await client.images.edit(image=("in.png", image, "image/png"), prompt="make it blue", **SMALL,
                                            extra_body={"seed": 5, "num_inference_steps": 2, "guidance_scale": 4.0})

    (item,) = asyncio.run(main()).data
    assert item.seed == 5
    with grpc(edit_http, token=None) as rpc:
        (model,) = rpc.list_models()
        theirs = grpc_png(rpc, prompt="make it blue", model=model.name, width=32, height=32, num_frames=1, num_inference_steps=2,
                          guidance_scale=4.0, seed=5, images=[image])
    assert png(item) == theirs


def test_edit_errors(edit_http):
    client = sdk(edit_http, token="anything", max_retries=0)
    image = ("in.png", input_png(), "image/png")
    cases = [(dict(image=[image, image]), "image", "at most 1"), (dict(image=image, mask=image), "mask", "not supported"),
             (dict(image=("x.png", b"not an image", "image/png")), "image", "image[0]"), (dict(image=image, size="40x40"), "size", "multiple of"),
             (dict(image=image, extra_body={"height": 32}), "height", "not permitted")]
    for kwargs, param, words in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.images.edit(prompt="blue", **kwargs)
        assert info.value.body["param"] == param and words in info.value.body["message"], (kwargs, info.value.body)
    # an editing model needs an image: generations points to /edits
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="blue")
    assert info.value.body["param"] == "model" and "/v1/images/edits" in info.value.body["message"]
    # what the SDK never sends, from a plain HTTP client
    with httpx.Client(base_url=f"http://127.0.0.1:{edit_http.http_port}", timeout=30) as http:
        file = {"image": ("in.png", input_png(), "image/png")}
        for kwargs, param, words in [(dict(json={"prompt": "blue"}), "body", "multipart"), (dict(data={"prompt": "blue"}), "body", "multipart"),
                                     (dict(data={"prompt": "blue"}, files={"mask": ("m.png", b"x", "image/png")}), "image", "at least one"),
                                     (dict(data={"prompt": "blue", "image": "in.png"}, files={"x": ("x", b"", "text/plain")}), "image", "must be a file"),
                                     (dict(data={"prompt": ["blue", "red"]}, files=file), "prompt", "more than once")]:
            error = http.post("/v1/images/edits", **kwargs)
            assert error.status_code == 400 and error.json()["error"]["param"] == param and words in error.json()["error"]["message"], (kwargs, error.text)


# ---- the README's example, verbatim -----------------------------------------------------------------

README_EXAMPLE = example("openai-images")  # README.md, section "OpenAI-compatible HTTP API"


def test_readme_example(wan_http, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{wan_http.http_port}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", ALICE)
    monkeypatch.chdir(tmp_path)
    exec(compile(README_EXAMPLE, "README.md", "exec"), {})
    assert Image.open(tmp_path / "fox.png").size == (256, 256)


# ---- last: the Wan server drains --------------------------------------------------------------------


def test_draining_server_is_503_and_finishes_the_call_in_flight(wan_http):
    before = set(http_jobs(wan_http))
    done: dict = {}

    def long_call():
        try:
            done["result"] = sdk(wan_http, max_retries=0).images.generate(prompt="a patient fox", **SMALL, extra_body={"num_inference_steps": 40})
        except Exception as exc:  # reported by the assertion below
            done["error"] = exc

    caller = threading.Thread(target=long_call)
    caller.start()
    try:
        wait_for(lambda: any(job["state"] == "JOB_STATE_RUNNING" for job_id, job in http_jobs(wan_http).items() if job_id not in before), 60,
                 "the call's job to run")
        os.kill(wan_http.proc.pid, signal.SIGINT)  # the first signal drains: running jobs finish, submits are refused
        with pytest.raises(openai.APIStatusError) as info:
            wait_for(lambda: sdk(wan_http, max_retries=0).images.generate(prompt="too late", **SMALL, extra_body={"num_inference_steps": 2}) and False, 30, "a refusal")
        assert info.value.status_code == 503 and info.value.body["code"] == "SHUTTING_DOWN"
        assert int(info.value.response.headers["retry-after"]) >= 1
    finally:
        caller.join(timeout=120)
    assert "error" not in done, done
    (item,) = done["result"].data
    assert Image.open(io.BytesIO(png(item))).size == (32, 32)
    assert wan_http.proc.wait(timeout=60) == 0
