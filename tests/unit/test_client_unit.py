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


# ---- retries and deadlines ----

def _exhausted(delay_s: float | None = 2.0) -> DiffserveError:
    return DiffserveError(grpc.StatusCode.RESOURCE_EXHAUSTED, "the queue is full", retry_delay_s=delay_s, reason="QUEUE_FULL")


def _bare_client(**settings):
    from diffserve.client.client import Client

    client = Client.__new__(Client)  # no channel: _call only needs the function it is given
    client._metadata = ()
    client.timeout_s, client.wait_for_ready, client.retries = settings.get("timeout_s", 30.0), False, settings.get("retries", 3)
    return client


def test_retry_delay_honours_retry_info_and_is_bounded():
    import time

    from diffserve.client.client import MAX_RETRY_DELAY_S

    client = _bare_client()
    assert client._retry_delay(_exhausted(2.0), 0, None) == 2.0
    assert client._retry_delay(_exhausted(2.0), 3, None) is None  # `retries` attempts at most
    assert client._retry_delay(_exhausted(None), 0, None) is None  # no RetryInfo: not retried
    assert client._retry_delay(_exhausted(1e6), 0, None) == MAX_RETRY_DELAY_S
    assert client._retry_delay(_exhausted(2.0), 0, time.monotonic() + 1.0) is None  # past the deadline
    assert client._retry_delay(DiffserveError(grpc.StatusCode.UNAVAILABLE, "x", retry_delay_s=1.0), 0, None) is None


def test_call_retries_only_when_asked_and_gives_each_attempt_the_time_left(monkeypatch):
    from diffserve.client import client as client_module

    slept = []
    monkeypatch.setattr(client_module.time, "sleep", slept.append)
    wire = _on_the_wire(errors.resource_exhausted("the queue is full", 0.5).status)
    calls = []

    def submit(request, *, metadata, timeout, wait_for_ready):
        calls.append(timeout)
        if len(calls) < 3:
            raise wire
        return "job"

    client = _bare_client(timeout_s=30.0)
    assert client._call(submit, "request", retry=True) == "job"
    assert slept == [0.5, 0.5] and len(calls) == 3 and all(0 < t <= 30.0 for t in calls)
    calls.clear()
    with pytest.raises(DiffserveError) as info:
        client._call(submit, "request")  # no client_request_id: not idempotent, not retried
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and len(calls) == 1


def test_service_config_retries_only_idempotent_calls_on_unavailable():
    import json

    from diffserve.client.client import _channel_options

    options = dict(_channel_options())
    assert options["grpc.enable_retries"] == 1
    (config,) = json.loads(options["grpc.service_config"])["methodConfig"]
    methods = {(n["service"], n.get("method")) for n in config["name"]}
    assert ("diffserve.v1.GenerationService", "GetJob") in methods and ("grpc.health.v1.Health", "Check") in methods
    assert not {m for s, m in methods if m in ("SubmitJob", "Generate")}
    assert config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert "timeout" not in config and "waitForReady" not in config  # per call, by the client (streams have none)


def test_watch_ends_on_its_deadline_or_a_real_error_and_rewatches_a_dropped_connection():
    from diffserve.client.client import _watch_error

    timed_out = _watch_error(_Failed(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"), "", 2.0, "NOT_SERVING")
    assert timed_out.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert timed_out.message == "the server was not SERVING within 2 s (last NOT_SERVING)"
    assert _watch_error(_Failed(grpc.StatusCode.UNAVAILABLE, "Socket closed"), "", 2.0, "NOT_SERVING") is None
    unimplemented = _watch_error(_Failed(grpc.StatusCode.UNIMPLEMENTED, "no health"), "", 2.0, "no answer")
    assert unimplemented.code == grpc.StatusCode.UNIMPLEMENTED
    # the server's own UNAVAILABLE (it carries a reason) is not a dropped connection
    refused = _on_the_wire(errors.unavailable("the server is shutting down", "SHUTTING_DOWN"))
    assert _watch_error(refused, "", 2.0, "SERVING").reason == "SHUTTING_DOWN"


def test_make_params_takes_lora_adapters_as_text_dicts_or_messages():
    from diffserve.client.client import make_params
    from diffserve.v1 import generation_pb2 as pb

    params = make_params("p", loras=["a", "b:0.25", {"name": "c", "scale": 2.0}, pb.LoraAdapter(name="d")])
    assert [(x.name, x.HasField("scale"), x.scale) for x in params.loras] == [("a", False, 0.0), ("b", True, 0.25), ("c", True, 2.0), ("d", False, 0.0)]
    assert [x.name for x in make_params("p", loras="solo").loras] == ["solo"]
    with pytest.raises(ValueError, match="NAME or NAME:SCALE"):
        make_params("p", loras=["b:x"])
