"""`diffserve serve` lifecycle and the asyncio client: Ctrl-C drains running jobs and exits cleanly."""

from __future__ import annotations

import asyncio
import signal

import grpc
import psutil
import pytest

from diffserve.client import AsyncClient, DiffserveError
from diffserve.v1 import generation_pb2 as pb
from jobs_util import wait_for, wait_step


def test_sigint_drains_running_job_then_exits(tiny_wan, start_server):
    """Health and ListModels say NOT_SERVING at once; the running job finishes, the queued one is
    neither started nor cancelled: it stays in the job store and runs after the next start; exit
    code 0. More signal cases: test_signals.py."""
    server = start_server(tiny_wan, "--max-resident", "1")
    client = server.client
    job = client.submit(prompt="drain me", height=32, width=32, num_frames=1, num_inference_steps=150, output_format="npy")
    queued = client.submit(prompt="wait for me", height=32, width=32, num_frames=1, num_inference_steps=2, output_format="npy")
    wait_step(client, job.id, 1)
    workers = [psutil.Process(pid) for pid in server.worker_pids()]
    server.proc.send_signal(signal.SIGINT)
    wait_for(lambda: client.health() == "NOT_SERVING", timeout_s=2, what="NOT_SERVING at once")
    assert [m.state for m in client.list_models()] == [pb.SERVING_STATE_NOT_SERVING]
    with pytest.raises(DiffserveError) as info:
        client.submit(prompt="too late", num_inference_steps=1)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert client.get(queued.id).state == pb.JOB_STATE_QUEUED
    assert client.wait(job.id).state == pb.JOB_STATE_SUCCEEDED
    assert server.proc.wait(timeout=30) == 0
    for worker in workers:
        worker.wait(timeout=10)  # the worker exited too

    again = start_server(tiny_wan, "--max-resident", "1", workdir=server.workdir)  # the same state folder
    assert again.client.wait(queued.id).state == pb.JOB_STATE_SUCCEEDED
    assert again.client.get(job.id).state == pb.JOB_STATE_SUCCEEDED


def test_async_client_round_trip(wan_server):
    async def main():
        async with AsyncClient(wan_server.target) as client:
            assert await client.health() == "SERVING"
            (model,) = await client.list_models()
            job = await client.submit(prompt="async", height=32, width=32, num_frames=1, num_inference_steps=2, seed=1)
            kinds = [e.WhichOneof("event") async for e in client.events(job.id)]
            assert kinds[0] == "queued" and kinds[-1] == "completed" and kinds.count("step_completed") == 2
            png = await client.download(job.id)
            assert png.startswith(b"\x89PNG")
            events = []
            async for event in client.generate(prompt="bound", height=32, width=32, num_frames=1, num_inference_steps=2):
                events.append(event)
            assert events[-1].WhichOneof("event") == "completed"
            long = await client.submit(prompt="cancel me", height=32, width=32, num_frames=1, num_inference_steps=1000)
            await client.cancel(long.id)
            done = await client.wait(long.id)
            assert done.state == pb.JOB_STATE_CANCELLED
            with pytest.raises(DiffserveError) as info:
                await client.submit(prompt="", height=32, width=32)
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(main())
