"""Attacks on the scheduler's worker endpoint (ZeroMQ, CURVE + ZAP), over real sockets on loopback.

One `diffserve serve` (tiny Wan, CURVE on by default with its keys in the test's state folder) is
attacked by fake workers speaking the real protocol: a key that is not listed, a peer in plain
TCP, a listed key taking another worker's routing id. A real remote worker
(`diffserve worker` with `diffserve keys` files) registers and serves. Every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from conftest import ServerProcess
from diffserve.v1 import generation_pb2 as pb
from diffserve.worker.v1 import worker_pb2 as wpb
from jobs_util import free_port, npy_output, wait_for

MODEL = "tiny-wan"  # the tiny checkpoint's folder name
VALID = dict(prompt="a cat", height=32, width=32, num_frames=1, num_inference_steps=2, output_format="npy", model=MODEL)


def diffserve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "diffserve.client.cli", *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def server(tiny_wan, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("auth")
    address = f"tcp://127.0.0.1:{free_port()}"
    server = ServerProcess(tiny_wan, workdir, "--worker-bind", address)
    server.worker_address = address
    server.state_dir = workdir / "state"
    yield server
    server.stop()


class FakeWorker:
    """A DEALER speaking the worker protocol with the keys (or none) a test gives it."""

    def __init__(self, address: str, routing_id: str, keys: tuple[bytes, bytes] | None, server_key: bytes | None):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, routing_id.encode())
        if keys is not None:
            self.sock.setsockopt(zmq.CURVE_PUBLICKEY, keys[0])
            self.sock.setsockopt(zmq.CURVE_SECRETKEY, keys[1])
            self.sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
        self.monitor = self.sock.get_monitor_socket()
        self.sock.connect(address)

    def _send(self, msg: wpb.WorkerMessage) -> None:
        try:  # a refused peer has no connection to queue on: never block the test
            self.sock.send(msg.SerializeToString(), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def hello(self, model: str) -> None:
        card = wpb.ModelCard(name=model, family="wan2.1", task="text-to-video")
        hello = wpb.Hello(protocol_version=wpb.PROTOCOL_VERSION_3, description="fake", card=card, max_batch_size=4, max_resident=8, world_size=1)
        self._send(wpb.WorkerMessage(hello=hello))

    def heartbeat(self, n: int) -> None:
        self._send(wpb.WorkerMessage(heartbeat=wpb.Heartbeat(sequence=n)))

    def received(self, seconds: float) -> list[wpb.Command]:
        """Says Hello and heartbeats for `seconds`; the commands the scheduler sent meanwhile."""
        got = []
        deadline = time.monotonic() + seconds
        n = 0
        while time.monotonic() < deadline:
            n += 1
            self.heartbeat(n)
            if self.sock.poll(200):
                got.append(wpb.Command.FromString(self.sock.recv()))
        return got

    def events(self, seconds: float) -> set[int]:
        """Socket monitor events seen within `seconds` (e.g. zmq.EVENT_HANDSHAKE_FAILED_AUTH)."""
        seen = set()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.monitor.poll(100):
                seen.add(recv_monitor_message(self.monitor)["event"])
        return seen

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)
        self.ctx.term()


def scheduler_key(server) -> bytes:
    public, _ = zmq.auth.load_certificate(str(server.state_dir / "keys" / "scheduler.key"))
    return public


def listed_keypair(server, tmp_path: Path, name: str) -> tuple[bytes, bytes]:
    """A worker keypair made and listed with the real `diffserve keys` commands."""
    diffserve("keys", "new", name, "--out", str(tmp_path))
    diffserve("keys", "--state-dir", str(server.state_dir), "add", name, str(tmp_path / f"{name}.key"))
    return zmq.auth.load_certificate(str(tmp_path / f"{name}.key_secret"))


def models(server) -> dict[str, pb.Model]:
    return {m.name: m for m in server.client.list_models()}


def still_serves(server) -> None:
    """Only the real local worker is registered for the model, and a job still runs on it."""
    model = models(server)[MODEL]
    assert [w.id for w in model.workers] == ["local-0"] and model.workers[0].alive
    assert server.client.health() == "SERVING"
    job = server.client.submit(**VALID)
    assert npy_output(server.client, job.id).shape == (1, 32, 32, 3)


def test_state_folder_is_private(server):
    keys = server.state_dir / "keys"
    assert (server.state_dir.stat().st_mode & 0o777) == 0o700 and (keys.stat().st_mode & 0o777) == 0o700
    for secret in keys.glob("*.key_secret"):
        assert (secret.stat().st_mode & 0o777) == 0o600, secret
    # the local worker got its key by path, never the secret itself in argv
    (pid,) = server.worker_pids()
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    secret = zmq.auth.load_certificate(str(keys / "local.key_secret"))[1]
    assert b"--key-file" in argv and not any(secret in arg for arg in argv)


def test_unlisted_key_is_refused(server):
    public, secret = zmq.curve_keypair()
    fake = FakeWorker(server.worker_address, "evil-1", (public, secret), scheduler_key(server))
    try:
        assert zmq.EVENT_HANDSHAKE_FAILED_AUTH in fake.events(5), "the scheduler did not refuse the key"
        fake.hello("evil-model")
        assert fake.received(2) == []  # no Welcome, no work
    finally:
        fake.close()
    assert "evil-model" not in models(server)
    still_serves(server)


def test_plaintext_peer_gets_nowhere(server):
    fake = FakeWorker(server.worker_address, "plain-1", None, None)
    try:
        fake.hello("plain-model")
        assert fake.received(3) == []
        assert zmq.EVENT_HANDSHAKE_SUCCEEDED not in fake.events(0.5)
    finally:
        fake.close()
    # raw bytes on the port do not reach the engine either
    host, port = server.worker_address.removeprefix("tcp://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(b"\xff" + b"\x00" * 8 + b"\x7f\x03\x00NULL" + b"\x00" * 48 + b"junk" * 100)
        time.sleep(0.5)
    assert "plain-model" not in models(server)
    still_serves(server)


def test_listed_key_cannot_take_the_local_workers_id(server, tmp_path):
    keys = listed_keypair(server, tmp_path, "hijacker")
    fake = FakeWorker(server.worker_address, "local-0", keys, scheduler_key(server))
    try:
        fake.hello(MODEL)
        assert fake.received(3) == []  # neither Welcome nor any user's work
        still_serves(server)  # the real local-0 keeps its connection and its jobs
        assert fake.received(0.5) == []
    finally:
        fake.close()


def test_routing_id_stays_with_its_first_key(server, tmp_path):
    owner_keys = listed_keypair(server, tmp_path, "owner")
    other_keys = listed_keypair(server, tmp_path, "other")
    owner = FakeWorker(server.worker_address, "shared-id", owner_keys, scheduler_key(server))
    try:
        owner.hello("owner-model")
        assert any(c.HasField("welcome") for c in owner.received(3))  # a listed key registers
    finally:
        owner.close()
    # The owner has gone; another listed key now connects with its id: refused by the scheduler.
    other = FakeWorker(server.worker_address, "shared-id", other_keys, scheduler_key(server))
    try:
        assert zmq.EVENT_HANDSHAKE_SUCCEEDED in other.events(3)  # its key is fine...
        other.hello("other-model")
        assert other.received(2) == []  # ...but the id is not its own
    finally:
        other.close()
    assert "other-model" not in models(server)


def test_keys_remove_refuses_the_next_connection(server, tmp_path):
    keys = listed_keypair(server, tmp_path, "gone")
    diffserve("keys", "--state-dir", str(server.state_dir), "remove", "gone")
    fake = FakeWorker(server.worker_address, "gone-1", keys, scheduler_key(server))
    try:
        assert zmq.EVENT_HANDSHAKE_FAILED_AUTH in fake.events(5)
    finally:
        fake.close()
    listing = diffserve("keys", "--state-dir", str(server.state_dir), "list").stdout
    assert "gone" not in listing and "scheduler " in listing


def test_listed_remote_worker_registers_and_serves(server, tiny_wan, tmp_path):
    diffserve("keys", "new", "gpu-a", "--out", str(tmp_path))
    diffserve("keys", "--state-dir", str(server.state_dir), "add", "gpu-a", str(tmp_path / "gpu-a.key"))
    pub = diffserve("keys", "--state-dir", str(server.state_dir), "scheduler").stdout.strip()
    cmd = [sys.executable, "-m", "diffserve.client.cli", "worker", "--scheduler", server.worker_address, "--model-path", str(tiny_wan),
           "--model-name", "tiny-remote", "--device", "cpu", "--key-file", str(tmp_path / "gpu-a.key_secret"), "--scheduler-key", pub,
           "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_for(lambda: models(server).get("tiny-remote") and models(server)["tiny-remote"].state == pb.SERVING_STATE_SERVING,
                 timeout_s=120, interval_s=0.2, what="the remote worker to register")
        job = server.client.submit(**{**VALID, "model": "tiny-remote"})
        assert npy_output(server.client, job.id).shape == (1, 32, 32, 3)
        # it ran on the remote worker (the only one serving that name; its status arrives with a heartbeat)
        wait_for(lambda: models(server)["tiny-remote"].workers[0].step_commands >= 1, timeout_s=10, what="the remote worker's steps")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_worker_without_keys_is_refused_at_start(tiny_wan):
    done = subprocess.run([sys.executable, "-m", "diffserve.client.cli", "worker", "--scheduler", "tcp://127.0.0.1:1", "--model-path", str(tiny_wan)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--key-file" in done.stderr


def test_plaintext_refused_off_loopback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "diffserve.client.cli", "serve", "--worker-bind", "tcp://0.0.0.0:0", "--insecure-worker-plaintext",
                           "--port", "0", "--output-dir", str(tmp_path / "out"), "--state-dir", str(tmp_path / "state")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "loopback" in done.stderr
    assert not (tmp_path / "state").exists()
