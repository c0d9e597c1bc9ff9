"""Cancel, client cancellation and deadlines stop a job at the next step boundary and free its state."""

from __future__ import annotations

import time

import grpc
import pytest

from diffserve.client import DiffserveError
from diffserve.v1 import generation_pb2 as pb
from jobs_util import LONG_JOB, final_event, npy_output, resident_jobs, wait_for, wait_step


def test_cancel_job_mid_denoise(wan_server):
    client = wan_server.client
    job = client.submit(**LONG_JOB)
    wait_step(client, job.id, 3)
    reply = client.cancel(job.id)
    assert reply.state in (pb.JOB_STATE_RUNNING, pb.JOB_STATE_CANCELLED)
    # The job as the scheduler saw it when it took the cancel (the client's own count would be stale
    # by the steps run while the call travelled, many on a loaded machine).
    at_cancel = reply.step
    last = final_event(client, job.id)
    assert last.WhichOneof("event") == "cancelled"
    assert last.cancelled.status.code == grpc.StatusCode.CANCELLED.value[0]
    done = client.get(job.id)
    assert done.state == pb.JOB_STATE_CANCELLED
    assert done.step <= at_cancel + 1, "ran more than one step after the cancel"
    wait_for(lambda: resident_jobs(wan_server) == 0, what="the worker to free the cancelled job")
    # Cancelling again is harmless; the server goes on serving.
    assert client.cancel(job.id).state == pb.JOB_STATE_CANCELLED
    out = npy_output(client, client.submit(prompt="after cancel", height=32, width=32, num_frames=1, num_inference_steps=2, output_format="npy").id)
    assert out.shape == (1, 32, 32, 3)


def test_cancel_queued_job(tiny_wan, start_server):
    server = start_server(tiny_wan, "--max-resident", "1")
    client = server.client
    running = client.submit(**LONG_JOB)
    queued = client.submit(**LONG_JOB)
    assert client.get(queued.id).queue_position == 1
    assert client.cancel(queued.id).state == pb.JOB_STATE_CANCELLED
    client.cancel(running.id)
    assert final_event(client, running.id).WhichOneof("event") == "cancelled"


def test_generate_stream_closed_by_client_cancels_job(wan_server):
    client = wan_server.client
    stream = client.generate(**LONG_JOB)
    job_id = ""
    for event in stream:
        job_id = event.job_id
        if event.WhichOneof("event") == "step_completed" and event.step_completed.step >= 2:
            break
    stream.close()  # cancels the call
    last = final_event(client, job_id)
    assert last.WhichOneof("event") == "cancelled"
    assert client.get(job_id).step < LONG_JOB["num_inference_steps"]
    wait_for(lambda: resident_jobs(wan_server) == 0, what="the worker to free the job")


def test_generate_deadline_cancels_job(wan_server):
    client = wan_server.client
    seen: list[pb.JobEvent] = []
    started = time.monotonic()
    with pytest.raises(DiffserveError) as info:
        for event in client.generate(timeout_s=3.0, **LONG_JOB):
            seen.append(event)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    job_id = seen[0].job_id
    last = final_event(client, job_id)
    assert last.WhichOneof("event") == "cancelled"
    assert last.cancelled.status.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert time.monotonic() - started < 10
    wait_for(lambda: resident_jobs(wan_server) == 0, what="the worker to free the job")


def test_submit_timeout_cancels_job(wan_server):
    client = wan_server.client
    job = client.submit(timeout_s=2.0, **LONG_JOB)
    last = final_event(client, job.id)
    assert last.WhichOneof("event") == "cancelled"
    assert last.cancelled.status.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert client.get(job.id).error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
