"""The scheduler's side of the worker protocol: one ZeroMQ ROUTER socket (registry.py holds the
workers that said Hello).

Messages are protobuf frames plus raw tensor frames; never pickle. What arrives is checked by
wire.parse_message (sizes, protobuf, tensors) before the engine sees it; ZeroMQ itself drops the
connection of a peer that sends a frame over the size cap (MAXMSGSIZE).
"""

from __future__ import annotations

import logging

import zmq
import zmq.asyncio

from diffserve.worker.v1 import worker_pb2 as wpb

from diffserve.scheduler.wire import DEFAULT_MAX_MESSAGE_BYTES, parse_message

log = logging.getLogger(__name__)


class WorkerLink:
    """Owns the ROUTER socket. `recv()` yields (worker id, WorkerMessage, extra frames) or raises
    wire.ProtocolError for a malformed message; `max_message_bytes` caps a message's frames."""

    def __init__(self, bind: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self.max_message_bytes = max_message_bytes
        # Per frame, before the bytes are buffered: the peer is disconnected. parse_message checks the sum.
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
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
        """The next message; raises wire.ProtocolError (naming the sender when known) for a malformed one."""
        parts = await self._sock.recv_multipart(copy=False)
        return parse_message([p.buffer for p in parts], self.max_message_bytes)

    def close(self) -> None:
        self._sock.close(0)
        self._ctx.term()
