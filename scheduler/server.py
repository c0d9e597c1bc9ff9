"""Assembles and runs the scheduler service: gRPC (GenerationService, grpc.health.v1, reflection)
on uvloop, the HTTP API (http/, with --http-port) on the same loop, Prometheus /metrics (metrics.py:
on the HTTP port, or alone with --metrics-port), the ZeroMQ worker link, the engine, and the local
worker processes.

Signals (SIGINT, SIGTERM; a terminal's Ctrl-C reaches the scheduler alone, its local workers run
in their own sessions): the first one drains. Health goes NOT_SERVING at once for every name
("", the service, each model) and ListModels says NOT_SERVING, so load balancers stop sending;
submits are refused (UNAVAILABLE, SHUTTING_DOWN); queued jobs are not started and not cancelled
(they stay for the next start); running jobs get up to drain_timeout_s to finish (those left stay
as they are, as after a crash). Then every registered worker is told to shut down, the local ones
are reaped, and the process exits 0. A second signal exits at once: local workers are killed and
the process exits 128 + the signal (130 for SIGINT, 143 for SIGTERM).

With parent_pid (`generate --model-path` starts a private server) the server gets SIGHUP when
that process dies, however it died, and stops as on a first SIGTERM; cleanup_dir is removed when
the server exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from diffserve.v1 import generation_pb2 as pb
from diffserve.v1.limits import MESSAGE_SIZE_OPTIONS
from diffserve.worker.v1.launch import die_with_parent

from diffserve.scheduler.artifacts import open_store
from diffserve.scheduler.auth import Tokens
from diffserve.scheduler.engine import Engine, EngineConfig
from diffserve.scheduler.frontdoor import FrontDoor
from diffserve.scheduler.grpc_auth import TlsConfig, TokenInterceptor
from diffserve.scheduler.images import ImagePolicy
from diffserve.scheduler.lifecycle import Phase
from diffserve.scheduler.launcher import LocalWorkers, LocalWorkerSpec
from diffserve.scheduler.service import GenerationService, add_to_server
from diffserve.scheduler.store import FILE_NAME as STORE_FILE
from diffserve.scheduler.store import JobStore
from diffserve.scheduler.workers import WorkerAuth, WorkerLink

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name


class ListenError(OSError):
    """A port of the scheduler cannot be listened on; the message names the flag."""


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    worker_bind: str = "tcp://127.0.0.1:0"  # ZeroMQ address workers connect to
    worker_auth: WorkerAuth = field(default_factory=WorkerAuth)  # CURVE keys (state folder) or loopback plain TCP
    output_dir: str = "artifacts"  # the local artifact store (when artifact_store is ""); not "outputs": the client writes there
    artifact_store: str = ""  # s3://BUCKET[/PREFIX]; "" keeps artifacts in output_dir
    s3_endpoint_url: str = ""  # MinIO and other S3-compatible servers; "" is AWS
    s3_region: str = ""  # "" is boto3's default chain
    engine: EngineConfig = field(default_factory=EngineConfig)
    local_workers: list[LocalWorkerSpec] = field(default_factory=list)
    restart_workers: bool = True
    drain_timeout_s: float = 60.0
    images: ImagePolicy = field(default_factory=ImagePolicy)
    tls: TlsConfig | None = None  # None: plaintext gRPC (loopback); also the HTTP API's certificate
    http_host: str = "127.0.0.1"
    http_port: int | None = None  # the HTTP API (OpenAI-compatible, /metrics, the playground); None: off, 0 picks a free port
    metrics_port: int | None = None  # /metrics alone on its own port (and then not on the HTTP port); None: off, 0 picks a free port
    metrics_host: str = ""  # "" is http_host
    auth_tokens: str = ""  # tokens file; empty: every RPC open, one anonymous principal
    state_dir: str = ""  # the job store (store.FILE_NAME) lives here; empty: jobs are kept in memory only
    parent_pid: int = 0  # stop (as on SIGTERM) when this process dies; 0: no parent to watch
    cleanup_dir: str = ""  # a temporary folder (generate's) removed when the server exits


class SchedulerServer:
    """The scheduler process: start(), then wait(); stop() drains and shuts everything down."""

    def __init__(self, config: ServerConfig):
        self.config = config
        # First: a store that cannot be used stops the start (artifacts.ArtifactStoreError) before any socket opens.
        self.artifacts = open_store(config.artifact_store, config.output_dir, endpoint_url=config.s3_endpoint_url, region=config.s3_region)
        self.link = WorkerLink(config.worker_bind, config.worker_auth, config.engine.max_worker_message_bytes)
        self.engine = Engine(config.engine, self.link, self.artifacts)
        self.health = health.aio.HealthServicer()
        self.engine.watch_serving(self._on_serving_change)
        self.workers = LocalWorkers(self.link.address, config.local_workers, self.engine.worker_lost, config.restart_workers, self._fatal,
                                    auth_args=self.link.local_worker_argv(), registered=self.engine.worker_registered)
        self.exit_code = 0
        self.tokens = Tokens(config.auth_tokens) if config.auth_tokens else None  # raises TokensFileError
        interceptors = [TokenInterceptor(self.tokens)] if self.tokens is not None else []
        self.server = grpc.aio.server(options=list(MESSAGE_SIZE_OPTIONS), interceptors=interceptors)
        self.door = FrontDoor(self.engine, config.images)
        add_to_server(GenerationService(self.door), self.server)  # malformed bodies → INVALID_ARGUMENT
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.metrics = self.engine.metrics
        self.metrics.local_workers = self.workers
        self.http = self._http_server() if config.http_port is not None else None
        self.metrics_http = self._metrics_server() if config.metrics_port is not None else None
        self.port = 0
        self.http_port = 0
        self.metrics_port = 0
        self._tasks: list[asyncio.Task] = []
        self._stopped = asyncio.Event()
        self._stop_task: asyncio.Task | None = None
        self.forced = False

    def _http_server(self):
        from diffserve.scheduler.http.app import create_app
        from diffserve.scheduler.http.server import HttpServer

        # /metrics here unless --metrics-port puts it on a port of its own
        metrics_app = self.metrics.asgi_app() if self.config.metrics_port is None else None
        app = create_app(self.door, self.tokens, self.serving, metrics_app=metrics_app)
        tls = self.config.tls
        return HttpServer(app, self.config.http_host, self.config.http_port,
                          ssl_certfile=tls.cert if tls else "", ssl_keyfile=tls.key if tls else "")

    def _metrics_server(self):
        """/metrics alone (--metrics-port), with the HTTP API's TLS certificate when one is given."""
        from diffserve.scheduler.http.server import HttpServer

        tls = self.config.tls
        return HttpServer(self.metrics.asgi_app(), self.config.metrics_host or self.config.http_host, self.config.metrics_port,
                          ssl_certfile=tls.cert if tls else "", ssl_keyfile=tls.key if tls else "", name="metrics")

    @staticmethod
    async def _listen(http, flag: str, host: str, port: int) -> int:
        try:
            return await http.start()
        except OSError as exc:
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ListenError(f"{flag} {port}: cannot listen on {host}:{port} ({why})") from None

    def serving(self) -> bool:
        """Submits are accepted and some model is served (the HTTP /health)."""
        return self.engine.accepting and any(self.engine.serving().values())

    def _on_serving_change(self, serving: dict[str, bool]) -> None:
        any_serving = any(serving.values())
        status = health_pb2.HealthCheckResponse.SERVING if any_serving else health_pb2.HealthCheckResponse.NOT_SERVING
        log.info("health: %s (%s)", health_pb2.HealthCheckResponse.ServingStatus.Name(status), serving)
        loop = asyncio.get_running_loop()
        for name in ("", SERVICE_NAME):
            loop.create_task(self.health.set(name, status))
        for model, up in serving.items():
            model_status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
            loop.create_task(self.health.set(f"{SERVICE_NAME}/{model}", model_status))

    def _fatal(self, reason: str) -> None:
        """A local worker can never serve: stop rather than wait forever (unless another serves)."""
        if self.engine.any_worker_alive() or self.workers.procs:
            log.error("going on (other workers serve or start): %s", reason)
        else:
            log.error("stopping: %s", reason)
            self.exit_code = 3
            self.config.drain_timeout_s = 0
            self._begin_stop()

    async def start(self) -> int:
        if self.config.state_dir:  # reloaded before anything listens; StoreError stops the start
            self.engine.restore(JobStore.open(Path(self.config.state_dir) / STORE_FILE))
        address = f"{self.config.host}:{self.config.port}"
        try:
            if self.config.tls is not None:
                self.port = self.server.add_secure_port(address, self.config.tls.credentials())
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError:  # grpc's "Failed to bind"
            self.port = 0
        if self.port == 0:
            raise ListenError(f"--port {self.config.port}: cannot listen on {address} (in use, or not an address of this machine)")
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        try:
            if self.http is not None:
                self.http_port = await self._listen(self.http, "--http-port", self.config.http_host, self.config.http_port)
            if self.metrics_http is not None:
                self.metrics_port = await self._listen(self.metrics_http, "--metrics-port", self.config.metrics_host or self.config.http_host,
                                                       self.config.metrics_port)
        except ListenError:
            await self.server.stop(None)
            self.link.close()
            raise
        self._tasks = [asyncio.create_task(self.engine.run()), asyncio.create_task(self.workers.run())]
        security = ("mutual TLS" if self.config.tls.client_ca else "TLS") if self.config.tls else "plaintext"
        log.info("scheduler listening on %s:%d (gRPC, %s, %s), workers connect to %s", self.config.host, self.port, security,
                 f"{len(self.tokens.principals())} principal(s) with tokens" if self.tokens else "no tokens", self.link.address)
        scheme = "https" if self.config.tls else "http"
        if self.http is not None:
            log.info("HTTP API on %s://%s:%d (OpenAI-compatible /v1, %splayground at /)",
                     scheme, self.config.http_host, self.http_port, "" if self.metrics_http is not None else "/metrics, ")
        if self.metrics_http is not None:
            log.info("Prometheus metrics on %s://%s:%d/metrics", scheme, self.config.metrics_host or self.config.http_host, self.metrics_port)
        return self.port

    async def wait(self) -> None:
        await self._stopped.wait()

    def on_signal(self, sig: int) -> None:
        """The first SIGINT / SIGTERM drains, a second one exits at once."""
        name = signal.Signals(sig).name
        if self._stop_task is None:
            log.log(self._stop_level, "%s: stopping after a drain (%s again exits at once)", name, name)
            self._begin_stop()
        elif not self.forced:
            self.force_stop(sig)

    @property
    def _stop_level(self) -> int:
        """A private server (--parent-pid: `generate --model-path`'s) is stopped by its parent as a
        matter of course: its stop lines are INFO there, not warnings in the user's terminal."""
        return logging.INFO if self.config.parent_pid else logging.WARNING

    def _counts(self) -> tuple[int, int]:
        """(running, queued) jobs."""
        jobs = self.engine.list_jobs()
        return self.engine.running(), sum(job.phase is Phase.QUEUED for job in jobs)

    def _begin_stop(self) -> None:
        if self._stop_task is None:
            self._stop_task = asyncio.get_running_loop().create_task(self.stop())

    async def stop(self) -> None:
        """Drains (see the module docstring), shuts the workers down, then stops serving."""
        self.engine.stop_accepting()
        await self.health.enter_graceful_shutdown()  # every name NOT_SERVING now, and it stays so
        running, queued = self._counts()
        log.log(self._stop_level, "draining: %d running job(s) get up to %.0f s to finish; %d queued job(s) stay queued for the next start",
                running, self.config.drain_timeout_s, queued)
        running, queued = await self.engine.drain(self.config.drain_timeout_s)
        if running:
            log.warning("%d running job(s) did not finish within the drain timeout (%.0f s); they stay as they are",
                        running, self.config.drain_timeout_s)
        log.info("drained: %d queued job(s) stay queued for the next start", queued)
        for task in self._tasks:  # nothing moves any more: no placement, no loss handling, no restart
            task.cancel()
        await self.engine.shutdown_workers()
        await self.workers.stop()
        await self.server.stop(grace=2.0)
        if self.http is not None:
            await self.http.stop()
        if self.metrics_http is not None:
            await self.metrics_http.stop()
        self.link.close()
        self.engine.close_store()
        self._stopped.set()

    def force_stop(self, sig: int) -> None:
        """Exits now: local workers killed, jobs left as they are (as after a crash)."""
        self.forced = True
        log.warning("%s again: exiting now (%d running and %d queued job(s) left as they are)", signal.Signals(sig).name, *self._counts())
        self.exit_code = 128 + sig
        self.workers.kill()
        try:  # what is marked but not yet written goes out in one transaction (each one is atomic)
            self.engine.close_store()
        except Exception:
            log.exception("writing the job store at exit failed; its last committed state stands")
        for task in [*self._tasks, self._stop_task]:
            if task is not None:
                task.cancel()
        self._stopped.set()

    def on_parent_gone(self) -> None:
        """The parent-death signal, SIGHUP (sent again as each thread of a threaded parent exits,
        hence not SIGTERM, whose second one would force the exit): stops once, as on SIGTERM."""
        if self._stop_task is None:
            log.warning("parent process %d is gone: stopping", self.config.parent_pid)
            self._begin_stop()

    async def _watch_parent(self, parent_pid: int) -> None:
        """Where no parent-death signal exists: polls for the parent."""
        while os.getppid() == parent_pid:
            await asyncio.sleep(0.5)
        self.on_parent_gone()


async def serve(config: ServerConfig, on_started=None) -> int:
    """Runs until SIGINT / SIGTERM (or its parent's death), then drains; returns the exit code."""
    server = SchedulerServer(config)
    port = await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.on_signal, sig)
    if config.parent_pid:
        loop.add_signal_handler(signal.SIGHUP, server.on_parent_gone)
        if not die_with_parent(config.parent_pid, signal.SIGHUP):
            loop.create_task(server._watch_parent(config.parent_pid))
    if on_started is not None:  # (grpc port, http port[, metrics port with --metrics-port])
        ports = (port, server.http_port) + ((server.metrics_port,) if server.metrics_http is not None else ())
        on_started(*ports)
    await server.wait()
    if server.forced:
        await server.server.stop(None)
        if server.http is not None:
            await server.http.stop()
        if server.metrics_http is not None:
            await server.metrics_http.stop()
        server.link.close()
    return server.exit_code


def run(config: ServerConfig, on_started=None) -> int:
    """Serves until SIGINT / SIGTERM; returns the process exit code."""
    try:
        try:
            import uvloop
        except ImportError:  # uvloop is not built for every platform
            return asyncio.run(serve(config, on_started))
        return uvloop.run(serve(config, on_started))
    finally:
        if config.cleanup_dir:
            shutil.rmtree(config.cleanup_dir, ignore_errors=True)

