"""Helpers for tests that drive jobs through a real server."""

from __future__ import annotations

import io
import socket
import time

import numpy as np

from diffserve.v1 import generation_pb2 as pb


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout_s: float = 10.0, interval_s: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def wait_step(client, job_id: str, step: int) -> None:
    """Blocks until the job has reported `step` denoising steps (or ended)."""
    for event in client.events(job_id):
        if event.WhichOneof("event") == "step_completed" and event.step_completed.step >= step:
            return
        if event.WhichOneof("event") in ("completed", "failed", "cancelled"):
            raise AssertionError(f"job ended before step {step}: {event}")


def final_event(client, job_id: str) -> pb.JobEvent:
    events = list(client.events(job_id))
    assert events[-1].WhichOneof("event") in ("completed", "failed", "cancelled")
    return events[-1]


def npy_output(client, job_id: str) -> np.ndarray:
    job = client.wait(job_id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    return np.load(io.BytesIO(client.download(job_id)))


def resident_jobs(server) -> int:
    return sum(w.resident_jobs for w in server.worker_status())


# A job long enough to act on while it runs: a few ms per step on the tiny model.
LONG_JOB = dict(prompt="a long walk", height=32, width=32, num_frames=1, num_inference_steps=1000, guidance_scale=5.0, seed=3, output_format="npy")


def settled(server, rows: int):
    """The worker's counters once a heartbeat shows `rows` rows run and no resident job (counters
    arrive with heartbeats, 1 s apart)."""

    def status():
        (worker,) = server.worker_status()
        return worker if worker.resident_jobs == 0 and worker.denoise_rows >= rows else None

    return wait_for(status, what=f"the worker to report {rows} rows and no resident jobs")
