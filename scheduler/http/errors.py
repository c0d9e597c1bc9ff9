"""Errors on the HTTP API: OpenAI's error body with the HTTP status that fits the google.rpc code.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "size", "code": "INVALID_ARGUMENT"}}

`code` is the ErrorInfo reason the gRPC API sends (QUEUE_FULL, NOT_FOUND, SHUTTING_DOWN, ...),
`param` the first invalid field, named as the endpoint names it (`fields` maps the gRPC field path,
e.g. params.width, to the HTTP one, e.g. size). RESOURCE_EXHAUSTED carries Retry-After (seconds,
from the status' RetryInfo); UNAVAILABLE while draining too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from fastapi.responses import JSONResponse
from google.rpc import code_pb2, error_details_pb2, status_pb2

from diffserve.scheduler.errors import RequestError

# google.rpc code → HTTP status (google.rpc's own mapping, code.proto; CANCELLED: nginx's 499)
HTTP_STATUS = {
    code_pb2.INVALID_ARGUMENT: 400, code_pb2.OUT_OF_RANGE: 400, code_pb2.FAILED_PRECONDITION: 409,
    code_pb2.UNAUTHENTICATED: 401, code_pb2.PERMISSION_DENIED: 403, code_pb2.NOT_FOUND: 404,
    code_pb2.ALREADY_EXISTS: 409, code_pb2.ABORTED: 409, code_pb2.RESOURCE_EXHAUSTED: 429,
    code_pb2.CANCELLED: 499, code_pb2.UNIMPLEMENTED: 501, code_pb2.UNAVAILABLE: 503,
    code_pb2.DEADLINE_EXCEEDED: 504,
}

# HTTP status → OpenAI's error type
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
              409: "conflict_error", 413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}


class HttpError(Exception):
    """Ends one HTTP request with OpenAI's error body."""

    def __init__(self, status: int, message: str, code: str = "", param: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or None
        self.param = param
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        kind = ERROR_TYPE.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> HttpError:
    return HttpError(400, message, "INVALID_ARGUMENT", param)


def _details(status: status_pb2.Status):
    reason, field, retry_s = "", None, None
    for any_ in status.details:
        if any_.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            any_.Unpack(info)
            reason = info.reason
        elif any_.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            any_.Unpack(bad)
            if bad.field_violations:
                field = bad.field_violations[0].field
        elif any_.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            any_.Unpack(retry)
            retry_s = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    return reason, field, retry_s


def from_status(status: status_pb2.Status, fields: Mapping[str, str] | None = None, retry_after_s: float | None = None) -> HttpError:
    """The HttpError for a google.rpc.Status; `fields` renames gRPC field paths (params.width → size)."""
    reason, field, retry_s = _details(status)
    http = HTTP_STATUS.get(status.code, 500)
    if field is not None and fields:
        field = fields.get(field, fields.get(field.rpartition(".")[2], field))
    headers = {}
    retry = retry_s if retry_s is not None else (retry_after_s if http in (429, 503) else None)
    if retry is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry)))
    return HttpError(http, status.message, reason or code_pb2.Code.Name(status.code), field, headers)


def from_request_error(exc: RequestError, fields: Mapping[str, str] | None = None, retry_after_s: float | None = None) -> HttpError:
    return from_status(exc.status, fields, retry_after_s)
