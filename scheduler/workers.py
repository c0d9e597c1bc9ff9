"""The scheduler's side of the worker protocol: one ZeroMQ ROUTER socket, the registry of worker
groups that said Hello, and their liveness.

A worker is alive from its Hello until it misses heartbeats for `heartbeat_timeout_s` or its
local process exits. Messages are protobuf frames plus raw tensor frames; never pickle.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import zmq
import zmq.asyncio

from diffserve.v1 import generation_pb2 as pb
from diffserve.worker.v1 import worker_pb2 as wpb

log = logging.getLogger(__name__)

PROTOCOL_VERSION = wpb.PROTOCOL_VERSION_2


@dataclass(eq=False)
class WorkerHandle:
    """What the scheduler knows of one worker group (its rank 0)."""

    id: str  # ZeroMQ routing id
    hello: wpb.Hello
    alive: bool = True
    last_seen: float = field(default_factory=time.monotonic)
    in_flight: int = 0  # id of the compute command it is running, 0 when idle
    status: pb.WorkerStatus = field(default_factory=pb.WorkerStatus)
    jobs: dict = field(default_factory=dict)  # job id -> Job admitted to this worker

    @property
    def model(self) -> wpb.ModelCard:
        return self.hello.card

    @property
    def idle(self) -> bool:
        return self.alive and not self.in_flight

    @property
    def has_room(self) -> bool:
        return self.alive and len(self.jobs) < self.hello.max_resident

    def public_status(self) -> pb.WorkerStatus:
        status = pb.WorkerStatus()
        status.CopyFrom(self.status)
        status.id = self.id
        status.alive = self.alive
        return status


def tensor_to_numpy(tensor: wpb.Tensor, frames: list) -> np.ndarray:
    buf = frames[tensor.frame]
    return np.frombuffer(buf, dtype=np.dtype(tensor.dtype)).reshape(tuple(tensor.shape))


class WorkerLink:
    """Owns the ROUTER socket. `recv()` yields (worker id, WorkerMessage, extra frames)."""

    def __init__(self, bind: str):
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted worker reuses its id
        if bind.endswith(":0"):
            port = self._sock.bind_to_random_port(bind.rsplit(":", 1)[0])
            bind = f"{bind.rsplit(':', 1)[0]}:{port}"
        else:
            self._sock.bind(bind)
        self.address = bind
        self._next_id = 0

    def next_command_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def send(self, worker_id: str, command: wpb.Command) -> bool:
        """Sends one command; False when the peer is gone (ROUTER_MANDATORY)."""
        try:
            await self._sock.send_multipart([worker_id.encode(), command.SerializeToString()])
            return True
        except zmq.ZMQError as exc:
            log.warning("could not send to worker %s: %s", worker_id, exc)
            return False

    async def recv(self) -> tuple[str, wpb.WorkerMessage, list]:
        while True:
            parts = await self._sock.recv_multipart(copy=False)
            if len(parts) < 2:
                continue
            worker_id = bytes(parts[0].buffer).decode(errors="replace")
            msg = wpb.WorkerMessage()
            try:
                msg.ParseFromString(bytes(parts[1].buffer))
            except Exception:  # a malformed peer must not take the scheduler down
                log.warning("dropping malformed message from %s", worker_id)
                continue
            return worker_id, msg, [p.buffer for p in parts[2:]]

    def close(self) -> None:
        self._sock.close(0)
        self._ctx.term()
