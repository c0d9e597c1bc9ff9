"""google.rpc.Status values for the public API, and the exception that carries one.

Every error a client sees is a google.rpc.Status with details: BadRequest field violations for
invalid input, RetryInfo when the server is overloaded, ErrorInfo with a machine-readable reason.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from diffserve.v1.limits import STATUS_DETAILS_KEY

DOMAIN = "diffserve.dev"


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
    status = status_pb2.Status(code=code, message=message)
    if reason:
        status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN))
    for detail in details:
        status.details.add().Pack(detail)
    return status


def invalid_argument(violations: list[tuple[str, str]]) -> RequestError:
    """violations: (field path, description) pairs, e.g. ("params.width", "must be a multiple of 16")."""
    bad = error_details_pb2.BadRequest()
    for field, description in violations:
        bad.field_violations.add(field=field, description=description)
    message = "; ".join(f"{f}: {d}" for f, d in violations)
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


async def abort(context, status: status_pb2.Status) -> None:
    """Ends a grpc.aio call with `status`, details in the standard trailing metadata."""
    await context.abort(
        grpc_code(status.code), status.message, trailing_metadata=((STATUS_DETAILS_KEY, status.SerializeToString()),)
    )
