"""Runs an ASGI app (the HTTP API, or the metrics alone) with uvicorn on the scheduler's own event
loop: no thread, no second loop, so handlers call the engine directly.

uvicorn's own signal handling is off (the scheduler's handlers drain: server.py); its logging goes
through the scheduler's (no access log: the job log has a line per job event).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn

log = logging.getLogger(__name__)

# Connections served at once; beyond this uvicorn answers 503 (a flood of idle connections cannot
# take the memory the engine needs).
MAX_CONNECTIONS = 1024


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the scheduler owns SIGINT / SIGTERM
        yield


class HttpServer:
    """start() binds and serves in a task on the running loop; stop() closes the listener, ends
    open connections (streams included) and waits for the task."""

    def __init__(self, app, host: str, port: int, *, ssl_certfile: str = "", ssl_keyfile: str = "", name: str = "HTTP"):
        self.name = name
        config = uvicorn.Config(app, host=host, port=port, lifespan="off", log_config=None, access_log=False,
                                limit_concurrency=MAX_CONNECTIONS, timeout_keep_alive=5, timeout_graceful_shutdown=2,
                                ssl_certfile=ssl_certfile or None, ssl_keyfile=ssl_keyfile or None, server_header=False)
        self.server = _Server(config)
        self.task: asyncio.Task | None = None
        self.port = 0

    async def start(self) -> int:
        """Serves; returns the port (the one picked when port was 0). OSError when it cannot bind
        (the socket is bound here, not by uvicorn, whose bind error would exit the process)."""
        config = self.server.config
        if not config.loaded:
            config.load()
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        sock = socket.create_server((config.host, config.port), family=family, backlog=config.backlog)
        sock.setblocking(False)
        self.server.lifespan = config.lifespan_class(config)
        await self.server.startup(sockets=[sock])
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.task = asyncio.get_running_loop().create_task(self._run())
        return self.port

    async def _run(self) -> None:
        await self.server.main_loop()
        await self.server.shutdown(sockets=[self.sock])

    async def stop(self) -> None:
        if self.task is None:
            return
        self.server.should_exit = True
        self.server.force_exit = True  # streams (SSE) end now: the scheduler is stopping
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self.task, 5)
        self.task = None
