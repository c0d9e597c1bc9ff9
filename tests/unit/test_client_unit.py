"""The client's own logic without a server: how a failed call's google.rpc.Status is decoded
(grpcio-status on both sides), the retries of a refused submit, the DIFFSERVE_* environment
variables of the command lines, and the help text of every flag."""

from __future__ import annotations

import grpc
import pytest

from diffserve.client.client import DiffserveError
from diffserve.scheduler import errors


class _Failed(grpc.RpcError):
    """A failed call as grpc hands it to the client: code, details, trailing metadata."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing=()):
        self._code, self._details, self._trailing = code, details, tuple(trailing)

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailing


def _on_the_wire(status) -> _Failed:
    """What errors.abort sends (grpc_status.rpc_status.to_status of the bounded status), as received."""
    from grpc_status import rpc_status

    sent = rpc_status.to_status(errors.bounded(status))
    return _Failed(sent.code, sent.details, sent.trailing_metadata)


def test_bad_request_round_trip():
    err = DiffserveError.from_rpc_error(_on_the_wire(errors.invalid_argument([("params.width", "must be a multiple of 16"), ("params.seed", "too big")]).status))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.reason == "INVALID_ARGUMENT"
    assert err.field_violations == [("params.width", "must be a multiple of 16"), ("params.seed", "too big")]
    assert err.message == "params.width: must be a multiple of 16; params.seed: too big"


def test_retry_info_and_reason_round_trip():
    err = DiffserveError.from_rpc_error(_on_the_wire(errors.resource_exhausted("the queue is full", 2.5).status))
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.reason == "QUEUE_FULL"
    assert err.retry_delay_s == 2.5
    err = DiffserveError.from_rpc_error(_on_the_wire(errors.unavailable("the server is shutting down", "SHUTTING_DOWN")))
    assert (err.code, err.reason, err.message) == (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN", "the server is shutting down")


def test_a_long_message_is_bounded_and_still_decodes():
    err = DiffserveError.from_rpc_error(_on_the_wire(errors.failed_precondition("x" * 5000, "TOO_LONG").status))
    assert err.reason == "TOO_LONG" and len(err.message.encode()) <= errors.MAX_MESSAGE_BYTES


def test_no_status_or_a_mismatched_one_keeps_code_and_message():
    err = DiffserveError.from_rpc_error(_Failed(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses"))
    assert (err.code, err.message, err.reason, err.field_violations, err.retry_delay_s) == (
        grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses", "", [], None)
    # a status whose code disagrees with the call's (a proxy rewrote it): the call's code and message win
    wire = _on_the_wire(errors.invalid_argument([("params.width", "bad")]).status)
    err = DiffserveError.from_rpc_error(_Failed(grpc.StatusCode.INTERNAL, "proxy error", wire.trailing_metadata()))
    assert (err.code, err.message, err.field_violations, err.reason) == (grpc.StatusCode.INTERNAL, "proxy error", [], "")
