"""Replicas: two local worker groups serve one model; losing one mid-load loses no job."""

from __future__ import annotations

import os
import signal

import psutil

from diffserve.v1 import generation_pb2 as pb
from jobs_util import npy_output, wait_for, wait_step
from reference import max_level_diff

COMMON = dict(height=32, width=32, num_frames=1, num_inference_steps=40, output_format="npy")
PROMPTS = ["a cat", "a dog", "a bird", "a fish", "a horse", "a frog"]


def replica_pids(server, worker_id: str) -> list[int]:
    return [c.pid for c in psutil.Process(server.proc.pid).children()
            if "diffserve.worker" in " ".join(c.cmdline()) and worker_id in c.cmdline()]


def test_sigkill_of_one_replica_loses_no_job(tiny_wan, start_server):
    server = start_server(tiny_wan, "--replicas", "2", "--max-resident", "2", "--max-batch-size", "2", "--no-restart-workers")
    client = server.client
    wait_for(lambda: len([w for w in server.worker_status() if w.alive]) == 2, timeout_s=120, what="both replicas to register")
    jobs = [client.submit(prompt=p, seed=100 + i, **COMMON) for i, p in enumerate(PROMPTS)]
    wait_step(client, jobs[0].id, 2)
    (victim,) = replica_pids(server, "local-0")
    os.kill(victim, signal.SIGKILL)

    finished = [client.wait(j.id) for j in jobs]
    assert [j.state for j in finished] == [pb.JOB_STATE_SUCCEEDED] * len(jobs), [j.error for j in finished]
    moved = [j for j in finished if j.attempt == 2]
    assert moved, "no job was running on the killed replica"
    for job in moved:
        (restarted,) = [e.restarted for e in client.events(job.id) if e.WhichOneof("event") == "restarted"]
        assert restarted.attempt == 2 and "local-0" in restarted.reason
    assert [w.id for w in server.worker_status() if w.alive] == ["local-1"]
    server.wait_health("SERVING", timeout_s=1)

    outputs = [npy_output(client, j.id) for j in jobs]
    for i, (prompt, output) in enumerate(zip(PROMPTS, outputs)):  # each alone on the surviving replica
        solo = npy_output(client, client.submit(prompt=prompt, seed=100 + i, **COMMON).id)
        assert max_level_diff(output, solo) <= 2
