"""The scheduler's engine: one façade over four rooms, and the loops that drive them.

    admission.Admission    validate, queue (bounded), place queued jobs on workers
    steps.StepLoop         policy → one command per idle worker (carrying the finished ids)
    results.Results        worker Results → job events; artifact saves
    registry.WorkerRegistry  registered workers, model cards, placement

The loop is thin, as in vLLM's engine core: on every wake-up it places queued jobs on workers
with room, then asks the policy for each idle worker's next command and sends it. Results move
the jobs (Job.advance, the only writer of a job's phase); the worker's next command then goes out
at once from the receive loop (`_next_command`), and only a Result after which a job left its
worker (room for the queue, ids to free) wakes the full pass, and a heartbeat none — so a step
costs the same with 1 or 64 workers and any queue length (docs/scaling.md). One compute
command is in flight per worker group; each denoising step is one command carrying only request
ids and step indices.

The front doors (service.py, server.py) use the methods below, never the rooms. All methods run
on the event loop thread; nothing here blocks or imports torch.

Peers are not trusted to be well behaved (docs/decisions.md, "A worker that breaks the
protocol"): a Result counts only from the worker its command was sent to; a malformed message
(wire.ProtocolError, or any error while handling it) disconnects its sender if registered, which
fails that worker's jobs alone, and is dropped otherwise; the receive loop never ends on a bad
message. Lines a peer can trigger at will are throttled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from google.rpc import status_pb2

from diffserve.v1 import generation_pb2 as pb
from diffserve.worker.v1 import worker_pb2 as wpb

from diffserve.scheduler import errors
from diffserve.scheduler.admission import Admission
from diffserve.scheduler.artifacts import ArtifactStore
from diffserve.scheduler.auth import ANONYMOUS_NAME
from diffserve.scheduler.jobs import Job, JobTable
from diffserve.scheduler.lifecycle import RUNNING, Event, Phase
from diffserve.scheduler.registry import WorkerRegistry
from diffserve.scheduler.results import Results
from diffserve.scheduler.steps import StepLoop
from diffserve.scheduler.wire import DEFAULT_MAX_MESSAGE_BYTES, ProtocolError, Throttled, peer

if TYPE_CHECKING:  # the link is the only part that needs sockets; unit tests pass a fake
    from diffserve.scheduler.workers import WorkerLink

log = logging.getLogger(__name__)

# Messages the receive loop handles before it yields to the other tasks (gRPC). Measured at 64
# saturated groups (docs/scaling.md): 64 → GetJob 75 ms and 512 submits 19 s; 8 → 11 ms and 2.9 s,
# the same step rate.
RECEIVE_BURST = 8


@dataclass
class EngineConfig:
    max_queue: int = 256  # queued (not yet admitted) jobs; more → RESOURCE_EXHAUSTED
    max_batch_size: int = 4  # jobs per denoising step command
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 5.0
    retry_after_s: float = 5.0  # RetryInfo sent with RESOURCE_EXHAUSTED
    max_worker_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # also the WorkerLink's cap; a card with a larger output is refused


class Engine:
    """Owns every job's state and drives the workers; the gRPC service is a thin layer on top."""

    def __init__(self, config: EngineConfig, link: WorkerLink, artifacts: ArtifactStore):
        self.config = config
        self._link = link
        self._artifacts = artifacts
        self._jobs = JobTable()
        self._registry = WorkerRegistry()
        self._admission = Admission(self._jobs, self._registry, link, config.max_queue, config.retry_after_s)
        self._steps = StepLoop(link, config.max_batch_size)
        self._results = Results(self._registry, artifacts)
        self._on_serving_change: Callable[[dict[str, bool]], None] = lambda serving: None
        self._wake = asyncio.Event()
        self._peer_log = Throttled(log)  # lines a peer can trigger at will

    # ---- jobs (the service) ----

    def submit(self, params: pb.GenerationParams, client_request_id: str = "", timeout_s: float | None = None,
               principal: str = ANONYMOUS_NAME) -> tuple[Job, bool]:
        """Validates and queues a job owned by `principal`; returns (job, created). Raises errors.RequestError."""
        job, created = self._admission.submit(params, client_request_id, timeout_s, principal)
        if created:
            self.wake()
        return job, created

    def cancel(self, job: Job, status: status_pb2.Status) -> None:
        """Stops a job at the next step boundary and frees its state on the worker."""
        if job.done or job.cancel_status is not None:
            return
        if job.phase is Phase.QUEUED:
            self._admission.withdraw(job, status)
        elif job.busy:  # in a running command or being saved: ends when that returns
            job.advance(Event.CANCEL_LATER, status=status)
        else:
            self._results.end(job, Event.CANCEL, status)
        self.wake()

    def get_job(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def list_jobs(self) -> list[Job]:
        return list(self._jobs)

    def queue_position(self, job: Job) -> int:
        return self._admission.position(job)

    def job_proto(self, job: Job) -> pb.Job:
        return job.to_proto(self._admission.position(job))

    def artifact_chunks(self, artifact: pb.Artifact) -> Iterator[bytes]:
        """The artifact's bytes in chunks (blocking reads: iterate on a thread pool)."""
        return self._artifacts.chunks(artifact)

    # ---- models and workers ----

    def list_models(self) -> list[pb.Model]:
        return self._registry.list_models()

    def serving(self) -> dict[str, bool]:
        return self._registry.serving()

    def any_worker_alive(self) -> bool:
        return self._registry.any_alive()

    def watch_serving(self, callback: Callable[[dict[str, bool]], None]) -> None:
        """callback(serving) runs whenever a worker registers or is lost."""
        self._on_serving_change = callback

    def worker_lost(self, worker_id: str, reason: str) -> None:
        """Fails the jobs running on a worker that died or stopped answering."""
        worker = self._registry.remove(worker_id)
        if worker is None:
            return
        log.error("worker %s lost: %s", peer(worker_id), reason)
        self._steps.forget(worker_id)
        status = errors.unavailable(f"worker {worker_id} serving {worker.model.name} was lost: {reason}", "WORKER_LOST")
        self._results.worker_lost(worker, status)
        self._on_serving_change(self.serving())
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    # ---- shutdown ----

    @property
    def accepting(self) -> bool:
        return self._admission.accepting

    def stop_accepting(self) -> None:
        """New jobs are refused with UNAVAILABLE (SHUTTING_DOWN) from now on."""
        self._admission.accepting = False

    def busy(self) -> bool:
        """Jobs are queued, or running (on a worker or being saved)."""
        return bool(len(self._admission)) or any(j.phase in RUNNING for j in self._jobs)

    async def drain(self, timeout_s: float, status: status_pb2.Status) -> None:
        """Waits up to timeout_s for queued and running jobs to finish, then cancels the rest."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.busy() and loop.time() < deadline:
            await asyncio.sleep(0.2)
        for job in self._jobs:
            if not job.done:
                self.cancel(job, status)

    async def shutdown_workers(self) -> None:
        for worker in self._registry:
            await self._link.send(worker.id, wpb.Command(shutdown=wpb.Shutdown()))

    # ---- loops ----

    async def run(self) -> None:
        await asyncio.gather(self._receive_loop(), self._step_loop(), self._timer_loop())

    async def _step_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._admission.place()
            for worker in self._registry.idle():
                if not await self._steps.dispatch(worker):
                    self.worker_lost(worker.id, "its socket is gone")

    async def _receive_loop(self) -> None:
        burst = 0
        while True:
            burst += 1
            if burst >= RECEIVE_BURST:  # recv() does not yield while messages wait: let the other tasks run
                burst = 0
                await asyncio.sleep(0)
            try:
                worker_id, msg, frames = await self._link.recv()
                received = time.perf_counter()
            except ProtocolError as exc:
                self._malformed(exc.worker_id, str(exc))
                continue
            except Exception:  # the socket itself failed: keep serving the registered workers
                log.exception("receiving from the worker socket failed")
                await asyncio.sleep(0.1)
                continue
            try:
                await self._handle(worker_id, msg, frames)
            except ProtocolError as exc:
                self._malformed(worker_id, str(exc))
            except Exception as exc:  # a message we cannot handle: its worker's state is unknown now
                log.exception("handling a message from worker %s failed", peer(worker_id))
                self._malformed(worker_id, f"handling it failed ({type(exc).__name__})")
            else:
                if msg.HasField("heartbeat"):  # changes nothing the step loop acts on: no pass (with a
                    continue                  # deep queue, a pass per heartbeat cost 64 × O(queue × workers) per second)
                if msg.HasField("result") and await self._next_command(worker_id, received):
                    continue
            if self._steps.trace is not None and msg.HasField("result"):
                self._steps.trace.ready(worker_id, received)
            self.wake()

    async def _next_command(self, worker_id: str, received: float) -> bool:
        """The fast path after a Result: the worker's next command goes out at once, without a pass
        over every worker. False (a full pass is needed) when the worker is gone or busy, or a job
        left it (room for a queued job, ids to free): the step loop's pass does it then."""
        worker = self._registry.get(worker_id)
        if worker is None or not worker.idle or worker.finished:
            return False
        if self._steps.trace is not None:
            self._steps.trace.ready(worker_id, received)
        if not await self._steps.dispatch(worker):
            self.worker_lost(worker.id, "its socket is gone")
        return True

    async def _handle(self, worker_id: str, msg: wpb.WorkerMessage, frames: list) -> None:
        kind = msg.WhichOneof("body")
        if kind == "hello":
            await self._on_hello(worker_id, msg.hello)
        elif kind == "heartbeat":
            await self._on_heartbeat(worker_id, msg.heartbeat)
        elif kind == "result":
            self._on_result(worker_id, msg.result, frames)

    def _malformed(self, worker_id: str | None, reason: str) -> None:
        """A registered worker that broke the protocol is disconnected (its jobs fail); anything
        else is dropped."""
        if self._registry.get(worker_id) is not None:
            self.worker_lost(worker_id, f"it sent a malformed message: {reason}")
        else:
            sender = peer(worker_id) if worker_id is not None else "a peer"
            self._peer_log.warning("malformed", "dropping a malformed message from %s, not a registered worker: %s", sender, reason)

    async def _timer_loop(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            now = time.monotonic()
            for job in self._jobs:
                if not job.done and job.deadline is not None and now > job.deadline:
                    self.cancel(job, errors.deadline_exceeded())
            for worker in self._registry:
                if worker.alive and now - worker.last_seen > self.config.heartbeat_timeout_s:
                    self.worker_lost(worker.id, f"no heartbeat for {now - worker.last_seen:.1f} s")

    async def _on_hello(self, worker_id: str, hello: wpb.Hello) -> None:
        if not self._registry.compatible(worker_id, hello):
            return
        refusal = self._registry.refusal(hello, self.config.max_worker_message_bytes)
        if refusal is not None:  # not registered and not told: it keeps saying Hello, we keep refusing
            self._peer_log.warning("refused", "refusing worker %s: %s", peer(worker_id), refusal)
            return
        if self._registry.get(worker_id) is not None:
            self.worker_lost(worker_id, "the worker restarted")
        self._registry.register(worker_id, hello)
        welcome = wpb.Welcome(worker_id=worker_id, heartbeat_interval_s=self.config.heartbeat_interval_s)
        await self._link.send(worker_id, wpb.Command(welcome=welcome))
        self._on_serving_change(self.serving())

    async def _on_heartbeat(self, worker_id: str, beat: wpb.Heartbeat) -> None:
        worker = self._registry.get(worker_id)
        if worker is None or not worker.alive:
            # Unknown to us (we restarted, or declared it dead): it must drop its state and say Hello again.
            await self._link.send(worker_id, wpb.Command(reregister=wpb.Reregister()))
            return
        worker.last_seen = time.monotonic()
        worker.status.CopyFrom(beat.status)

    def _on_result(self, worker_id: str, result: wpb.Result, frames: list) -> None:
        worker = self._registry.get(worker_id)
        if worker is None:
            self._peer_log.warning("forged", "dropping a Result (command %d) from %s, not a registered worker", result.command_id, peer(worker_id))
            return
        plan = self._steps.complete(worker, result.command_id)
        if plan is None:  # late (the worker was lost meanwhile) or not this worker's command
            self._peer_log.warning("stale", "dropping a Result for command %d from worker %s, which is not running it", result.command_id, peer(worker_id))
            return
        self._results.apply(worker_id, plan, result, frames)
