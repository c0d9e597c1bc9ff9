"""The HTTP API against hostile clients, for real, on loopback: trickled headers (slowloris), garbage
bytes, huge headers, bodies streamed past the cap, wrong JSON types. Each time the scheduler keeps
serving everyone else. The scheduler runs without a model (no worker: nothing here needs one)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx2 as httpx  # the HTTP client the openai SDK brings
import pytest

from tests.conftest import interrupt

TOKEN = "alice-token-0123456789abcdef"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("attack-http")
    tokens = workdir / "tokens.txt"
    tokens.write_text(f"alice {TOKEN}\n")
    tokens.chmod(0o600)
    ready = workdir / "ready"
    proc = subprocess.Popen([sys.executable, "-m", "diffserve.client.cli", "serve", "--port", "0", "--http-port", "0",
                             "--auth-tokens", str(tokens), "--state-dir", str(workdir / "state"), "--output-dir", str(workdir / "out"),
                             "--ready-file", str(ready), "--log-level", "ERROR"])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        yield int(ready.read_text().split()[1]), proc
    finally:
        interrupt(proc)


def answers(port: int, timeout_s: float = 10) -> bool:
    """A well-behaved client is served promptly."""
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=timeout_s) as http:
        return http.get("/v1/models").json() == {"object": "list", "data": []}


def read_reply(s: socket.socket, until: bytes = b"") -> bytes:
    """What comes back until `until` is seen, the server closes, or the socket's timeout passes."""
    reply = b""
    try:
        while len(reply) < 1 << 20 and not (until and until in reply):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return reply


def raw(port: int, data: bytes, timeout_s: float = 10) -> bytes:
    """Sends data, returns what comes back until the server closes or timeout_s passes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(data)
        return read_reply(s)


def test_trickled_headers_do_not_starve_others(server):
    port, proc = server
    slow = []
    try:
        for _ in range(100):  # slowloris: many connections, each a few header bytes at a time
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
            slow.append(s)
        for i in range(3):
            for s in slow:
                s.sendall(f"X-Trickle-{i}: a\r\n".encode())
            started = time.monotonic()
            assert answers(port)
            assert time.monotonic() - started < 5
    finally:
        for s in slow:
            s.close()
    assert proc.poll() is None


def test_garbage_and_huge_headers_drop_that_client_only(server):
    port, proc = server
    assert not raw(port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) * 4).startswith(b"HTTP/1.1 200")
    assert raw(port, b"NOT HTTP AT ALL\r\n\r\n").startswith(b"HTTP/1.1 400")
    huge = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (256 << 10) + b"\r\n\r\n"
    reply = raw(port, huge)
    assert reply == b"" or reply.split(b" ", 2)[1][:1] == b"4"  # refused (4xx) or closed; never served
    assert answers(port) and proc.poll() is None


def test_a_body_streamed_past_the_cap_is_cut_off(server):
    port, proc = server
    head = (b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() +
            b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head)
        try:
            for _ in range(200):  # 200 MiB offered, more than the 128 MiB cap
                s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        s.settimeout(10)
        reply = read_reply(s, until=b"}}")  # the JSON error body ends with "}}"
    assert reply.startswith(b"HTTP/1.1 413") and b"BODY_TOO_LARGE" in reply, reply[:300]
    assert answers(port) and proc.poll() is None


def test_a_stalled_body_does_not_hold_others(server):
    port, proc = server
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() +
                  b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"params\":")
        assert answers(port)
    assert proc.poll() is None


@pytest.mark.parametrize("body, param", [
    (b'{"params": "a fox"}', "body"),
    (b'{"params": {"prompt": 7}}', "body"),
    (b'{"params": {"prompt": "x", "height": "tall"}}', "body"),
    (b'[1, 2, 3]', "body"),
    (b'{"params": {"prompt": "x"}, "priority": 1e300}', "body"),
])
def test_wrong_json_types_are_400s(server, body, param):
    port, proc = server
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10) as http:
        reply = http.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param
    assert proc.poll() is None
