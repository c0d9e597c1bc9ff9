"""The HTTP API's own job endpoints against a real `serve --http-port` (tiny Wan): submit, read,
stream events (SSE), download, cancel; health; errors in OpenAI's shape; the body cap; tokens."""

from __future__ import annotations

import io
import json
import socket

import httpx2 as httpx  # the HTTP client the openai SDK brings
import pytest
from PIL import Image

from tests.conftest import ServerProcess

PARAMS = {"prompt": "a red fox", "height": 32, "width": 32, "num_frames": 1, "num_inference_steps": 3, "seed": 7}


@pytest.fixture(scope="module")
def http_server(tiny_wan, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("http")
    tokens = workdir / "tokens.txt"
    tokens.write_text("alice alice-token-0123456789abcdef\nbob bob-token-0123456789abcdef\n")
    tokens.chmod(0o600)
    server = ServerProcess(tiny_wan, workdir, "--http-port", "0", "--auth-tokens", str(tokens), "--warmup-shape", "32x32x1")
    yield server
    server.stop()


def client(server: ServerProcess, token: str | None = "alice-token-0123456789abcdef") -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", headers=headers, timeout=60)


def sse_events(response: httpx.Response) -> list[tuple[str, str, dict]]:
    """(id, event, data) of each SSE event."""
    out, fields = [], {}
    for line in response.iter_lines():
        if line.startswith(":"):
            continue
        if not line:
            if fields:
                out.append((fields["id"], fields["event"], json.loads(fields["data"])))
            fields = {}
            continue
        name, _, value = line.partition(": ")
        fields[name] = value
    return out


def test_submit_stream_download(http_server):
    with client(http_server) as http:
        assert http.get("/health").json() == {"status": "SERVING"}
        (model,) = http.get("/v1/models").json()["data"]
        created = http.post("/v1/jobs", json={"params": {"model": model["id"], **PARAMS}, "client_request_id": "one"})
        assert created.status_code == 201, created.text
        job = created.json()["job"]
        with http.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = sse_events(stream)
        kinds = [kind for _, kind, _ in events]
        assert kinds[-1] == "completed"
        steps = [data["step_completed"]["step"] for _, kind, data in events if kind == "step_completed"]
        assert steps == [1, 2, 3]
        assert [int(i) for i, _, _ in events] == list(range(1, len(events) + 1))
        # a reconnect with Last-Event-ID gets only what came after
        with http.stream("GET", f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": events[-2][0]}) as stream:
            assert [kind for _, kind, _ in sse_events(stream)] == ["completed"]
        done = http.get(f"/v1/jobs/{job['id']}").json()
        assert done["state"] == "JOB_STATE_SUCCEEDED"
        content = http.get(f"/v1/jobs/{job['id']}/content")
        assert content.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(content.content)).size == (32, 32)
        # the same bytes as over gRPC
        assert content.content == http_server.client.__class__(http_server.target, token="alice-token-0123456789abcdef").download(job["id"])
        # idempotent repeat: the same job, 200
        again = http.post("/v1/jobs", json={"params": {"model": model["id"], **PARAMS}, "client_request_id": "one"})
        assert again.status_code == 200 and again.json()["job"]["id"] == job["id"]
        assert job["id"] in [j["id"] for j in http.get("/v1/jobs").json()["data"]]


def test_errors_are_openai_shaped(http_server):
    with client(http_server, token=None) as anon:
        refused = anon.get("/v1/models")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "MISSING_TOKEN"
        assert anon.get("/health").status_code == 200  # open for probes
    with client(http_server, token="not-a-token-at-all-xxxxxxxx") as bad:
        assert bad.get("/v1/models").json()["error"]["code"] == "INVALID_TOKEN"
    with client(http_server) as http:
        model = http.get("/v1/models").json()["data"][0]["id"]
        bad = http.post("/v1/jobs", json={"params": {"model": model, **PARAMS, "width": 33}})
        assert bad.status_code == 400
        error = bad.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == "params.width" and "multiple" in error["message"]
        assert http.post("/v1/jobs", content=b"{not json").json()["error"]["param"] == "body"
        assert http.get("/v1/jobs/nope").status_code == 404
        assert http.get("/v1/nothing-here").json()["error"]["code"] == "NOT_FOUND"
        # another principal's job is answered like a missing one
        job = http.post("/v1/jobs", json={"params": {"model": model, **PARAMS}}).json()["job"]
    with client(http_server, token="bob-token-0123456789abcdef") as bob:
        assert bob.get(f"/v1/jobs/{job['id']}").status_code == 404
        assert bob.delete(f"/v1/jobs/{job['id']}").status_code == 404
    # a body over the cap is refused before it is read: a declared 1 TiB answered at once
    with socket.create_connection(("127.0.0.1", http_server.http_port), timeout=30) as raw:
        raw.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer bob-token-0123456789abcdef\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 1099511627776\r\n\r\n{")
        reply = b""
        while b"}}" not in reply and len(reply) < 65536:  # the JSON error body ends with "}}"
            chunk = raw.recv(65536)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413") and b"BODY_TOO_LARGE" in reply


def test_cancel_over_http(http_server):
    with client(http_server) as http:
        model = http.get("/v1/models").json()["data"][0]["id"]
        job = http.post("/v1/jobs", json={"params": {"model": model, **PARAMS, "num_inference_steps": 50}}).json()["job"]
        cancelled = http.delete(f"/v1/jobs/{job['id']}")
        assert cancelled.status_code == 200
        with http.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
            kinds = [kind for _, kind, _ in sse_events(stream)]
        assert kinds[-1] == "cancelled"
        assert http.get(f"/v1/jobs/{job['id']}/content").json()["error"]["code"] == "NO_ARTIFACT"


def test_a_port_in_use_is_one_line_and_exit_2(tmp_path):
    """--http-port / --port on a port something else holds: one line naming the flag, exit 2, no traceback."""
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flags, flag in ((["--http-port", str(port), "--port", "0"], "--http-port"), (["--port", str(port)], "--port")):
            done = subprocess.run([sys.executable, "-m", "diffserve.client.cli", "serve", *flags, "--state-dir", str(tmp_path / "state"),
                                   "--output-dir", str(tmp_path / "out"), "--log-level", "ERROR"], capture_output=True, text=True, timeout=60)
            assert done.returncode == 2, done.stderr
            lines = [line for line in done.stderr.splitlines() if "add_port.cc" not in line]  # grpc's own C-core line
            assert len(lines) == 1 and lines[0].startswith(f"error: {flag} {port}: cannot listen on 127.0.0.1:{port} ("), done.stderr
            assert "Traceback" not in done.stderr
