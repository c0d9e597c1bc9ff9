"""The HTTP API's FastAPI app: routers, the caller's principal, errors in OpenAI's shape.

    /health                   200 {"status": "SERVING"} once a model is served, else 503 (open, for probes)
    /v1/models                models.py
    /v1/jobs...               jobs.py (diffserve's own job API, JSON of the gRPC messages)
    /v1/images/...            images.py (OpenAI Images API)
    /v1/videos...             videos.py (OpenAI Videos API)
    /metrics                  Prometheus (scheduler/metrics.py; open)
    /                         the playground page (playground.py; open, holds no data)

Every error is OpenAI's error body (errors.py); a request body over max_body_bytes is 413
(limits.py) before it is parsed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from diffserve.scheduler.auth import Tokens
from diffserve.scheduler.errors import RequestError
from diffserve.scheduler.frontdoor import FrontDoor
from diffserve.scheduler.http import images, jobs, models, playground, videos
from diffserve.scheduler.http.errors import HttpError, bad_request, from_request_error
from diffserve.scheduler.http.limits import BodyLimit, BodyTooLarge, too_large

# The largest request body: a few input images (--max-image-bytes, 20 MiB by default) as base64
# or multipart, with room to spare.
MAX_BODY_BYTES = 128 << 20


@dataclass
class HttpOptions:
    max_body_bytes: int = MAX_BODY_BYTES


def _field(loc) -> str:
    """A validation error's location as a field name ("size", "extra_body.seed"), without "body"."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def create_app(door: FrontDoor, tokens: Tokens | None, serving: Callable[[], bool], *, metrics_app=None,
               options: HttpOptions | None = None) -> BodyLimit:
    """The ASGI app of `serve --http-port`. serving(): whether a model is served and submits are
    accepted (health)."""
    options = options or HttpOptions()
    app = FastAPI(title="diffserve", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.door = door
    app.state.tokens = tokens

    @app.exception_handler(HttpError)
    async def http_error(request: Request, exc: HttpError):
        return exc.response()

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        return from_request_error(exc, retry_after_s=door.engine.config.retry_after_s).response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = exc.errors()
        first = problems[0] if problems else {"loc": (), "msg": "invalid request"}
        field = _field(first.get("loc", ()))
        return bad_request(f"{field}: {first.get('msg', 'invalid')}", field).response()

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request: Request, exc: BodyTooLarge):
        return too_large(options.max_body_bytes).response()

    @app.exception_handler(StarletteHTTPException)
    async def starlette_error(request: Request, exc: StarletteHTTPException):
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.status_code, "")
        message = f"no such endpoint: {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return HttpError(exc.status_code, message, code, headers=getattr(exc, "headers", None)).response()

    @app.get("/health", include_in_schema=False)
    async def health() -> JSONResponse:
        up = serving()
        return JSONResponse({"status": "SERVING" if up else "NOT_SERVING"}, status_code=200 if up else 503)

    app.include_router(models.router)
    app.include_router(jobs.router)
    app.include_router(images.router)
    app.include_router(videos.router)
    app.include_router(playground.router)
    if metrics_app is not None:  # a route, not a mount: a mount answers /metrics with a redirect to /metrics/
        app.add_route("/metrics", metrics_app, methods=["GET", "HEAD"], include_in_schema=False)
    return BodyLimit(app, options.max_body_bytes)
