"""The worker's side of the ZeroMQ link: a DEALER socket owned by one I/O thread.

The compute loop never touches the socket: commands arrive on `commands` (a queue.Queue) and
results leave through `send()`, which also writes a byte to a pipe the I/O thread polls beside
the socket, so a Result leaves at once (not when the poll's timeout next comes round: a step's
Result used to wait up to 50 ms, about 25 ms a step). Heartbeats go out from the I/O thread, so a
worker deep in a long step still answers, and a dead worker is noticed by its silence alone. `stop()` flushes:
whatever was handed to `send()` before it goes out (bounded by FLUSH_LINGER_MS), so a worker
that exits right after its last Result does not lose it.

`leave(reason)` (safe in a signal handler: it only sets a field) asks the worker to leave: the I/O
thread puts a `Leave` on `commands`, behind the command the compute loop is running, which then
says Goodbye (runtime.py) so the scheduler puts its jobs back in the queue at once.

With `curve` (CurveKeys) the socket is a CURVE client: it proves the worker's key to the scheduler
and checks the scheduler's; without it, plain TCP (the scheduler's --insecure-worker-plaintext).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

from diffserve.v1 import generation_pb2 as pb
from diffserve.worker.v1 import worker_pb2 as wpb

log = logging.getLogger(__name__)

HELLO_RETRY_S = 3.0
POLL_MS = 50  # the I/O thread's longest sleep: heartbeats, Leave and the parent check run at least this often
FLUSH_LINGER_MS = 2000  # how long stop() waits for queued messages to reach the scheduler
_EVENTS = {zmq.EVENT_HANDSHAKE_FAILED_AUTH: "key not allowed", zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol mismatch",
           zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed"}


@dataclass(frozen=True)
class Leave:
    """Not a wire message: put on `commands` when the worker was asked to leave (SIGTERM)."""

    reason: str


@dataclass(frozen=True)
class CurveKeys:
    """The worker's CURVE keypair and the scheduler's public key (z85, 40 bytes each)."""

    public: bytes
    secret: bytes
    server: bytes

    @classmethod
    def load(cls, key_file: str, scheduler_key: str) -> CurveKeys:
        """From the worker's .key_secret file and the scheduler's public key (z85 text or a key file)."""
        import zmq.auth

        public, secret = zmq.auth.load_certificate(key_file)
        if not secret:
            raise ValueError(f"{key_file} holds no secret key (give the .key_secret file)")
        if len(scheduler_key) == 40 and not os.path.exists(scheduler_key):
            server = scheduler_key.encode()
        else:
            server, _ = zmq.auth.load_certificate(scheduler_key)
        return cls(public, secret, server)


def worker_curve_keys(args) -> CurveKeys | None:
    """The CURVE keys a worker's flags name (--key-file, --scheduler-key), or None with
    --insecure-worker-plaintext. Raises ValueError with the line to show when they are missing or
    cannot be read (a wrong key fails before anything is loaded)."""
    if args.insecure_worker_plaintext:
        return None
    if not (args.key_file and args.scheduler_key):
        raise ValueError("give --key-file and --scheduler-key (CURVE keys, see `diffserve keys`), "
                         "or --insecure-worker-plaintext for a loopback scheduler started with it")
    try:
        return CurveKeys.load(args.key_file, args.scheduler_key)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the CURVE keys: {exc}") from None


class SchedulerConnection:
    """Registers with the scheduler (Hello → Welcome), keeps heartbeats going, moves messages.

    On Reregister (the scheduler does not know this worker) it puts a FreeAll on `commands`, so
    the compute loop drops every request, and says Hello again."""

    def __init__(self, address: str, worker_id: str, hello: wpb.Hello, status: Callable[[], pb.WorkerStatus], parent_pid: int | None = None,
                 curve: CurveKeys | None = None):
        self.address = address
        self.curve = curve
        self.worker_id = worker_id
        self.hello = hello
        self.status = status
        self.parent_pid = parent_pid
        self.commands: queue.Queue[wpb.Command | Leave] = queue.Queue()
        self._leave_reason = ""  # set by leave(), from a signal handler: no lock taken there
        self._gone = False  # Goodbye queued: no more heartbeats or Hellos
        self._outgoing: queue.Queue[list] = queue.Queue()
        self._wake_r, self._wake_w = os.pipe()  # send() → the I/O thread's poll
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="zmq-io", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Sends what `send()` queued so far (up to FLUSH_LINGER_MS), then closes the socket."""
        self._stop.set()
        self._wake()
        self._thread.join(timeout=FLUSH_LINGER_MS / 1000 + 3)
        if not self._thread.is_alive():
            wake_r, wake_w, self._wake_r, self._wake_w = self._wake_r, self._wake_w, -1, -1
            for fd in (wake_r, wake_w):
                if fd >= 0:
                    os.close(fd)

    def leave(self, reason: str) -> None:
        """Asks the compute loop to say Goodbye after its running command (within ~50 ms)."""
        self._leave_reason = reason

    def goodbye(self, reason: str) -> None:
        """Queues Goodbye (after everything sent before it); the worker says nothing more after it,
        so the scheduler, which dropped it, never sees it again (no heartbeat, no Hello)."""
        self.send(wpb.WorkerMessage(goodbye=wpb.Goodbye(reason=reason)))
        self._gone = True

    def send(self, message: wpb.WorkerMessage, frames: list = ()) -> None:
        """Queues a message and its raw tensor frames (bytes-like objects) for sending."""
        self._outgoing.put([message.SerializeToString(), *frames])
        self._wake()

    def _wake(self) -> None:
        if self._wake_w < 0:  # stopped
            return
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:  # the pipe is full: the I/O thread has wake-ups pending anyway
            pass

    def _run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.worker_id.encode())
        sock.setsockopt(zmq.LINGER, FLUSH_LINGER_MS)
        if self.curve is not None:
            sock.setsockopt(zmq.CURVE_SERVERKEY, self.curve.server)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, self.curve.public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, self.curve.secret)
        # Handshake failures (a key the scheduler does not list, a wrong scheduler key) are only
        # visible as socket events: log them, since the worker otherwise just retries in silence.
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                          | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        sock.connect(self.address)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        told = False
        left = False
        welcomed = False
        interval = 1.0
        last_hello = last_beat = 0.0
        sequence = 0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if not self._gone and not welcomed and now - last_hello > HELLO_RETRY_S:
                    sock.send(wpb.WorkerMessage(hello=self.hello).SerializeToString())
                    last_hello = now
                if not self._gone and welcomed and now - last_beat > interval:
                    sequence += 1
                    beat = wpb.Heartbeat(sequence=sequence, status=self.status())
                    sock.send(wpb.WorkerMessage(heartbeat=beat).SerializeToString())
                    last_beat = now
                self._send_queued(sock)
                if self._leave_reason and not left:
                    self.commands.put(Leave(self._leave_reason))
                    left = True
                if self.parent_pid and os.getppid() != self.parent_pid:
                    log.error("parent process %d is gone; shutting down", self.parent_pid)
                    self.commands.put(wpb.Command(shutdown=wpb.Shutdown()))
                    self.parent_pid = None
                ready = dict(poller.poll(POLL_MS))
                if self._wake_r in ready:
                    self._drain_wake()
                    continue  # the loop's top sends what was queued
                if monitor in ready:
                    event = recv_monitor_message(monitor)["event"]
                    if not told:
                        log.error("the scheduler at %s refused the connection (%s): is this worker's key listed there "
                                  "(diffserve keys add) and --scheduler-key right? retrying", self.address, _EVENTS.get(event, event))
                        told = True
                if sock not in ready:
                    continue
                command = wpb.Command()
                command.ParseFromString(sock.recv())
                kind = command.WhichOneof("body")
                if self._gone:  # said Goodbye: the scheduler has nothing more for us
                    continue
                if kind == "welcome":
                    welcomed = True
                    interval = command.welcome.heartbeat_interval_s or interval
                    log.info("registered with the scheduler at %s as %s", self.address, self.worker_id)
                    continue
                if kind == "reregister":  # the scheduler does not know us (it restarted): start clean
                    log.warning("the scheduler at %s does not know us: freeing all requests, registering again", self.address)
                    welcomed = False
                    last_hello = 0.0
                    self.commands.put(wpb.Command(free_all=wpb.FreeAll()))
                    continue
                self.commands.put(command)
        finally:
            # Flush: the compute loop's last messages (e.g. the Result before a broken group
            # exits) were queued before stop(); ZeroMQ's linger then bounds their delivery.
            self._send_queued(sock)
            sock.disable_monitor()
            monitor.close(0)
            sock.close(linger=FLUSH_LINGER_MS)
            ctx.term()

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _send_queued(self, sock: zmq.Socket) -> None:
        while True:
            try:
                frames = self._outgoing.get_nowait()
            except queue.Empty:
                return
            sock.send_multipart(frames, copy=False)

