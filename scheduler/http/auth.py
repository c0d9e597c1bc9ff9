"""Bearer tokens on the HTTP API: the same tokens file and principals as gRPC (auth.Tokens).

Every endpoint but the open ones (/health, /metrics and the playground page, which holds no data)
depends on `caller`: without tokens every caller is auth.ANONYMOUS; with them a request needs
`Authorization: Bearer <token>` naming a listed principal, or it ends 401 (code MISSING_TOKEN /
INVALID_TOKEN, as on gRPC).
"""

from __future__ import annotations

import logging

from fastapi import Request

from diffserve.scheduler.auth import ANONYMOUS, Principal, Tokens, bearer_token
from diffserve.scheduler.http.errors import HttpError

log = logging.getLogger(__name__)

CHALLENGE = {"WWW-Authenticate": "Bearer"}


def principal_of(tokens: Tokens | None, authorization: str | None) -> Principal:
    """The caller named by an Authorization header value; HttpError 401 when it names none."""
    if tokens is None:
        return ANONYMOUS
    token = bearer_token(authorization)
    principal = tokens.authenticate(token)
    if principal is not None:
        return principal
    if token is None:
        raise HttpError(401, "this request needs a bearer token (Authorization: Bearer <token>)", "MISSING_TOKEN", headers=CHALLENGE)
    log.warning("HTTP request refused: INVALID_TOKEN")
    raise HttpError(401, "the bearer token is not valid", "INVALID_TOKEN", headers=CHALLENGE)


def caller(request: Request) -> Principal:
    """FastAPI dependency: the request's principal (app.state.tokens is the tokens file or None)."""
    return principal_of(request.app.state.tokens, request.headers.get("authorization"))
