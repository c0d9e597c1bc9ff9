"""A cap on request bodies (pure ASGI, before any parsing): a declared Content-Length over the cap
is answered 413 at once; a body that streams past it is cut off with 413 as soon as it does. So
a client cannot make the scheduler buffer more than the cap per request (JSON and multipart
parsers read whole bodies)."""

from __future__ import annotations

from diffserve.scheduler.http.errors import HttpError


class BodyTooLarge(Exception):
    pass


def too_large(limit: int) -> HttpError:
    return HttpError(413, f"the request body is larger than {limit} bytes", "BODY_TOO_LARGE")


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > self.max_bytes:
                    return await too_large(self.max_bytes).response()(scope, receive, send)
        seen = 0
        started = False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:
            if not started:
                await too_large(self.max_bytes).response()(scope, receive, send)
