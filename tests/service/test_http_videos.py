"""The OpenAI Videos API with the official openai SDK, unchanged (sync and async clients), against a
real `serve --http-port` on loopback (tiny Wan): create → retrieve (progress 0→100, monotonic) →
download_content (the same MP4 bytes as gRPC for the same seed) → list (cursor pages) → delete
(cancels a running video at its next step; forgets a finished one). Another principal's video is
404. The README's SDK example (SDK_EXAMPLE) runs here verbatim, against the test server through
OPENAI_BASE_URL / OPENAI_API_KEY."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import httpx2 as httpx  # the HTTP client the openai SDK brings
import openai
import pytest

from tests.conftest import ServerProcess
from tests.readme import example

# The SDK marks the Videos API deprecated (OpenAI's Sora API shuts down); the calls are unchanged.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ALICE, BOB = "alice-token-0123456789abcdef", "bob-token-0123456789abcdef"
FAST = {"seed": 7, "num_inference_steps": 12}  # 5 frames of 32x32 below: ~50 ms a step on a CPU
WAIT_S = 120  # every wait is bounded by this

# The README's example, verbatim: run with OPENAI_BASE_URL=http://localhost:8000/v1 and OPENAI_API_KEY
# (the token; any value without --auth-tokens) in the environment, as the README says.
SDK_EXAMPLE = example("openai-videos")  # README.md, section "OpenAI-compatible HTTP API"


@pytest.fixture(scope="module")
def server(tiny_wan, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("videos")
    tokens = workdir / "tokens.txt"
    tokens.write_text(f"alice {ALICE}\nbob {BOB}\n")
    tokens.chmod(0o600)
    server = ServerProcess(tiny_wan, workdir, "--http-port", "0", "--auth-tokens", str(tokens), "--warmup-shape", "32x32x5")
    yield server
    server.stop()


def sdk(server: ServerProcess, token: str = ALICE) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key=token, max_retries=0, timeout=60)


def grpc(server: ServerProcess, token: str = ALICE):
    return server.client.__class__(server.target, token=token)


def wait_for(video_id: str, client: openai.OpenAI, until, poll_s: float = 0.02) -> list:
    """Retrieves the video until `until(video)`; every Video seen, in order."""
    seen, deadline = [], time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        seen.append(client.videos.retrieve(video_id))
        if until(seen[-1]):
            return seen
        time.sleep(poll_s)
    raise AssertionError(f"video {video_id} never got there: {seen[-1]}")


def ended(video) -> bool:
    return video.status in ("completed", "failed")


def test_create_poll_download_list_delete(server):
    client = sdk(server)
    model = client.models.list().data[0].id
    video = client.videos.create(prompt="a red fox", model=model, seconds="0.25", size="32x32", extra_body=FAST)
    assert (video.object, video.status, video.progress, video.model, video.size) == ("video", "queued", 0, model, "32x32")
    assert video.seconds == "0.3125" and video.num_frames == 5 and video.fps == 16 and video.seed == "7"  # 0.25 s × 16 fps → 4k+1
    seen = wait_for(video.id, client, ended)
    progress = [v.progress for v in seen]
    assert progress == sorted(progress), progress  # 0 → 100, never back
    assert seen[-1].status == "completed" and progress[-1] == 100
    assert any(0 < p < 100 for p in progress), progress  # steps seen on the way
    done = seen[-1]
    assert done.completed_at >= done.created_at and done.expires_at == done.completed_at + 7 * 24 * 3600  # --job-ttl's default
    assert done.error is None and done.state == "JOB_STATE_SUCCEEDED"

    mp4 = client.videos.download_content(video.id)  # variant="video", the default
    assert mp4.response.headers["content-type"] == "video/mp4" and mp4.content[4:8] == b"ftyp"
    # parity with gRPC: the same parameters and seed give the same MP4, byte for byte
    with grpc(server) as g:
        job = g.submit("a red fox", model=model, height=32, width=32, num_frames=5, **FAST)
        assert g.wait(job.id).state == 3  # JOB_STATE_SUCCEEDED
        assert g.download(job.id) == mp4.content
        assert g.get(video.id).params.num_frames == 5  # one job model: the video is a job
    assert client.videos.list().data[0].id == job.id  # newest first; a gRPC MP4 job is a video too

    deleted = client.videos.delete(video.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (video.id, "video.deleted", True)
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    deadline = time.monotonic() + 30  # its MP4 is deleted off the request, on the store's thread
    while True:
        try:
            client.videos.download_content(video.id)
        except openai.NotFoundError:
            break
        assert time.monotonic() < deadline, "the deleted video's MP4 is still served"
        time.sleep(0.1)
    assert video.id not in [v.id for v in client.videos.list()]


def test_delete_cancels_a_running_video_at_the_next_step(server):
    client = sdk(server)
    video = client.videos.create(prompt="a long one", seconds="0.25", size="32x32", extra_body={"seed": 1, "num_inference_steps": 1000})
    gone = None
    try:
        with pytest.raises(openai.ConflictError):  # no MP4 before it completes: 409 NO_ARTIFACT
            client.videos.download_content(video.id)
        stepping = wait_for(video.id, client, lambda v: v.step >= 1 or ended(v))[-1]
        assert stepping.status == "in_progress" and 5 <= stepping.progress < 90  # denoising: 5 + 85 × step / 1000
        deleted = client.videos.delete(video.id)
        assert (deleted.id, deleted.deleted) == (video.id, False)  # cancelled, kept: it reads as failed / CANCELLED
        after = client.videos.retrieve(video.id)  # the cancel is already recorded: at most the step under way follows
        gone = wait_for(video.id, client, ended)[-1]
    finally:
        if gone is None:
            client.videos.delete(video.id)  # never left running for the next test
    assert gone.status == "failed" and gone.error.code == "CANCELLED" and gone.state == "JOB_STATE_CANCELLED"
    assert gone.step <= after.step + 1 < 1000  # at the next step boundary, not the end
    with grpc(server) as g:
        assert g.get(video.id).state == 5  # JOB_STATE_CANCELLED, the same job over gRPC
    assert client.videos.delete(video.id).deleted is True  # ended: now forgotten
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)


def test_errors_pages_and_other_principals(server):
    client, bob = sdk(server), sdk(server, BOB)
    ids = [client.videos.create(prompt=f"fox {i}", seconds="0.25", size="32x32", extra_body=FAST).id for i in range(3)]
    for video_id in ids:
        wait_for(video_id, client, ended, poll_s=0.1)
    # cursor pages: the SDK follows last_id / has_more
    newest_first = [v.id for v in client.videos.list(limit=100)]
    assert newest_first[:3] == ids[::-1]
    assert [v.id for v in client.videos.list(limit=1)] == newest_first  # auto-paging, one a page
    page = client.videos.list(limit=2, order="asc")
    assert page.has_more == (len(newest_first) > 2) and page.data[0].id == newest_first[-1]

    # another principal: 404 like a missing video, and not in their list
    for call in (bob.videos.retrieve, bob.videos.download_content, bob.videos.delete):
        with pytest.raises(openai.NotFoundError):
            call(ids[0])
    assert not set(ids) & {v.id for v in bob.videos.list()}
    assert client.videos.retrieve(ids[0]).status == "completed"  # bob's delete did nothing

    # 400 naming the field
    cases = [({"prompt": "x", "extra_body": {"bogus": 1}}, "bogus"),
             ({"prompt": "x", "seconds": "100"}, "seconds"),
             ({"prompt": "x", "size": "33x32"}, "size"),
             ({"prompt": "x", "input_reference": ("a.png", b"\x89PNG", "image/png")}, "input_reference"),  # text-only model
             ({"prompt": "x", "extra_body": {"seed": "seven"}}, "seed"),
             ({"prompt": "x", "model": "no-such-model"}, "model")]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as exc:
            client.videos.create(**kwargs)
        assert exc.value.body["param"] == param, exc.value.body
    with pytest.raises(openai.BadRequestError) as exc:
        client.videos.download_content(ids[0], variant="thumbnail")
    assert exc.value.body["code"] == "UNSUPPORTED_VARIANT"
    with pytest.raises(openai.AuthenticationError):
        sdk(server, "not-a-token-at-all-xxxxxxxx").videos.list()

    # plain JSON (curl) is accepted as well as the SDK's multipart
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", headers={"Authorization": f"Bearer {ALICE}"}, timeout=60) as http:
        made = http.post("/v1/videos", json={"prompt": "a fox", "seconds": 0.25, "size": "32x32", **FAST})
        assert made.status_code == 200 and made.json()["status"] == "queued" and made.json()["num_frames"] == 5
        png = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n").decode()
        refused = http.post("/v1/videos", json={"prompt": "a fox", "input_reference": {"image_url": png}})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "input_reference"
    wait_for(made.json()["id"], client, ended, poll_s=0.1)


def test_step_cache_and_loras_ride_along_as_json(server):
    """docs/acceleration.md's opt-ins beside OpenAI's fields (in the SDK's multipart form, JSON strings;
    in a JSON body, JSON): the video's job carries the same cache as the gRPC job with that cache, and
    makes the same MP4; bad values are 400s naming this API's field."""
    client = sdk(server)
    cache = {"policy": "first-block", "threshold": 0.2}
    small = {"seed": 5, "num_inference_steps": 4}
    video = client.videos.create(prompt="a red fox", seconds="0.25", size="32x32", extra_body={**small, "cache": json.dumps(cache)})
    assert wait_for(video.id, client, ended)[-1].status == "completed"
    mp4 = client.videos.download_content(video.id).content
    with grpc(server) as g:
        job = g.submit("a red fox", height=32, width=32, num_frames=5, cache=cache, **small)
        assert g.wait(job.id).state == 3  # JOB_STATE_SUCCEEDED
        ours, theirs = g.get(video.id).params.cache, g.get(job.id).params.cache
        assert ours.policy == "first-block" and ours == theirs, (ours, theirs)
        assert g.download(job.id) == mp4
    form = [({"cache": json.dumps({"policy": "first-block", "threshold": 11})}, "cache.threshold"),  # the engine's check
            ({"cache": "first-block"}, "cache"), ({"cache": json.dumps({"nonsense": 1})}, "cache"),
            ({"loras": json.dumps([{"name": "ink"}])}, "loras[0].name"),  # the model has no adapter "ink"
            ({"loras": json.dumps([{"name": "ink", "scale": "lots"}])}, "loras[0]"), ({"loras": json.dumps({"name": "ink"})}, "loras")]
    for body, param in form:
        with pytest.raises(openai.BadRequestError) as exc:
            client.videos.create(prompt="x", seconds="0.25", size="32x32", extra_body={**small, **body})
        assert exc.value.body["param"] == param, (body, exc.value.body)
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", headers={"Authorization": f"Bearer {ALICE}"}, timeout=60) as http:
        for body, param in [({"cache": {"policy": 3}}, "cache"), ({"loras": [{"name": "ink", "scale": 0.5}]}, "loras[0].name")]:
            refused = http.post("/v1/videos", json={"prompt": "x", "seconds": 0.25, "size": "32x32", **small, **body})
            assert refused.status_code == 400 and refused.json()["error"]["param"] == param, (body, refused.json())


def test_async_client(server):
    async def run() -> None:
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key=ALICE, max_retries=0) as client:
            video = await client.videos.create(prompt="an async fox", seconds="0.25", size="32x32", extra_body=FAST)
            done = await asyncio.wait_for(client.videos.poll(video.id, poll_interval_ms=50), WAIT_S)
            assert done.status == "completed" and done.progress == 100
            content = await client.videos.download_content(video.id)
            assert content.content[4:8] == b"ftyp"
            assert video.id in [v.id async for v in client.videos.list()]
            assert (await client.videos.delete(video.id)).deleted is True

    asyncio.run(run())


def test_the_readme_sdk_example_runs(server, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{server.http_port}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", ALICE)
    exec(SDK_EXAMPLE, {})
    assert capsys.readouterr().out.split() == ["completed", "100", "1.0625", "7"]  # 17 frames at 16 fps
    assert (tmp_path / "fox.mp4").read_bytes()[4:8] == b"ftyp"
