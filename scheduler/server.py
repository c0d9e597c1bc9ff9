"""Assembles and runs the scheduler service: gRPC (GenerationService, grpc.health.v1, reflection)
on uvloop, the ZeroMQ worker link, the engine, and the local worker processes.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from diffserve.v1 import generation_pb2 as pb
from diffserve.v1.limits import MESSAGE_SIZE_OPTIONS

from diffserve.scheduler import errors
from diffserve.scheduler.artifacts import open_store
from diffserve.scheduler.auth import Tokens
from diffserve.scheduler.engine import Engine, EngineConfig
from diffserve.scheduler.grpc_auth import TlsConfig, TokenInterceptor
from diffserve.scheduler.images import ImagePolicy
from diffserve.scheduler.launcher import LocalWorkers, LocalWorkerSpec
from diffserve.scheduler.service import GenerationService, add_to_server
from diffserve.scheduler.store import FILE_NAME as STORE_FILE
from diffserve.scheduler.store import JobStore
from diffserve.scheduler.workers import WorkerAuth, WorkerLink

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    worker_bind: str = "tcp://127.0.0.1:0"  # ZeroMQ address workers connect to
    worker_auth: WorkerAuth = field(default_factory=WorkerAuth)  # CURVE keys (state folder) or loopback plain TCP
    output_dir: str = "outputs"  # the local artifact store (when artifact_store is "")
    artifact_store: str = ""  # s3://BUCKET[/PREFIX]; "" keeps artifacts in output_dir
    s3_endpoint_url: str = ""  # MinIO and other S3-compatible servers; "" is AWS
    s3_region: str = ""  # "" is boto3's default chain
    engine: EngineConfig = field(default_factory=EngineConfig)
    local_workers: list[LocalWorkerSpec] = field(default_factory=list)
    restart_workers: bool = True
    drain_timeout_s: float = 60.0
    images: ImagePolicy = field(default_factory=ImagePolicy)
    tls: TlsConfig | None = None  # None: plaintext gRPC (loopback)
    auth_tokens: str = ""  # tokens file; empty: every RPC open, one anonymous principal
    state_dir: str = ""  # the job store (store.FILE_NAME) lives here; empty: jobs are kept in memory only


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
                                    auth_args=self.link.local_worker_argv())
        self.exit_code = 0
        self.tokens = Tokens(config.auth_tokens) if config.auth_tokens else None  # raises TokensFileError
        interceptors = [TokenInterceptor(self.tokens)] if self.tokens is not None else []
        self.server = grpc.aio.server(options=list(MESSAGE_SIZE_OPTIONS), interceptors=interceptors)
        add_to_server(GenerationService(self.engine, config.images), self.server)  # malformed bodies → INVALID_ARGUMENT
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.port = 0
        self._tasks: list[asyncio.Task] = []
        self._stopped = asyncio.Event()

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
        """A local worker can never serve: stop rather than wait forever."""
        if not self.engine.any_worker_alive() and not self.workers.procs:
            log.error("stopping: %s", reason)
            self.exit_code = 3
            self.config.drain_timeout_s = 0
            asyncio.get_running_loop().create_task(self.stop())

    async def start(self) -> int:
        if self.config.state_dir:  # reloaded before anything listens; StoreError stops the start
            self.engine.restore(JobStore.open(Path(self.config.state_dir) / STORE_FILE))
        address = f"{self.config.host}:{self.config.port}"
        if self.config.tls is not None:
            self.port = self.server.add_secure_port(address, self.config.tls.credentials())
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.config.host}:{self.config.port}")
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        self._tasks = [asyncio.create_task(self.engine.run()), asyncio.create_task(self.workers.run())]
        security = ("mutual TLS" if self.config.tls.client_ca else "TLS") if self.config.tls else "plaintext"
        log.info("scheduler listening on %s:%d (gRPC, %s, %s), workers connect to %s", self.config.host, self.port, security,
                 f"{len(self.tokens.principals())} principal(s) with tokens" if self.tokens else "no tokens", self.link.address)
        return self.port

    async def wait(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        """Refuses new jobs, lets queued and running ones finish (up to drain_timeout_s), then exits."""
        if not self.engine.accepting:
            return
        self.engine.stop_accepting()
        log.info("draining: waiting up to %.0f s for running jobs", self.config.drain_timeout_s)
        await self.engine.drain(self.config.drain_timeout_s, errors.cancelled("the server shut down"))
        await self.health.enter_graceful_shutdown()
        await self.engine.shutdown_workers()
        await self.workers.stop()
        await self.server.stop(grace=2.0)
        for task in self._tasks:
            task.cancel()
        self.link.close()
        self.engine.close_store()
        self._stopped.set()


async def serve(config: ServerConfig, on_started=None) -> int:
    """Runs until SIGINT / SIGTERM, then drains."""
    server = SchedulerServer(config)
    port = await server.start()
    if on_started is not None:
        on_started(port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: loop.create_task(server.stop()))
    await server.wait()
    return server.exit_code


def run(config: ServerConfig, on_started=None) -> int:
    """Serves until SIGINT / SIGTERM; returns the process exit code."""
    try:
        import uvloop
    except ImportError:  # uvloop is not built for every platform
        return asyncio.run(serve(config, on_started))
    return uvloop.run(serve(config, on_started))
