"""The playground page at `/`: one static page (static/playground.html, .js, .css) that drives the
native job API from a browser — pick a model, prompt, submit, a per-step progress bar from the SSE
stream, the image or video when done, and the seed that reproduces it.

    GET /                          static/playground.html
    GET /static/{name}             the page's script, style sheet and icon (only the files in static/)

Open (no token): it holds no data. Every API call the page makes carries the token typed into its
token field (kept in sessionStorage) as `Authorization: Bearer`. No build step and no CDN: the page
works offline, and a strict Content-Security-Policy allows only this origin's own script and style
(no inline script or style, no eval) and blob: URLs for the results it fetches with the token.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from diffserve.scheduler.http.errors import HttpError

router = APIRouter()

# 'self' only; blob: for the result (and the input preview) that the page fetched with the token.
CSP = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' blob:",
    "media-src 'self' blob:",
    "connect-src 'self'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
])

HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}

MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}


@cache
def static_files() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, media type) of the files in static/ (read once; a few KB)."""
    folder = resources.files(__package__) / "static"
    out = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in MEDIA_TYPES:
            out[entry.name] = (entry.read_bytes(), MEDIA_TYPES[suffix])
    return out


def _file(name: str) -> Response:
    found = static_files().get(name)
    if found is None:
        raise HttpError(404, f"no such file: /static/{name}", "NOT_FOUND")
    body, media_type = found
    return Response(body, media_type=media_type, headers=HEADERS)


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def page() -> Response:
    return _file("playground.html")


@router.api_route("/static/{name}", methods=["GET", "HEAD"], include_in_schema=False)
async def static(name: str) -> Response:
    return _file(name)
