"""google.rpc.Status values for the public API, and the exception that carries one.

Every error a client sees is a google.rpc.Status with details: BadRequest field violations for
invalid input, RetryInfo when the server is overloaded, ErrorInfo with a machine-readable reason.

Every status is bounded (`bounded`): its message at most MAX_MESSAGE_BYTES and each field
violation's description at most MAX_DESCRIPTION_BYTES, so an error that echoes a long input still
fits gRPC's 16 KiB trailer limit and the caller sees its real code (not RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "diffserve.dev"
MAX_MESSAGE_BYTES = 1024  # google.rpc.Status.message, also sent as grpc-message
MAX_DESCRIPTION_BYTES = 256  # one BadRequest field violation's description
MAX_VIOLATIONS = 16  # field violations kept in one status (the rest are counted in the message)
MAX_STATUS_BYTES = 8 << 10  # the serialized status (grpc-status-details-bin, base64 in the trailer)


def truncate(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes (on a character boundary), marked with "…"."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return text
    return raw[: max(0, limit - 3)].decode("utf-8", "ignore") + "…"


class RequestError(Exception):
    """An error that ends one request; carries the google.rpc.Status to return."""

    def __init__(self, status: status_pb2.Status):
        super().__init__(status.message)
        self.status = status

    @property
    def code(self) -> grpc.StatusCode:
        return grpc_code(self.status.code)


def grpc_code(code: int) -> grpc.StatusCode:
    for c in grpc.StatusCode:
        if c.value[0] == code:
            return c
    return grpc.StatusCode.UNKNOWN


def make_status(code: int, message: str, reason: str = "", details: Iterable = ()) -> status_pb2.Status:
    status = status_pb2.Status(code=code, message=truncate(message, MAX_MESSAGE_BYTES))
    if reason:
        status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN))
    for detail in details:
        status.details.add().Pack(detail)
    return status


def invalid_argument(violations: list[tuple[str, str]]) -> RequestError:
    """violations: (field path, description) pairs, e.g. ("params.width", "must be a multiple of 16")."""
    bad = error_details_pb2.BadRequest()
    for field, description in violations[:MAX_VIOLATIONS]:
        bad.field_violations.add(field=truncate(field, 128), description=truncate(description, MAX_DESCRIPTION_BYTES))
    message = "; ".join(f"{v.field}: {v.description}" for v in bad.field_violations)
    if len(violations) > MAX_VIOLATIONS:
        message = f"{len(violations)} invalid fields, the first {MAX_VIOLATIONS}: {message}"
    return RequestError(make_status(code_pb2.INVALID_ARGUMENT, message, "INVALID_ARGUMENT", [bad]))


def resource_exhausted(message: str, retry_after_s: float) -> RequestError:
    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=int(retry_after_s), nanos=int((retry_after_s % 1) * 1e9)))
    return RequestError(make_status(code_pb2.RESOURCE_EXHAUSTED, message, "QUEUE_FULL", [retry]))


def not_found(what: str, name: str) -> RequestError:
    return RequestError(make_status(code_pb2.NOT_FOUND, f"{what} {name!r} not found", "NOT_FOUND"))


def failed_precondition(message: str, reason: str) -> RequestError:
    return RequestError(make_status(code_pb2.FAILED_PRECONDITION, message, reason))


def unavailable(message: str, reason: str) -> status_pb2.Status:
    return make_status(code_pb2.UNAVAILABLE, message, reason)


def cancelled(message: str = "cancelled by the client") -> status_pb2.Status:
    return make_status(code_pb2.CANCELLED, message, "CANCELLED")


def deadline_exceeded(message: str = "the job's deadline expired") -> status_pb2.Status:
    return make_status(code_pb2.DEADLINE_EXCEEDED, message, "DEADLINE_EXCEEDED")


def internal(message: str, reason: str = "INTERNAL") -> status_pb2.Status:
    return make_status(code_pb2.INTERNAL, message, reason)


def bounded(status: status_pb2.Status) -> status_pb2.Status:
    """`status` with its message truncated to MAX_MESSAGE_BYTES and, should its serialized form
    still be over MAX_STATUS_BYTES, without details (the code and message stay)."""
    message = truncate(status.message, MAX_MESSAGE_BYTES)
    if message == status.message and status.ByteSize() <= MAX_STATUS_BYTES:
        return status
    out = status_pb2.Status()
    out.CopyFrom(status)
    out.message = message
    if out.ByteSize() > MAX_STATUS_BYTES:
        del out.details[:]
    return out


async def abort(context, status: status_pb2.Status) -> None:
    """Ends a grpc.aio call with `status` (bounded): grpcio-status's rpc_status.to_status puts the
    code, the message and the serialized status (grpc-status-details-bin) on the call."""
    await context.abort_with_status(rpc_status.to_status(bounded(status)))
