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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from google.rpc import status_pb2

from diffserve.v1 import generation_pb2 as pb
from diffserve.worker.v1 import worker_pb2 as wpb

from diffserve.scheduler import errors
from diffserve.scheduler.admission import Admission
from diffserve.scheduler.artifacts import ArtifactStore, StoredArtifact
from diffserve.scheduler.auth import ANONYMOUS_NAME, PriorityRule
from diffserve.scheduler.jobs import Job, JobTable
from diffserve.scheduler.lifecycle import RUNNING, Event, Phase
from diffserve.scheduler.metrics import Metrics
from diffserve.scheduler.registry import WorkerHandle, WorkerRegistry
from diffserve.scheduler.results import Results
from diffserve.scheduler.steps import StepLoop
from diffserve.scheduler.store import JobStore
from diffserve.scheduler.wire import DEFAULT_MAX_MESSAGE_BYTES, ProtocolError, Throttled, peer

if TYPE_CHECKING:  # the link is the only part that needs sockets; unit tests pass a fake
    from diffserve.scheduler.workers import WorkerLink

log = logging.getLogger(__name__)

# Messages the receive loop handles before it yields to the other tasks (gRPC). Measured at 64
# saturated groups (docs/scaling.md): 64 → GetJob 75 ms and 512 submits 19 s; 8 → 11 ms and 2.9 s,
# the same step rate.
RECEIVE_BURST = 8
SOCKET_GONE_GRACE_S = 0.2  # a failed send declares its worker lost this much later (its Goodbye first)


@dataclass
class EngineConfig:
    max_queue: int = 256  # queued (not yet admitted) jobs; more → RESOURCE_EXHAUSTED
    max_batch_size: int = 4  # jobs per denoising step command
    pack_tokens: int = 0  # mixed-shape packing: latent tokens per step (0: off; policy.Packing)
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 5.0
    retry_after_s: float = 5.0  # RetryInfo sent with RESOURCE_EXHAUSTED
    max_attempts: int = 2  # runs of a job whose worker group is lost, before it fails
    max_worker_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # also the WorkerLink's cap; a card with a larger output is refused
    max_jobs: int = 10_000  # finished jobs kept (oldest finished dropped first, with their artifacts)
    job_ttl_s: float | None = 7 * 24 * 3600.0  # finished jobs older than this are dropped, with their artifacts
    priority_aging_s: float = 30.0  # a queued job's priority grows by 1 per this many seconds waited (0: no aging)
    priorities: PriorityRule = field(default_factory=PriorityRule)  # per-principal default (and cap) priorities


class Engine:
    """Owns every job's state and drives the workers; the gRPC service is a thin layer on top."""

    def __init__(self, config: EngineConfig, link: WorkerLink, artifacts: ArtifactStore, metrics: Metrics | None = None):
        self.config = config
        self._link = link
        self._artifacts = artifacts
        self.metrics = metrics or Metrics()  # its own registry: read at scrape time, told of job events
        self.metrics.watch(self)
        self._jobs = JobTable(config.max_jobs, config.job_ttl_s, on_drop=self._delete_artifact, observer=self.metrics)
        self._registry = WorkerRegistry()
        self._admission = Admission(self._jobs, self._registry, link, config.max_queue, config.retry_after_s,
                                    config.priorities, config.priority_aging_s)
        self._steps = StepLoop(link, config.max_batch_size, config.pack_tokens)
        self._results = Results(self._registry, artifacts, self._admission.requeue, config.max_attempts)
        self._on_serving_change: Callable[[dict[str, bool]], None] = lambda serving: None
        self._wake = asyncio.Event()
        self._peer_log = Throttled(log)  # lines a peer can trigger at will

    # ---- jobs (the service) ----

    def submit(self, params: pb.GenerationParams, client_request_id: str = "", timeout_s: float | None = None,
               principal: str = ANONYMOUS_NAME, priority: int | None = None) -> tuple[Job, bool]:
        """Validates and queues a job owned by `principal` (`priority` None: the principal's default);
        returns (job, created). Raises errors.RequestError."""
        job, created = self._admission.submit(params, client_request_id, timeout_s, principal, priority)
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

    def forget(self, job: Job) -> None:
        """Drops a finished job and deletes its artifact now (DELETE /v1/videos/{id}); ValueError
        for a job that has not ended (cancel it instead)."""
        self._jobs.remove(job)

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

    def find_artifact(self, artifact_id: str) -> StoredArtifact | None:
        """An artifact as its store describes it, with its owner: also one this scheduler never ran
        (another scheduler sharing the store did). Blocking (the store may be remote): call on a
        thread pool. Raises artifacts.ArtifactStoreError."""
        return self._artifacts.lookup(artifact_id)

    # ---- the durable store ----

    def restore(self, store: JobStore) -> None:
        """Attaches the durable store and reloads its jobs (before the API accepts calls): finished
        jobs answer again; queued jobs are queued again in their order; jobs that were running
        start again from step 0 (REQUEUE, "the scheduler restarted", attempt + 1), or fail past
        max_attempts; a cancel that was waiting ends its job. Then applies retention."""
        jobs = store.load()
        self._jobs.attach(store)
        self._jobs.restore(jobs)
        restarted = failed = 0
        for job in jobs:
            if job.done or job.phase is Phase.QUEUED:
                continue
            if job.cancel_status is not None:
                job.advance(Event.CANCEL)
            elif job.attempt < self.config.max_attempts:
                job.advance(Event.REQUEUE, reason="the scheduler restarted")
                restarted += 1
            else:
                message = f"the scheduler restarted while it ran (attempt {job.attempt} of {self.config.max_attempts})"
                job.advance(Event.FAIL, status=errors.unavailable(message, "SCHEDULER_RESTARTED"))
                failed += 1
        queued = [job for job in jobs if job.phase is Phase.QUEUED]
        self._admission.restore(queued)
        dropped = self._jobs.evict()
        store.flush()
        log.info("job store %s: %d jobs reloaded (%d queued again, %d of them restarted; %d failed past their attempts; %d dropped by retention)",
                 store.path, len(jobs), len(queued), restarted, failed, len(dropped))
        if queued:
            self.wake()

    def close_store(self) -> None:
        """Writes what is pending and closes the store (at exit)."""
        if self._jobs.store is not None:
            self._jobs.store.close()

    def _delete_artifact(self, job: Job) -> None:
        """A dropped job's artifact goes too (on the thread pool: the store may be remote)."""
        if job.artifact is None:
            return
        artifact = job.artifact

        def delete() -> None:
            try:
                self._artifacts.delete(artifact)
            except Exception:
                log.exception("deleting the artifact of job %s failed", job.id)

        try:
            asyncio.get_running_loop().run_in_executor(None, delete)
        except RuntimeError:  # no loop
            delete()

    # ---- models and workers ----

    def list_models(self) -> list[pb.Model]:
        """The models and their workers; while draining every model is NOT_SERVING (no new jobs)."""
        models = self._registry.list_models()
        if not self.accepting:
            for model in models:
                model.state = pb.SERVING_STATE_NOT_SERVING
        return models

    def serving(self) -> dict[str, bool]:
        return self._registry.serving()

    def any_worker_alive(self) -> bool:
        return self._registry.any_alive()

    def worker_registered(self, worker_id: str) -> bool:
        return self._registry.get(worker_id) is not None

    def workers(self) -> list[WorkerHandle]:
        """The registered worker groups (read, never changed: the metrics' scrape)."""
        return list(self._registry)

    def watch_serving(self, callback: Callable[[dict[str, bool]], None]) -> None:
        """callback(serving) runs whenever a worker registers or is lost."""
        self._on_serving_change = callback

    def worker_lost(self, worker_id: str, reason: str) -> None:
        """A worker died, stopped answering or left: its jobs go back to the queue (or fail past
        their attempts)."""
        worker = self._registry.remove(worker_id)
        if worker is None:
            return
        log.error("worker %s lost: %s", peer(worker_id), reason)
        self.metrics.worker_lost(worker.model.name, reason)
        self._steps.forget(worker_id)
        status = errors.unavailable(f"worker {worker_id} serving {worker.model.name} was lost: {reason}", "WORKER_LOST")
        self._results.worker_lost(worker, status)
        self._on_serving_change(self.serving())
        self.wake()

    def _socket_gone(self, worker: WorkerHandle) -> None:
        """A send to the worker failed (its connection closed). A worker that left said Goodbye
        first, and that message may be waiting right behind the Result just handled: the loss is
        declared a moment later, so the Goodbye's reason (e.g. "SIGTERM") is the one on record."""
        if worker.lost_soon:
            return
        worker.lost_soon = True

        def lost() -> None:
            if self._registry.get(worker.id) is worker:
                self.worker_lost(worker.id, "its socket is gone")

        asyncio.get_running_loop().call_later(SOCKET_GONE_GRACE_S, lost)

    def wake(self) -> None:
        self._wake.set()

    # ---- shutdown ----

    @property
    def accepting(self) -> bool:
        return self._admission.accepting

    def stop_accepting(self) -> None:
        """New jobs are refused with UNAVAILABLE (SHUTTING_DOWN) from now on, and queued jobs are
        no longer placed on workers: they stay queued (for the next start, with a job store)."""
        self._admission.accepting = False

    def busy(self) -> bool:
        """Jobs are queued, or running (on a worker or being saved)."""
        return bool(len(self._admission)) or any(j.phase in RUNNING for j in self._jobs)

    def running(self) -> int:
        """Jobs on a worker or being saved."""
        return sum(j.phase in RUNNING for j in self._jobs)

    async def drain(self, timeout_s: float) -> tuple[int, int]:
        """Waits up to timeout_s for the running jobs to finish; returns (running, queued) jobs
        left. Call after stop_accepting(): queued jobs are not started. Nothing is cancelled: a job
        left stays in its phase, as after a crash (a job store runs it again at the next start)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.running() and loop.time() < deadline:
            await asyncio.sleep(0.1)
        return self.running(), len(self._admission)

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
            if self.accepting:  # draining: queued jobs stay queued
                await self._admission.place()
            for worker in self._registry.idle():
                if not await self._steps.dispatch(worker):
                    self._socket_gone(worker)

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
            self._socket_gone(worker)
        return True

    async def _handle(self, worker_id: str, msg: wpb.WorkerMessage, frames: list) -> None:
        kind = msg.WhichOneof("body")
        if kind == "hello":
            await self._on_hello(worker_id, msg.hello)
        elif kind == "heartbeat":
            await self._on_heartbeat(worker_id, msg.heartbeat)
        elif kind == "result":
            self._on_result(worker_id, msg.result, frames)
        elif kind == "goodbye" and self._registry.get(worker_id) is not None:
            self.worker_lost(worker_id, f"it is shutting down ({peer(msg.goodbye.reason)})")

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
            self._jobs.evict()  # cheap: looks at the oldest finished job
            if self._jobs.store is not None:
                self._jobs.store.checkpoint_soon()
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
        if plan.phase is Phase.DENOISE:
            self.metrics.step(worker.model.name, result.elapsed_ms, len(plan.jobs))
        self._results.apply(worker_id, plan, result, frames)
