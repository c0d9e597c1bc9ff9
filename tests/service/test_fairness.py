"""Priorities and fairness (issue 13): a job's wait is bounded by the policy, not by another job's
length: a 2-step 32×32 job submitted while a long 256×256×9 job runs on the same worker ends
within 2 s of its solo time, with its solo output; the long job still succeeds. And the
`priority` field over the real API and CLI: the principal's default, its cap, the range.

Before the fair share (the oldest job's shape denoised first) the short job waited for the whole
long job: 26.5 s measured by this test on the code before it (0.2 s after)."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from conftest import ServerProcess
from diffserve.client import DiffserveError
from diffserve.v1 import generation_pb2 as pb
from jobs_util import npy_output, wait_step

# About 25-50 ms a step on the tiny model on this CPU: 10-20 s alone.
LONG = dict(prompt="a long walk", height=256, width=256, num_frames=9, num_inference_steps=400, seed=5, output_format="npy")
SHORT = dict(prompt="a quick look", height=32, width=32, num_frames=1, num_inference_steps=2, seed=6, output_format="npy")
MAX_WAIT_S = 2.0


def timed_output(client) -> tuple[np.ndarray, float]:
    start = time.monotonic()
    output = npy_output(client, client.submit(**SHORT).id)
    return output, time.monotonic() - start


@pytest.fixture(scope="module")
def server(tiny_wan, tmp_path_factory):
    # anonymous (no tokens file) gets default priority 10, which is also the most it may ask for
    server = ServerProcess(tiny_wan, tmp_path_factory.mktemp("server"), "--max-resident", "2", "--max-batch-size", "4",
                           "--principal-priority", "anonymous=10")
    yield server
    server.stop()


def test_priority_default_cap_and_range(server):
    client = server.client
    assert client.submit(**SHORT).priority == 10  # unset: the principal's default
    job = client.submit(**SHORT, priority=-3)  # lower is always allowed
    assert job.priority == -3 and client.wait(job.id).priority == -3
    for priority in (11, 101, -101):
        with pytest.raises(DiffserveError) as info:
            client.submit(**SHORT, priority=priority)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in info.value.field_violations] == ["priority"], info.value.field_violations
    with pytest.raises(DiffserveError) as info:
        list(client.generate(**SHORT, priority=11))
    assert [f for f, _ in info.value.field_violations] == ["priority"]

    cli = [sys.executable, "-m", "diffserve.client.cli", "generate", "--server", server.target, "--prompt", "x",
           "--height", "32", "--width", "32", "--num-frames", "1", "--num-inference-steps", "2"]
    done = subprocess.run([*cli, "--priority", "11"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "priority" in done.stderr, done.stderr
    done = subprocess.run([*cli, "--priority", "7"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_short_job_does_not_wait_for_a_long_one(server):
    client = server.client
    timed_output(client)  # warm-up
    solo, solo_s = timed_output(client)

    long = client.submit(**LONG)
    wait_step(client, long.id, 3)  # denoising, so the short job lands between its steps
    shared, shared_s = timed_output(client)
    waited = shared_s - solo_s
    running = client.get(long.id)

    assert running.state == pb.JOB_STATE_RUNNING and running.step < LONG["num_inference_steps"], "the long job ended first"
    assert waited <= MAX_WAIT_S, f"the short job waited {waited:.2f} s behind the long one (alone {solo_s:.2f} s)"
    assert np.array_equal(shared, solo)
    done = client.wait(long.id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    print(f"short job alone {solo_s:.2f} s, beside the long job {shared_s:.2f} s: waited {waited:.2f} s; "
          f"long job {LONG['num_inference_steps']} steps at step {running.step} then")
