"""The simulated worker (diffserve.worker.simulated) against a real `diffserve serve` with no local
worker: one process with 2 groups, authenticated with a key made and listed by `diffserve keys`.

Jobs succeed on both groups with outputs that are a pure function of the request; a scheduler
SIGKILLed and started again on the same endpoint is re-registered with (Reregister → Hello); a
stopping scheduler's Shutdown ends the simulated worker. Every wait is bounded.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from diffserve.v1 import generation_pb2 as pb
from diffserve.worker.simulated import sim_frames
from diffserve.worker.v1 import worker_pb2 as wpb
from jobs_util import free_port, wait_for

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
REQUESTS = [dict(prompt=f"a cat {i}", seed=i, height=16, width=24, num_frames=5, num_inference_steps=6, output_format="npy") for i in range(3)]


def cli(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "diffserve.client.cli", *args], capture_output=True, text=True, timeout=60, env=ENV)
    assert done.returncode == 0, done.stderr


class Scheduler:
    """`diffserve serve` without --model-path: workers join from outside."""

    def __init__(self, workdir: Path, worker_address: str, *extra: str, stderr: Path | None = None):
        ready = workdir / f"port-{time.monotonic_ns()}"
        cmd = [sys.executable, "-m", "diffserve.client.cli", "serve", "--port", "0", "--worker-bind", worker_address,
               "--state-dir", str(workdir / "state"), "--output-dir", str(workdir / "outputs"), "--ready-file", str(ready),
               "--log-level", "WARNING", *extra]
        if stderr is None:
            self.proc = subprocess.Popen(cmd, env=ENV)
        else:
            with open(stderr, "wb") as err:
                self.proc = subprocess.Popen(cmd, env=ENV, stderr=err)
        wait_for(lambda: ready.exists() or self.proc.poll() is not None, timeout_s=60, what="the scheduler to start")
        assert self.proc.poll() is None, f"serve exited with {self.proc.returncode}"
        from diffserve.client import Client

        self.client = Client(f"127.0.0.1:{ready.read_text()}")

    def serving(self, timeout_s: float = 30, groups: tuple[str, ...] = ()) -> None:
        """SERVING (Health.Watch: as soon as one group is registered), then, with `groups`, until
        exactly those groups are registered."""
        self.client.wait_until_serving(timeout_s, alive=lambda: self.proc.poll() is None)
        if groups:
            wait_for(lambda: sorted(w.id for m in self.client.list_models() for w in m.workers) == sorted(groups),
                     timeout_s=timeout_s, what=f"groups {', '.join(groups)} registered")

    def stop(self, sig: int = signal.SIGINT) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def output(client, job_id: str) -> np.ndarray:
    job = client.wait(job_id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    return np.load(io.BytesIO(client.download(job_id)))


def expected(client, job_id: str) -> np.ndarray:
    """What the simulated worker computes for the job's resolved request, all its steps run."""
    p = client.get(job_id).params
    request = wpb.Request(prompt=p.prompt, negative_prompt=p.negative_prompt, height=p.height, width=p.width, num_frames=p.num_frames,
                          num_inference_steps=p.num_inference_steps, seed=p.seed)
    return np.frombuffer(sim_frames(request, p.num_inference_steps), dtype=np.uint8).reshape(p.num_frames, p.height, p.width, 3)


@pytest.fixture
def keys(tmp_path):
    """A worker keypair listed in the scheduler's state folder, and the scheduler's public key file."""
    cli("keys", "new", "sim", "--out", str(tmp_path / "keys"))
    cli("keys", "--state-dir", str(tmp_path / "state"), "add", "sim", str(tmp_path / "keys" / "sim.key"))
    return tmp_path / "keys" / "sim.key_secret", tmp_path / "state" / "keys" / "scheduler.key"


def test_simulated_groups_serve_reregister_and_shut_down(tmp_path, keys):
    address = f"tcp://127.0.0.1:{free_port()}"
    scheduler = Scheduler(tmp_path, address)
    worker = subprocess.Popen([sys.executable, "-m", "diffserve.worker.simulated", "--scheduler", address, "--groups", "2",
                               "--worker-id", "sim", "--step-ms", "2", "--stage-ms", "1", "--max-batch-size", "2", "--max-resident", "2",
                               "--key-file", str(keys[0]), "--scheduler-key", str(keys[1]), "--log-level", "WARNING"], env=ENV)
    try:
        scheduler.serving(groups=("sim-0", "sim-1"))
        client = scheduler.client
        (model,) = client.list_models()
        assert model.name == "sim" and sorted(w.id for w in model.workers) == ["sim-0", "sim-1"]
        # every request twice: 6 jobs over 2 groups of 2 resident, batches of 2
        jobs = [client.submit(**r) for r in REQUESTS + REQUESTS]
        outs = [output(client, j.id) for j in jobs]
        for i, job in enumerate(jobs):
            assert outs[i].shape == (5, 16, 24, 3) and outs[i].dtype == np.uint8
            np.testing.assert_array_equal(outs[i], expected(client, job.id))
        for i in range(3):
            np.testing.assert_array_equal(outs[i], outs[i + 3])
        assert not np.array_equal(outs[0], outs[1])
        # both groups ran steps (their counters arrive with the next heartbeat)
        wait_for(lambda: all(w.step_commands > 0 for w in client.list_models()[0].workers), timeout_s=5, what="steps on both groups")

        # A scheduler killed and started again on the same endpoint does not know the groups:
        # they get Reregister, free everything and say Hello again.
        scheduler.stop(signal.SIGKILL)
        scheduler = Scheduler(tmp_path, address)
        scheduler.serving(timeout_s=20, groups=("sim-0", "sim-1"))  # Shutdown reaches registered groups only
        job = scheduler.client.submit(**REQUESTS[0])
        np.testing.assert_array_equal(output(scheduler.client, job.id), outs[0])

        # Stopping the scheduler sends Shutdown to every registered worker: the process exits.
        scheduler.stop()
        assert worker.wait(timeout=15) == 0
    finally:
        scheduler.stop()
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def test_without_keys_it_refuses_to_start():
    done = subprocess.run([sys.executable, "-m", "diffserve.worker.simulated", "--scheduler", "tcp://127.0.0.1:1"],
                          capture_output=True, text=True, timeout=30, env=ENV)
    assert done.returncode == 2 and "--key-file" in done.stderr


def test_json_log_has_a_line_per_job_event(tmp_path):
    """serve --log-format json: every stderr line is a JSON object; a job leaves submitted,
    started and succeeded lines with its id and principal (docs/cli.md "Logs")."""
    import json

    address = f"tcp://127.0.0.1:{free_port()}"
    log = tmp_path / "serve.err"
    scheduler = Scheduler(tmp_path, address, "--insecure-worker-plaintext", "--log-level", "INFO", "--log-format", "json", stderr=log)
    worker = subprocess.Popen([sys.executable, "-m", "diffserve.worker.simulated", "--scheduler", address, "--insecure-worker-plaintext",
                               "--step-ms", "1", "--stage-ms", "1", "--log-level", "WARNING"], env=ENV)
    try:
        scheduler.serving()
        job = scheduler.client.submit(**REQUESTS[0])
        output(scheduler.client, job.id)
        scheduler.stop()
    finally:
        scheduler.stop()
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    mine = [line for line in lines if line.get("job_id") == job.id]
    assert [line["job_event"] for line in mine] == ["submitted", "started", "succeeded"], lines
    assert all(line["principal"] == "anonymous" and line["logger"] == "diffserve.scheduler.joblog" for line in mine)
    assert mine[-1]["total_s"] >= mine[-1]["run_s"] >= 0
