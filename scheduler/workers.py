"""The scheduler's side of the worker protocol: one ZeroMQ ROUTER socket (registry.py holds the
workers that said Hello).

Messages are protobuf frames plus raw tensor frames; never pickle. What arrives is checked by
wire.parse_message (sizes, protobuf, tensors) before the engine sees it; ZeroMQ itself drops the
connection of a peer that sends a frame over the size cap (MAXMSGSIZE).

Authentication (WorkerAuth): by default the socket is a CURVE server and a ZAP authenticator (a
thread of its own, so handshakes do not wait for the event loop) lets in only the keys of the key
store (scheduler/keys.py); an unauthenticated peer never completes its handshake, so nothing of it
reaches the engine. Each routing id is bound to the key that first used it (`local-*` to the local
workers' key from the start), handover of a connected id to a new connection is off, and a message
whose routing id belongs to another key is dropped here. Plain TCP only on loopback, on request.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

import zmq
from zmq.auth.thread import ThreadAuthenticator

from diffserve.scheduler.keys import LOCAL, KeyStore
from diffserve.worker.v1 import worker_pb2 as wpb

from diffserve.scheduler.wire import DEFAULT_MAX_MESSAGE_BYTES, parse_message

log = logging.getLogger(__name__)

# pyzmq's constants are IntFlag enums, whose every `|` / `&` builds a new member (a Python call of
# microseconds): the hot path uses their plain ints.
_NOBLOCK, _SNDMORE, _EVENTS, _POLLIN = int(zmq.NOBLOCK), int(zmq.SNDMORE), int(zmq.EVENTS), int(zmq.POLLIN)

ZAP_DOMAIN = "diffserve-workers"
LOCAL_ID_PREFIX = "local-"  # the ids of the workers `diffserve serve` starts (launcher.py)
CLOSE_LINGER_MS = 1000  # close() waits this long for queued commands (the Shutdowns) to reach connected workers


class WorkerAuthError(ValueError):
    """The worker endpoint cannot be set up as asked (e.g. plain TCP on a non-loopback address)."""


@dataclass
class WorkerAuth:
    """How the worker endpoint authenticates peers: CURVE with the keys of `state_dir` (default),
    or none (`plaintext`, loopback only)."""

    state_dir: str = ".diffserve"
    plaintext: bool = False


def is_loopback_endpoint(endpoint: str) -> bool:
    """tcp://127.x / [::1] / localhost, or ipc:// and inproc:// (same host)."""
    url = urlsplit(endpoint)
    if url.scheme in ("ipc", "inproc"):
        return True
    host = (url.hostname or "").strip("[]")
    if url.scheme != "tcp" or not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _NamedKeys:
    """The ZAP credentials callback: a client key is allowed if the key store lists it (read at each
    handshake, so `diffserve keys add/remove` apply to the next connection)."""

    def __init__(self, store):
        self.store = store
        self.names: dict[bytes, str] = {}
        self._refused: set[bytes] = set()  # logged once each (a refused peer retries every 100 ms)

    def callback(self, domain: str, key: bytes) -> bool:
        try:
            self.names = self.store.allowed()
        except Exception as exc:  # an unreadable store refuses everyone rather than crash the thread
            log.error("cannot read the worker keys: %s", exc)
            return False
        if key not in self.names:
            if key in self._refused:
                return False
            if len(self._refused) > 1000:
                self._refused.clear()
            self._refused.add(key)
            log.warning("refused a worker connection: its CURVE key %s is not listed (diffserve keys add NAME KEY)", key.decode(errors="replace"))
            return False
        return True


class _Authenticator(ThreadAuthenticator):
    """ZAP handler whose User-Id is the key's name in the store (not the key itself)."""

    def __init__(self, context, keys: _NamedKeys):
        super().__init__(context, log=logging.getLogger(__name__ + ".zap"))
        self.keys = keys

    def curve_user_id(self, client_public_key: bytes) -> str:
        from zmq.utils import z85

        return self.keys.names.get(z85.encode(client_public_key), "?")


class WorkerLink:
    """Owns the ROUTER socket. `recv()` yields (worker id, WorkerMessage, extra frames) or raises
    wire.ProtocolError for a malformed message; `max_message_bytes` caps a message's frames.

    The hot path of the scheduler (one Result in, one command out per step): a plain ZeroMQ socket
    read and written without blocking, its file descriptor watched by the event loop
    (loop.add_reader), rather than zmq.asyncio's future per message (bench/scheduler_capacity.py,
    docs/scaling.md). `recv()` returns at once while messages are waiting, so a burst of Results is
    handled before the step loop runs. The descriptor signals changes of the socket's state, not
    readability: it is re-checked (ZMQ_EVENTS) after every read, send and wake-up."""

    def __init__(self, bind: str, auth: WorkerAuth | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        auth = auth or WorkerAuth()
        if auth.plaintext and not is_loopback_endpoint(bind):
            raise WorkerAuthError(f"--insecure-worker-plaintext needs a loopback --worker-bind (127.0.0.1, ::1, localhost, ipc://), not {bind}: "
                                  "anyone who reaches it could act as a worker; drop the flag to use CURVE keys")
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self.max_message_bytes = max_message_bytes
        # Per frame, before the bytes are buffered: the peer is disconnected. parse_message checks the sum.
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._authenticator = None
        self._owners: dict[bytes, str] = {}  # routing id -> name of the key that uses it
        self._squatters: set[tuple[bytes, str]] = set()  # (routing id, key) pairs already logged
        self.keys = None
        if auth.plaintext:
            log.warning("worker endpoint %s: plain TCP, no authentication (--insecure-worker-plaintext)", bind)
            self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted worker reuses its id
        else:
            self.keys = KeyStore.open(auth.state_dir)
            # The authenticator must be up before the bind: without a ZAP handler CURVE lets any key in.
            self._authenticator = _Authenticator(self._ctx, _NamedKeys(self.keys))
            self._authenticator.start()
            self._authenticator.configure_curve_callback(ZAP_DOMAIN, self._authenticator.keys)
            pair = self.keys.scheduler()
            self._sock.setsockopt(zmq.CURVE_SERVER, 1)
            self._sock.setsockopt(zmq.CURVE_SECRETKEY, pair.secret)
            self._sock.setsockopt(zmq.CURVE_PUBLICKEY, pair.public)
            self._sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
            # No handover: a connection cannot take a connected worker's id (routing-id hijack); a
            # restarted worker's old connection is gone (its process closed it) before it reconnects.
            self._sock.setsockopt(zmq.ROUTER_HANDOVER, 0)
        if bind.endswith(":0"):
            port = self._sock.bind_to_random_port(bind.rsplit(":", 1)[0])
            bind = f"{bind.rsplit(':', 1)[0]}:{port}"
        else:
            self._sock.bind(bind)
        self.address = bind
        self._next_id = 0
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop watching the socket's descriptor
        self._readable: asyncio.Future | None = None  # what recv() waits on when nothing is waiting

    def local_worker_argv(self) -> list[str]:
        """What a worker this scheduler starts needs to connect: the paths of its keypair and of the
        scheduler's public key (files in the state folder, 0600 for the secret), or the plain-TCP flag."""
        if self.keys is None:
            return ["--insecure-worker-plaintext"]
        return ["--key-file", str(self.keys.local_key_file), "--scheduler-key", str(self.keys.scheduler_key_file)]

    def next_command_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def send(self, worker_id: str, command: wpb.Command) -> bool:
        """Sends one command; False when the peer is gone (ROUTER_MANDATORY)."""
        routing_id, body = worker_id.encode(), command.SerializeToString()
        sock = self._sock
        while True:
            try:
                # Not send_multipart (IntFlag arithmetic per frame). A ROUTER takes the whole message
                # or none of it: zmq.Again / EHOSTUNREACH come from the first frame.
                sock.send(routing_id, _NOBLOCK | _SNDMORE)
                sock.send(body, _NOBLOCK)
                break
            except zmq.Again:  # the peer's queue is full (it stopped reading): wait, as a blocking send would
                await asyncio.sleep(0.001)
            except zmq.ZMQError as exc:
                log.warning("could not send to worker %s: %s", worker_id, exc)
                return False
            finally:
                self._check_readable()  # a send may have consumed the descriptor's signal
        return True

    def _check_readable(self) -> None:
        """Wakes recv() if a message is waiting (called on the descriptor's signal and after sends)."""
        waiter = self._readable
        if waiter is not None and not waiter.done() and self._sock.getsockopt(_EVENTS) & _POLLIN:
            waiter.set_result(None)

    def _on_signal(self) -> None:
        # Reading ZMQ_EVENTS also clears the descriptor (level-triggered in the loop: it must be read).
        if self._sock.getsockopt(_EVENTS) & _POLLIN:
            waiter = self._readable
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    async def _next_parts(self) -> list:
        """The next message's frames (zmq.Frame), waiting for one if none is there."""
        sock = self._sock
        while True:
            if sock.getsockopt(_EVENTS) & _POLLIN:  # not recv until zmq.Again: an exception costs more than a message
                parts = [sock.recv(_NOBLOCK, copy=False)]
                while parts[-1].more:  # the rest of a message is there once its first frame is
                    parts.append(sock.recv(_NOBLOCK, copy=False))
                return parts
            loop = asyncio.get_running_loop()
            if self._loop is not loop:
                if self._loop is not None and not self._loop.is_closed():
                    self._loop.remove_reader(self._sock.FD)
                loop.add_reader(self._sock.FD, self._on_signal)
                self._loop = loop
            self._readable = loop.create_future()
            try:
                await self._readable
            finally:
                self._readable = None

    def _owned(self, routing_id: bytes, frame: zmq.Frame) -> bool:
        """With CURVE: whether the key that sent `frame` may use `routing_id` (the first key to use an
        id owns it; `local-*` belong to the local workers' key). Plain TCP: always."""
        if self._authenticator is None:
            return True
        try:
            user = frame.get("User-Id")
        except zmq.ZMQError:
            user = None
        if not user or user == "?":
            return False
        name = routing_id.decode(errors="replace")
        owner = self._owners.get(routing_id) or (LOCAL if name.startswith(LOCAL_ID_PREFIX) else None)
        if owner is None:
            self._owners[routing_id] = owner = user
        if owner != user:
            if (routing_id, user) not in self._squatters:  # once per (id, key): a squatter may send a lot
                self._squatters.add((routing_id, user))
                log.warning("dropping messages from key %r using worker id %r, which belongs to key %r", user, name, owner)
            return False
        return True

    async def recv(self) -> tuple[str, wpb.WorkerMessage, list]:
        """The next message from a peer allowed to use its routing id; raises wire.ProtocolError
        (naming the sender when known) for a malformed one."""
        while True:
            parts = await self._next_parts()
            if len(parts) >= 2 and not self._owned(bytes(parts[0].buffer), parts[1]):
                continue
            return parse_message([p.buffer for p in parts], self.max_message_bytes)

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._sock.FD)
            self._loop = None
        # Not 0: the Shutdown just sent to each remote worker would be dropped with the socket.
        self._sock.close(linger=CLOSE_LINGER_MS)
        if self._authenticator is not None:
            self._authenticator.stop()
        self._ctx.term()
