"""The scheduler's engine: job table, bounded queue, worker registry and the step loop.

The loop is thin, as in vLLM's engine core: on every wake-up it admits queued jobs to workers
with room, asks the policy for each idle worker's next command, and sends it. Results update
the jobs and wake the loop again. One compute command is in flight per worker group; each
denoising step is one command carrying only request ids and step indices.

All methods run on the event loop thread; nothing here blocks or imports torch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from google.rpc import status_pb2

from diffserve.v1 import generation_pb2 as pb
from diffserve.worker.v1 import worker_pb2 as wpb

from diffserve.scheduler import errors
from diffserve.scheduler.artifacts import ArtifactStore
from diffserve.scheduler.jobs import Job, JobTable, Pending, now_timestamp
from diffserve.scheduler.policy import Plan, next_plan
from diffserve.scheduler.cards import public_model
from diffserve.scheduler.requests import worker_request, worker_stage
from diffserve.scheduler.validation import resolve_params
from diffserve.scheduler.workers import PROTOCOL_VERSION, WorkerHandle, WorkerLink, tensor_to_numpy

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    max_queue: int = 256  # queued (not yet admitted) jobs; more → RESOURCE_EXHAUSTED
    max_batch_size: int = 4  # jobs per denoising step command
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 5.0
    retry_after_s: float = 5.0  # RetryInfo sent with RESOURCE_EXHAUSTED


class Engine:
    """Owns every job's state and drives the workers; the gRPC service is a thin layer on top."""

    def __init__(self, config: EngineConfig, link: WorkerLink, artifacts: ArtifactStore):
        self.config = config
        self.link = link
        self.artifacts = artifacts
        self.jobs = JobTable()
        self.queue: deque[Job] = deque()
        self.workers: dict[str, WorkerHandle] = {}
        self.models: dict[str, pb.Model] = {}  # last card seen per model name, kept while no worker serves it
        self.accepting = True
        self.on_serving_change: Callable[[dict[str, bool]], None] = lambda serving: None
        self._commands: dict[int, tuple[str, Plan]] = {}
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    # ---- requests from the service ----

    def submit(self, params: pb.GenerationParams, client_request_id: str = "", timeout_s: float | None = None) -> tuple[Job, bool]:
        """Validates and queues a job; returns (job, created). Raises errors.RequestError."""
        if client_request_id:
            existing = self.jobs.by_client_id(client_request_id)
            if existing is not None:
                return existing, False
        if not self.accepting:
            raise errors.RequestError(errors.unavailable("the server is shutting down", "SHUTTING_DOWN"))
        model = self._model_for(params.model)
        resolved = resolve_params(params, model)
        if len(self.queue) >= self.config.max_queue:
            raise errors.resource_exhausted(f"the queue is full ({self.config.max_queue} jobs waiting)", self.config.retry_after_s)
        job = Job(params=resolved, client_request_id=client_request_id)
        if timeout_s:
            job.deadline = time.monotonic() + timeout_s
        self.jobs.add(job)
        self.queue.append(job)
        job.emit(queued=pb.Queued(position=len(self.queue)))
        self.wake()
        return job, True

    def cancel(self, job: Job, status: status_pb2.Status) -> None:
        """Stops a job at the next step boundary and frees its state on the worker."""
        if job.done or job.cancel_status is not None:
            return
        if job.state == pb.JOB_STATE_QUEUED:
            self.queue.remove(job)
            job.finish(pb.JOB_STATE_CANCELLED, status)
            self._announce_positions()
        elif job.pending is Pending.NONE:
            self._end(job, pb.JOB_STATE_CANCELLED, status)
        else:  # in a running command or being saved: ends when that returns
            job.cancel_status = status
        self.wake()

    def queue_position(self, job: Job) -> int:
        if job.state != pb.JOB_STATE_QUEUED:
            return 0
        return self.queue.index(job) + 1

    def list_models(self) -> list[pb.Model]:
        out = []
        for name, card in sorted(self.models.items()):
            model = pb.Model()
            model.CopyFrom(card)
            live = [w for w in self.workers.values() if w.alive and w.model.name == name]
            model.state = pb.SERVING_STATE_SERVING if live else pb.SERVING_STATE_NOT_SERVING
            model.workers.extend(w.public_status() for w in self.workers.values() if w.model.name == name)
            out.append(model)
        return out

    def serving(self) -> dict[str, bool]:
        return {name: any(w.alive and w.model.name == name for w in self.workers.values()) for name in self.models}

    def wake(self) -> None:
        self._wake.set()

    # ---- loops ----

    async def run(self) -> None:
        await asyncio.gather(self._receive_loop(), self._step_loop(), self._timer_loop())

    async def _step_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._admit()
            for worker in list(self.workers.values()):
                if worker.idle:
                    await self._dispatch(worker)

    async def _receive_loop(self) -> None:
        while True:
            worker_id, msg, frames = await self.link.recv()
            kind = msg.WhichOneof("body")
            if kind == "hello":
                await self._on_hello(worker_id, msg.hello)
            elif kind == "heartbeat":
                await self._on_heartbeat(worker_id, msg.heartbeat)
            elif kind == "result":
                self._on_result(worker_id, msg.result, frames)
            self.wake()

    async def _timer_loop(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            now = time.monotonic()
            for job in self.jobs:
                if not job.done and job.deadline is not None and now > job.deadline:
                    self.cancel(job, errors.deadline_exceeded())
            for worker in list(self.workers.values()):
                if worker.alive and now - worker.last_seen > self.config.heartbeat_timeout_s:
                    self.worker_lost(worker.id, f"no heartbeat for {now - worker.last_seen:.1f} s")

    # ---- workers ----

    async def _on_hello(self, worker_id: str, hello: wpb.Hello) -> None:
        if hello.protocol_version != PROTOCOL_VERSION:
            log.error("worker %s speaks protocol %d, we speak %d: ignored", worker_id, hello.protocol_version, PROTOCOL_VERSION)
            return
        if worker_id in self.workers:
            self.worker_lost(worker_id, "the worker restarted")
        self.workers[worker_id] = WorkerHandle(id=worker_id, hello=hello)
        self.models[hello.card.name] = public_model(hello.card)
        log.info("worker %s registered: model %s (%s), world size %d", worker_id, hello.card.name, hello.description, hello.world_size)
        welcome = wpb.Welcome(worker_id=worker_id, heartbeat_interval_s=self.config.heartbeat_interval_s)
        await self.link.send(worker_id, wpb.Command(welcome=welcome))
        self.on_serving_change(self.serving())

    async def _on_heartbeat(self, worker_id: str, beat: wpb.Heartbeat) -> None:
        worker = self.workers.get(worker_id)
        if worker is None or not worker.alive:
            # Unknown to us (we restarted, or declared it dead): ask it to say Hello again.
            await self.link.send(worker_id, wpb.Command(welcome=wpb.Welcome()))
            return
        worker.last_seen = time.monotonic()
        worker.status.CopyFrom(beat.status)

    def worker_lost(self, worker_id: str, reason: str) -> None:
        """Fails the jobs running on a worker that died or stopped answering."""
        worker = self.workers.pop(worker_id, None)
        if worker is None:
            return
        worker.alive = False
        log.error("worker %s lost: %s", worker_id, reason)
        for command_id in [c for c, (w, _) in self._commands.items() if w == worker_id]:
            del self._commands[command_id]
        status = errors.unavailable(f"worker {worker_id} serving {worker.model.name} was lost: {reason}", "WORKER_LOST")
        for job in list(worker.jobs.values()):
            if job.pending is Pending.SAVING:
                continue  # decoded already; the save finishes without the worker
            job.worker_id = None
            job.finish(pb.JOB_STATE_FAILED, status)
        worker.jobs.clear()
        self.on_serving_change(self.serving())
        self.wake()

    # ---- scheduling ----

    def _model_for(self, name: str) -> pb.Model:
        if not self.models:
            raise errors.RequestError(errors.unavailable("no model is loaded yet; retry when health is SERVING", "NO_MODEL"))
        if not name:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            raise errors.invalid_argument([("params.model", f"required when several models are served: {sorted(self.models)}")])
        if name not in self.models:
            raise errors.invalid_argument([("params.model", f"unknown model {name!r}; served: {sorted(self.models)}")])
        return self.models[name]

    async def _admit(self) -> None:
        admitted = False
        for job in list(self.queue):
            candidates = [w for w in self.workers.values() if w.has_room and w.model.name == job.params.model]
            if not candidates:
                continue
            worker = min(candidates, key=lambda w: len(w.jobs))
            self.queue.remove(job)
            job.state = pb.JOB_STATE_RUNNING
            job.started = now_timestamp()
            job.admitted_at = time.monotonic()
            job.worker_id = worker.id
            worker.jobs[job.id] = job
            # Awaited, not spawned: the worker must see Admit before the job's first stage command.
            admit = wpb.Admit(request_id=job.id, params=job.params, request=worker_request(job.params, self.models[job.params.model]))
            await self.link.send(worker.id, wpb.Command(admit=admit))
            admitted = True
        if admitted:
            self._announce_positions()

    def _announce_positions(self) -> None:
        for position, job in enumerate(self.queue, start=1):
            last = job.events[-1] if job.events else None
            if last is None or last.WhichOneof("event") != "queued" or last.queued.position != position:
                job.emit(queued=pb.Queued(position=position))

    async def _dispatch(self, worker: WorkerHandle) -> None:
        plan = next_plan(worker.jobs.values(), min(self.config.max_batch_size, worker.hello.max_batch_size or 1))
        if plan is None:
            return
        command = wpb.Command(id=self.link.next_command_id())
        if plan.stage == pb.STAGE_DENOISE:
            command.denoise_step.entries.extend(wpb.StepEntry(request_id=j.id, step_index=j.step) for j in plan.jobs)
        else:
            command.run_stage.request_id = plan.jobs[0].id
            command.run_stage.stage = worker_stage(plan.stage)
        for job in plan.jobs:
            job.pending = Pending.IN_FLIGHT
            if plan.stage != pb.STAGE_DENOISE or job.step == 0:
                job.emit(stage_started=pb.StageStarted(stage=plan.stage))
        worker.in_flight = command.id
        self._commands[command.id] = (worker.id, plan)
        if not await self.link.send(worker.id, command):
            self.worker_lost(worker.id, "its socket is gone")

    def _on_result(self, worker_id: str, result: wpb.Result, frames: list) -> None:
        entry = self._commands.pop(result.command_id, None)
        worker = self.workers.get(worker_id)
        if entry is None or worker is None:
            return  # stale: the worker was declared lost meanwhile
        worker.in_flight = 0
        _, plan = entry
        outcomes = {r.request_id: r for r in result.requests}
        for job in plan.jobs:
            job.pending = Pending.NONE
            outcome = outcomes.get(job.id)
            if job.done:
                continue
            if job.cancel_status is not None:
                self._end(job, pb.JOB_STATE_CANCELLED, job.cancel_status)
            elif outcome is None:
                self._end(job, pb.JOB_STATE_FAILED, errors.internal(f"worker {worker_id} returned no result for the job"))
            elif outcome.status.code != 0:
                self._end(job, pb.JOB_STATE_FAILED, outcome.status)
            else:
                self._advance(job, plan, outcome, frames, result.elapsed_ms)

    def _advance(self, job: Job, plan: Plan, outcome: wpb.RequestResult, frames: list, elapsed_ms: float) -> None:
        if plan.stage == pb.STAGE_ENCODE:
            job.next_stage = pb.STAGE_PREPARE
        elif plan.stage == pb.STAGE_PREPARE:
            job.next_stage = pb.STAGE_DENOISE
        elif plan.stage == pb.STAGE_DENOISE:
            job.step += 1
            job.emit(step_completed=pb.StepCompleted(step=job.step, total_steps=job.total_steps, step_ms=elapsed_ms, batch_jobs=len(plan.jobs)))
            if job.step >= job.total_steps:
                job.next_stage = pb.STAGE_DECODE
        elif plan.stage == pb.STAGE_DECODE:
            video = tensor_to_numpy(outcome.frames, frames)
            self._release(job)
            job.next_stage = pb.STAGE_SAVE
            job.pending = Pending.SAVING
            job.emit(stage_started=pb.StageStarted(stage=pb.STAGE_SAVE))
            self._spawn(self._save(job, video))

    async def _save(self, job: Job, video) -> None:
        try:
            job.artifact = await asyncio.get_running_loop().run_in_executor(None, self.artifacts.save, job.id, video, job.params)
        except Exception as exc:  # disk full, encoder missing: this job fails, the server goes on
            log.exception("saving the artifact of job %s failed", job.id)
            job.finish(pb.JOB_STATE_FAILED, errors.internal(f"saving the artifact failed: {exc}", "ARTIFACT_SAVE_FAILED"))
            return
        if job.cancel_status is not None:
            self.artifacts.delete(job.artifact)
            job.artifact = None
            job.finish(pb.JOB_STATE_CANCELLED, job.cancel_status)
        else:
            job.finish(pb.JOB_STATE_SUCCEEDED)

    def _end(self, job: Job, state: int, status: status_pb2.Status) -> None:
        self._release(job)
        job.finish(state, status)

    def _release(self, job: Job) -> None:
        """Drops the job from its worker and tells the worker to free its state."""
        worker = self.workers.get(job.worker_id) if job.worker_id else None
        job.worker_id = None
        if worker is not None:
            worker.jobs.pop(job.id, None)
            self._spawn(self.link.send(worker.id, wpb.Command(free=wpb.Free(request_ids=[job.id]))))

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- shutdown ----

    def busy(self) -> bool:
        return bool(self.queue) or any(not j.done for j in self.jobs if j.state == pb.JOB_STATE_RUNNING)

    async def shutdown_workers(self) -> None:
        for worker in list(self.workers.values()):
            await self.link.send(worker.id, wpb.Command(shutdown=wpb.Shutdown()))
