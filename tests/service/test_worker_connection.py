"""The worker's connection against a bare ROUTER socket: registration, Reregister → FreeAll and a
new Hello, and stop() flushing the last reply (no sleep needed). No torch, no model."""

from __future__ import annotations

import zmq

from diffserve.v1 import generation_pb2 as pb
from diffserve.worker.connection import SchedulerConnection
from diffserve.worker.v1 import worker_pb2 as wpb


class Router:
    def __init__(self):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"

    def recv(self, kind: str, timeout_ms: int = 10_000) -> wpb.WorkerMessage:
        """The next message of `kind` (heartbeats and repeated Hellos in between are skipped)."""
        while True:
            assert self.sock.poll(timeout_ms), f"no {kind} within {timeout_ms} ms"
            _, frame, *_ = self.sock.recv_multipart()
            msg = wpb.WorkerMessage.FromString(frame)
            if msg.WhichOneof("body") == kind:
                return msg

    def send(self, worker_id: str, command: wpb.Command) -> None:
        self.sock.send_multipart([worker_id.encode(), command.SerializeToString()])

    def close(self):
        self.sock.close(0)
        self.ctx.term()


def connect(router: Router) -> SchedulerConnection:
    hello = wpb.Hello(protocol_version=wpb.PROTOCOL_VERSION_3, card=wpb.ModelCard(name="m"))
    conn = SchedulerConnection(router.address, "w1", hello, pb.WorkerStatus)
    conn.start()
    router.recv("hello")
    router.send("w1", wpb.Command(welcome=wpb.Welcome(worker_id="w1", heartbeat_interval_s=0.1)))
    router.recv("heartbeat")  # beats only once welcomed
    return conn


def test_reregister_frees_everything_and_says_hello_again():
    router = Router()
    conn = connect(router)
    try:
        router.send("w1", wpb.Command(reregister=wpb.Reregister()))
        assert router.recv("hello").hello.card.name == "m"
        assert conn.commands.get(timeout=5).HasField("free_all")
        router.send("w1", wpb.Command(id=7, finished_ids=["a"], denoise_step=wpb.DenoiseStep()))
        forwarded = conn.commands.get(timeout=5)
        assert forwarded.id == 7 and list(forwarded.finished_ids) == ["a"]
    finally:
        conn.stop()
        router.close()


def test_stop_flushes_the_last_reply():
    router = Router()
    conn = connect(router)
    try:
        for n in range(1, 4):
            conn.send(wpb.WorkerMessage(result=wpb.Result(command_id=n)), [b"x" * 1_000_000])
        conn.stop()  # at once, as a worker whose group broke does before it exits
        assert [router.recv("result").result.command_id for _ in range(3)] == [1, 2, 3]
    finally:
        router.close()


def test_a_result_leaves_at_once_not_at_the_next_poll(monkeypatch):
    """send() wakes the I/O thread: with its poll timeout at 60 s, a Result still arrives at once
    (before the wake pipe it waited for the timeout: about 25 ms a step at 50 ms)."""
    import diffserve.worker.connection as connection

    monkeypatch.setattr(connection, "POLL_MS", 60_000)
    router = Router()
    hello = wpb.Hello(protocol_version=wpb.PROTOCOL_VERSION_3, card=wpb.ModelCard(name="m"))
    conn = SchedulerConnection(router.address, "w1", hello, pb.WorkerStatus)
    conn.start()
    try:
        router.recv("hello")  # sent before the thread's first (60 s) poll
        for command_id in (1, 2, 3):
            conn.send(wpb.WorkerMessage(result=wpb.Result(command_id=command_id)))
            assert router.recv("result", timeout_ms=10_000).result.command_id == command_id
    finally:
        conn.stop()
        router.close()
