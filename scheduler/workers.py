"""The scheduler's side of the worker protocol: one ZeroMQ ROUTER socket (registry.py holds the
workers that said Hello).

Messages are protobuf frames plus raw tensor frames; never pickle.
"""

from __future__ import annotations

import logging

import zmq
import zmq.asyncio

from diffserve.worker.v1 import worker_pb2 as wpb

log = logging.getLogger(__name__)


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
