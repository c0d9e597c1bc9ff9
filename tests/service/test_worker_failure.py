"""A worker that dies or stops answering loses no job: its jobs run again elsewhere (or on it once
restarted) up to --max-attempts, then fail quickly and clearly; the scheduler goes on."""

from __future__ import annotations

import os
import signal
import time

import grpc

from diffserve.v1 import generation_pb2 as pb
from jobs_util import LONG_JOB, final_event, npy_output, wait_step

VALID = dict(prompt="a cat", height=32, width=32, num_frames=1, num_inference_steps=2, output_format="npy")


def test_sigkill_fails_job_and_health_goes_not_serving(tiny_wan, start_server):
    server = start_server(tiny_wan, "--no-restart-workers", "--max-attempts", "1")
    client = server.client
    job = client.submit(**LONG_JOB)
    wait_step(client, job.id, 2)
    (pid,) = server.worker_pids()
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    last = final_event(client, job.id)
    assert time.monotonic() - killed < 10
    assert last.WhichOneof("event") == "failed"
    assert last.failed.status.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "worker" in last.failed.status.message and "SIGKILL" in last.failed.status.message
    server.wait_health("NOT_SERVING", timeout_s=5)
    # The scheduler keeps answering: models are listed as not serving, new jobs wait in the queue.
    (model,) = client.list_models()
    assert model.state == pb.SERVING_STATE_NOT_SERVING
    waiting = client.submit(**VALID)
    assert client.get(waiting.id).state == pb.JOB_STATE_QUEUED
    assert client.cancel(waiting.id).state == pb.JOB_STATE_CANCELLED


def test_restarted_worker_serves_queued_jobs(tiny_wan, start_server):
    """The running job goes back to the queue (attempt 2) and finishes on the restarted worker."""
    server = start_server(tiny_wan)
    client = server.client
    job = client.submit(**{**LONG_JOB, "num_inference_steps": 100})  # runs again in full: keep it short
    wait_step(client, job.id, 1)
    os.kill(server.worker_pids()[0], signal.SIGKILL)
    waiting = client.submit(**VALID)  # submitted while no worker serves: queued, not lost
    server.wait_health("SERVING", timeout_s=60)
    assert npy_output(client, waiting.id).shape == (1, 32, 32, 3)
    assert final_event(client, job.id).WhichOneof("event") == "completed"
    restarted = [e.restarted for e in client.events(job.id) if e.WhichOneof("event") == "restarted"]
    assert [r.attempt for r in restarted] == [2] and "SIGKILL" in restarted[0].reason
    assert client.get(job.id).attempt == 2


def test_silent_worker_is_declared_lost_and_comes_back(tiny_wan, start_server):
    """A stopped (not dead) worker misses heartbeats; when it resumes it registers again with no state."""
    server = start_server(tiny_wan, "--no-restart-workers", "--heartbeat-timeout", "2", "--max-attempts", "1")
    client = server.client
    job = client.submit(**LONG_JOB)
    wait_step(client, job.id, 1)
    (pid,) = server.worker_pids()
    os.kill(pid, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        last = final_event(client, job.id)
        assert time.monotonic() - stopped < 10
        assert last.WhichOneof("event") == "failed" and "heartbeat" in last.failed.status.message
        server.wait_health("NOT_SERVING", timeout_s=5)
    finally:
        os.kill(pid, signal.SIGCONT)
    server.wait_health("SERVING", timeout_s=20)
    assert npy_output(client, client.submit(**VALID).id).shape == (1, 32, 32, 3)
    (status,) = server.worker_status()
    assert status.alive
