"""Reading what a worker sends: one ZeroMQ message → (worker id, WorkerMessage, tensor frames),
checked before the engine sees it. Pure (no sockets): workers.py feeds it the frames of its
ROUTER socket, the unit tests feed it bytes.

Contract:
- `parse_message(parts, max_bytes)` returns (worker id, message, frames) or raises ProtocolError
  (with the sender's id when it could be read) for anything that breaks worker.proto: a routing
  id that is not UTF-8, no message frame, frames larger than `max_bytes` together or more than
  MAX_TENSOR_FRAMES of them, bytes that are not a WorkerMessage, a message with no body, and a
  Result whose Tensor names an unknown dtype, a missing frame or a shape that does not match its
  frame's bytes.
- `tensor_to_numpy(tensor, frames)` is the one way a Tensor becomes an array (a view on the
  frame, no copy); it raises ProtocolError rather than guess.
- `peer(worker_id)` is how a routing id appears in a log line or an error message: escaped and
  truncated, since a peer chooses it.
Never pickle: the only decoders are protobuf and numpy.frombuffer with a dtype from ALLOWED_DTYPES.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
from google.protobuf.message import DecodeError

from diffserve.worker.v1 import worker_pb2 as wpb

# The largest ZeroMQ message a worker may send (all frames together): the largest legitimate one
# is a DECODE result of frames × height × width × 3 bytes; Wan's card allows 257 × 1920 × 1088 × 3
# ≈ 1.5 GiB. `diffserve serve --max-worker-message-bytes` changes it; a worker whose card allows
# a larger output is refused at Hello (it could never deliver its largest result).
DEFAULT_MAX_MESSAGE_BYTES = 2 << 30
MAX_TENSOR_FRAMES = 64  # frames after the message frame; a DECODE result has one
MAX_TENSOR_DIMS = 8
ALLOWED_DTYPES = frozenset({"uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64", "bool"})
_PEER_CHARS = 64


class ProtocolError(Exception):
    """A worker sent something that breaks the protocol. `worker_id` is its routing id, or None
    when even that could not be read."""

    def __init__(self, reason: str, worker_id: str | None = None):
        super().__init__(reason)
        self.worker_id = worker_id


def peer(worker_id: str | bytes | None) -> str:
    """A peer-chosen routing id, safe to log: repr (no control characters), at most ~64 chars."""
    text = repr(worker_id)
    return text if len(text) <= _PEER_CHARS else text[: _PEER_CHARS - 3] + "..."


def parse_message(parts: list, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> tuple[str, wpb.WorkerMessage, list]:
    """parts: the ROUTER's frames (routing id, message, tensor frames) as bytes-like objects."""
    if not parts:
        raise ProtocolError("empty message")
    raw_id = bytes(parts[0])
    try:
        worker_id = raw_id.decode()
    except UnicodeDecodeError:
        # Decoding with errors="replace" would map different ids onto one: refuse them instead.
        raise ProtocolError(f"routing id {peer(raw_id)} is not UTF-8") from None
    if len(parts) < 2:
        raise ProtocolError("no message frame", worker_id)
    if len(parts) - 2 > MAX_TENSOR_FRAMES:
        raise ProtocolError(f"{len(parts) - 2} tensor frames (at most {MAX_TENSOR_FRAMES})", worker_id)
    size = sum(memoryview(p).nbytes for p in parts[1:])
    if size > max_bytes:
        raise ProtocolError(f"message of {size} bytes (at most {max_bytes})", worker_id)
    msg = wpb.WorkerMessage()
    try:
        msg.ParseFromString(bytes(parts[1]))
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ProtocolError(f"not a WorkerMessage ({type(exc).__name__})", worker_id) from None
    kind = msg.WhichOneof("body")
    if kind is None:
        raise ProtocolError("WorkerMessage without a body", worker_id)
    frames = list(parts[2:])
    if kind == "result":
        for outcome in msg.result.requests:
            if outcome.HasField("frames"):
                try:
                    tensor_to_numpy(outcome.frames, frames)
                except ProtocolError as exc:
                    raise ProtocolError(str(exc), worker_id) from None
    return worker_id, msg, frames


def tensor_to_numpy(tensor: wpb.Tensor, frames: list) -> np.ndarray:
    """The array a Tensor points at (a read-only view on its frame)."""
    if tensor.dtype not in ALLOWED_DTYPES:
        raise ProtocolError(f"tensor dtype {peer(tensor.dtype)} is not one of {sorted(ALLOWED_DTYPES)}")
    if not 0 <= tensor.frame < len(frames):
        raise ProtocolError(f"tensor frame {tensor.frame} out of range ({len(frames)} frames)")
    shape = tuple(tensor.shape)
    if len(shape) > MAX_TENSOR_DIMS or any(d < 0 for d in shape):
        raise ProtocolError(f"tensor shape {list(shape)[:MAX_TENSOR_DIMS + 1]} is not a shape")
    dtype = np.dtype(tensor.dtype)
    nbytes = memoryview(frames[tensor.frame]).nbytes
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if expected != nbytes:
        raise ProtocolError(f"tensor of shape {list(shape)} {tensor.dtype} needs {expected} bytes, its frame has {nbytes}")
    return np.frombuffer(frames[tensor.frame], dtype=dtype).reshape(shape)


class Throttled:
    """A logger for lines a peer can trigger at will: at most one line per `interval_s` per kind,
    counting the ones left out, so a flood of forged messages cannot flood the log."""

    def __init__(self, logger: logging.Logger, interval_s: float = 1.0):
        self.logger = logger
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._dropped: dict[str, int] = {}

    def warning(self, kind: str, fmt: str, *args) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -math.inf) < self.interval_s:
            self._dropped[kind] = self._dropped.get(kind, 0) + 1
            return
        self._last[kind] = now
        dropped = self._dropped.pop(kind, 0)
        if dropped:
            fmt += " (and %d more like it since the last such line)"
            args = (*args, dropped)
        self.logger.warning(fmt, *args)
