"""The client's retries against a real `diffserve serve` (no model: a simulated worker joins, no
torch): a submit with a client_request_id refused with RESOURCE_EXHAUSTED (--max-queue 1) is tried
again after the server's RetryInfo delay and gets in once the queue has room; without an id it is
refused at once, as before. Readiness through Health.Watch (Client.wait_until_serving) is waited
for before the server exists. Every wait is bounded."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import grpc
import pytest

from diffserve.client import Client, DiffserveError
from diffserve.v1 import generation_pb2 as pb
from tests.conftest import interrupt
from jobs_util import free_port as _free_port, wait_for

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SMALL = dict(height=16, width=16, num_frames=1, output_format="npy")


@pytest.fixture
def sim_server(tmp_path):
    """(client, target): serve --max-queue 1 with one simulated worker group of --max-resident 1.

    Also the readiness wait (Health.Watch): a client starts waiting before the server exists; it
    returns once the worker has joined, not before."""
    worker_bind = f"tcp://127.0.0.1:{_free_port()}"
    target = f"127.0.0.1:{_free_port()}"
    ready = tmp_path / "port"
    procs: list[subprocess.Popen] = []
    client = Client(target)
    early: list = []
    waiter = threading.Thread(target=lambda: early.append(_outcome(client.wait_until_serving, 90)), daemon=True)
    waiter.start()  # nothing listens yet: it waits for the connection (wait_for_ready)
    try:
        time.sleep(0.5)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "diffserve.client.cli", "serve", "--port", target.rsplit(":", 1)[1], "--worker-bind", worker_bind,
             "--insecure-worker-plaintext", "--state-dir", str(tmp_path / "state"), "--output-dir", str(tmp_path / "outputs"),
             "--ready-file", str(ready), "--max-queue", "1", "--drain-timeout", "0", "--log-level", "WARNING"], env=ENV))
        wait_for(lambda: ready.exists() or procs[0].poll() is not None, 60, 0.05, "the scheduler to start")
        assert procs[0].poll() is None
        with Client(target) as other, pytest.raises(DiffserveError) as info:  # no worker yet: NOT_SERVING until the deadline
            other.wait_until_serving(3.0)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and "NOT_SERVING" in info.value.message
        assert waiter.is_alive() and not early
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "diffserve.worker.simulated", "--scheduler", worker_bind, "--insecure-worker-plaintext",
             "--max-resident", "1", "--max-batch-size", "1", "--step-ms", "50", "--log-level", "WARNING"], env=ENV))
        waiter.join(timeout=90)
        assert early == ["SERVING"]
        assert client.health() == "SERVING"
        yield client, target
    finally:
        client.close()
        for proc in reversed(procs):
            interrupt(proc)


def _outcome(wait, timeout_s: float) -> str:
    try:
        wait(timeout_s)
        return "SERVING"
    except DiffserveError as err:
        return str(err)


def test_resource_exhausted_is_retried_after_retry_info(sim_server):
    client, target = sim_server
    running = client.submit("long", num_inference_steps=400, **SMALL)  # 20 s of 50 ms steps
    wait_for(lambda: client.get(running.id).state == pb.JOB_STATE_RUNNING, 30, 0.05, "the first job to run")
    queued = client.submit("queued", num_inference_steps=1, **SMALL)
    # Without a client_request_id a refused submit is not retried (it is not idempotent).
    start = time.monotonic()
    with pytest.raises(DiffserveError) as info:
        client.submit("refused", num_inference_steps=1, **SMALL)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and info.value.retry_delay_s > 0
    assert time.monotonic() - start < info.value.retry_delay_s
    delay = info.value.retry_delay_s
    # With one it is tried again after the RetryInfo delay: the queue has room by then.
    threading.Timer(1.0, client.cancel, (running.id,)).start()
    start = time.monotonic()
    job = client.submit("retried", num_inference_steps=1, client_request_id="retry-1", **SMALL)
    waited = time.monotonic() - start
    assert delay * 0.9 <= waited < delay * 3, waited
    assert client.wait(job.id).state == pb.JOB_STATE_SUCCEEDED
    assert client.wait(queued.id).state == pb.JOB_STATE_SUCCEEDED
    # Bounded: retries=0 (or a deadline shorter than the delay) gives up at once.
    blocker = client.submit("long again", num_inference_steps=400, **SMALL)
    wait_for(lambda: client.get(blocker.id).state == pb.JOB_STATE_RUNNING, 30, 0.05, "the blocker to run")
    client.submit("queued again", num_inference_steps=1, **SMALL)
    with Client(target, retries=0) as impatient, pytest.raises(DiffserveError) as info:
        impatient.submit("no retry", num_inference_steps=1, client_request_id="retry-2", **SMALL)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    with Client(target, timeout_s=1.0) as short, pytest.raises(DiffserveError) as info:
        short.submit("no time", num_inference_steps=1, client_request_id="retry-3", **SMALL)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    client.cancel(blocker.id)
