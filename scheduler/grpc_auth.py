"""Bearer tokens and TLS on the gRPC front door (the principal model itself is auth.py's).

`TokenInterceptor` guards every RPC except the open services (grpc.health.v1 and reflection):
a call without `authorization: Bearer <token>`, or with a token the tokens file does not list,
ends UNAUTHENTICATED (ErrorInfo reason MISSING_TOKEN / INVALID_TOKEN) before any servicer code
runs. An accepted call runs with its Principal in `current_principal()`. Without tokens there is
no interceptor and every call is auth.ANONYMOUS.
"""

from __future__ import annotations

import contextvars
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.rpc import code_pb2

from diffserve.scheduler import errors
from diffserve.scheduler.auth import ANONYMOUS, Principal, Tokens, bearer_token

log = logging.getLogger(__name__)

OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")

_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("diffserve_principal", default=ANONYMOUS)


def current_principal() -> Principal:
    """The caller of the RPC being served (set per call by TokenInterceptor)."""
    return _principal.get()


def _service_of(method: str) -> str:
    return method.lstrip("/").partition("/")[0]


def _wrap_unary(behavior, principal: Principal):
    async def call(request, context):
        _principal.set(principal)
        return await behavior(request, context)

    return call


def _wrap_stream(behavior, principal: Principal):
    async def call(request_or_iterator, context):
        _principal.set(principal)
        async for reply in behavior(request_or_iterator, context):
            yield reply

    return call


def _refuse(reason: str, message: str):
    status = errors.make_status(code_pb2.UNAUTHENTICATED, message, reason)

    async def abort(request, context):
        await errors.abort(context, status)

    return abort


# (request streaming, response streaming) → the handler factory and the behaviour's attribute
_HANDLER_KINDS = {
    (False, False): (grpc.unary_unary_rpc_method_handler, "unary_unary"),
    (False, True): (grpc.unary_stream_rpc_method_handler, "unary_stream"),
    (True, False): (grpc.stream_unary_rpc_method_handler, "stream_unary"),
    (True, True): (grpc.stream_stream_rpc_method_handler, "stream_stream"),
}


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call outside OPEN_SERVICES against the tokens file."""

    def __init__(self, tokens: Tokens):
        self.tokens = tokens

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or _service_of(handler_call_details.method) in OPEN_SERVICES:
            return handler
        values = [v for k, v in (handler_call_details.invocation_metadata or ()) if k == "authorization"]
        token = bearer_token(values[0] if len(values) == 1 and isinstance(values[0], str) else None)
        principal = self.tokens.authenticate(token)
        make, attr = _HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)]
        if principal is None:
            reason, message = ("MISSING_TOKEN", "this call needs a bearer token (authorization: Bearer <token>)") if token is None \
                else ("INVALID_TOKEN", "the bearer token is not valid")
            log.warning("%s refused: %s", handler_call_details.method, reason)
            behavior = _refuse(reason, message)
        else:
            wrap = _wrap_stream if handler.response_streaming else _wrap_unary
            behavior = wrap(getattr(handler, attr), principal)
        return make(behavior, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


@dataclass
class TlsConfig:
    """PEM files: the server's certificate chain and key; with client_ca, clients must present a
    certificate that CA signed (mutual TLS)."""

    cert: str
    key: str
    client_ca: str = ""

    def credentials(self) -> grpc.ServerCredentials:
        client_ca = Path(self.client_ca).read_bytes() if self.client_ca else None
        pair = (Path(self.key).read_bytes(), Path(self.cert).read_bytes())
        return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)
