"""The scheduler is SIGKILLed with jobs finished, running and queued, and started again on the same
port, state folder and output folder (issue 13): nothing a client was told about is lost.

A real `diffserve serve` with the tiny Wan model and --max-resident 1, so jobs queue behind the
running one. The scheduler and its worker are both killed (nothing is left to finish anything).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import psutil
from conftest import ServerProcess
from jobs_util import LONG_JOB, npy_output, wait_step

from diffserve.v1 import generation_pb2 as pb

SHORT = dict(prompt="a short walk", height=32, width=32, num_frames=1, num_inference_steps=2, guidance_scale=5.0, output_format="npy")
RUNNING = dict(LONG_JOB, num_inference_steps=600)  # long enough to kill mid-denoise (~3 s at ~5 ms a step), short enough to run twice
FLAGS = ("--max-resident", "1", "--max-batch-size", "1")


def kill_everything(server: ServerProcess) -> None:
    """SIGKILL to the scheduler and to every process under it (its workers): a crash, no goodbyes."""
    children = psutil.Process(server.proc.pid).children(recursive=True)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=10)
    for child in children:
        try:
            child.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"still running after SIGKILL: {alive}"
    server.client.close()


def restarted_events(client, job_id: str) -> list[tuple[int, str]]:
    return [(e.restarted.attempt, e.restarted.reason) for e in client.events(job_id) if e.HasField("restarted")]


def test_a_killed_scheduler_restarts_with_every_job(tiny_wan, tmp_path):
    workdir = tmp_path / "server"
    workdir.mkdir()
    servers = [ServerProcess(tiny_wan, workdir, *FLAGS)]
    try:
        client = servers[0].client
        finished = [client.submit(**SHORT, seed=seed) for seed in (1, 2)]
        before = {}
        for job in finished:
            npy_output(client, job.id)
            before[job.id] = (client.get(job.id), client.download(job.id), list(client.events(job.id)))
        running = client.submit(**RUNNING)
        queued = [client.submit(**SHORT, seed=seed) for seed in (11, 12)]
        keyed = client.submit(**SHORT, seed=13, client_request_id="restart-key")
        wait_step(client, running.id, 3)
        assert client.get(queued[0].id).state == pb.JOB_STATE_QUEUED
        port = servers[0].port
        kill_everything(servers[0])

        servers.append(ServerProcess(tiny_wan, workdir, *FLAGS, port=port))
        client = servers[1].client
        # Finished jobs answer as they were, and their artifacts download; nothing re-ran them.
        for job_id, (job, data, events) in before.items():
            again = client.get(job_id)
            assert again.state == pb.JOB_STATE_SUCCEEDED and again.end_time == job.end_time and again.attempt == 1
            assert client.download(job_id) == data
            assert list(client.events(job_id)) == events
        # The idempotency key still names its job.
        assert client.submit(**SHORT, seed=13, client_request_id="restart-key").id == keyed.id
        outputs = {job.id: npy_output(client, job.id) for job in (running, *queued, keyed)}
        # The running job started again from step 0 (attempt 2); the queued ones ran once, in order.
        assert client.get(running.id).attempt == 2
        assert restarted_events(client, running.id) == [(2, "the scheduler restarted")]
        for job in (*queued, keyed):
            assert client.get(job.id).attempt == 1 and restarted_events(client, job.id) == []
        starts = [client.get(job.id).start_time.ToNanoseconds() for job in (running, *queued, keyed)]
        assert starts == sorted(starts)
        # Each output equals the same request's solo run.
        for job, params in ((running, RUNNING), (queued[0], dict(SHORT, seed=11)), (queued[1], dict(SHORT, seed=12)), (keyed, dict(SHORT, seed=13))):
            solo = client.submit(**params)
            np.testing.assert_array_equal(npy_output(client, solo.id), outputs[job.id])
    finally:
        for server in servers:
            if server.proc.poll() is None:
                server.stop()


def _serve(state_dir, tmp_path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "diffserve.client.cli", "serve", "--port", "0", "--state-dir", str(state_dir),
           "--output-dir", str(tmp_path / "outputs"), "--log-level", "WARNING"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_damaged_store_stops_serve_with_a_clear_error(tmp_path):
    """A truncated store (and one of garbage) ends `diffserve serve` with exit code 2 and one
    message naming the file and what to do: no traceback, and no silent start with an empty store."""
    from diffserve.scheduler.jobs import Job, JobTable
    from diffserve.scheduler.store import JobStore

    state = tmp_path / "state"
    path = state / "jobs.sqlite3"
    store = JobStore.open(path)
    table = JobTable()
    table.attach(store)
    for seed in range(300):
        table.add(Job(params=pb.GenerationParams(prompt="a prompt long enough to fill pages " * 10, seed=seed)))
    store.close()
    data = path.read_bytes()
    for broken in (data[: len(data) // 2], b"not a database" * 100):
        path.write_bytes(broken)
        result = _serve(state, tmp_path)
        assert result.returncode == 2, result.stderr
        assert str(path) in result.stderr and "move it aside" in result.stderr and "Traceback" not in result.stderr
        assert path.read_bytes() == broken  # left as it was, for the operator
