"""The worker's compute loop: runs scheduler commands against one pipeline.

Keeps every admitted request's state resident between commands; a command names requests by
id only. A failure of one request is returned as that request's status; the loop goes on.
A denoising command returns once its step is launched, not run (pipelined steps, step_fence.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback

import numpy as np
import torch
from google.rpc import code_pb2, status_pb2

from diffserve.v1 import generation_pb2 as pb
from diffserve.worker.v1 import worker_pb2 as wpb

from diffserve.worker.connection import Leave, SchedulerConnection
from diffserve.worker.parallel import ParallelState
from diffserve.worker.parallel.cfg import split_rows
from diffserve.worker.pipelines.base import Pipeline, RequestState
from diffserve.worker.stage_lane import StageLane
from diffserve.worker.step_fence import StepFence
from diffserve.worker.step_trace import StepTrace, SyncDebug

log = logging.getLogger(__name__)


def error_status(exc: BaseException) -> status_pb2.Status:
    if isinstance(exc, torch.OutOfMemoryError):
        return status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=f"out of device memory: {exc}")
    if isinstance(exc, ValueError):
        return status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=str(exc))
    return status_pb2.Status(code=code_pb2.INTERNAL, message=f"{type(exc).__name__}: {exc}")


def device_memory(device) -> tuple[int, int]:
    """(allocated, reserved) bytes of torch's CUDA caching allocator on `device`; (0, 0) on the CPU
    or before CUDA is initialised. Safe from another thread: it reads the allocator's counters and
    names the device (no current-device lookup, which is per thread)."""
    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_initialized():
        return 0, 0
    index = torch.device(device).index
    index = 0 if index is None else index
    return torch.cuda.memory_allocated(index), torch.cuda.memory_reserved(index)


class Runtime:
    """Owns the resident request states and the counters the heartbeat reports."""

    def __init__(self, pipeline: Pipeline, parallel: ParallelState | None = None):
        self.pipeline = pipeline
        self.parallel = parallel or ParallelState.single()
        # The cfg row split, applied once around the pipeline's single forward hook (a no-op
        # without a cfg axis): each cfg rank runs its share of every step's rows.
        pipeline.forward = split_rows(self.parallel, pipeline.forward, batched=pipeline.forward_batched)
        self.states: dict[str, RequestState] = {}
        self.admit_errors: dict[str, status_pb2.Status] = {}
        self.counters = pb.WorkerStatus()
        self.group_broken = False
        device = getattr(pipeline, "device", None)
        self.fence = StepFence(device)  # pipelined steps: see step_fence.py
        self.trace = StepTrace.from_env(device)  # bench instruments, off unless set (step_trace.py)
        self.sync_debug = SyncDebug.from_env(device) or contextlib.nullcontext()
        self.stage_lane: StageLane | None = None

    def status(self) -> pb.WorkerStatus:
        """The heartbeat's status (called on the connection's I/O thread, once a second)."""
        status = pb.WorkerStatus()
        status.CopyFrom(self.counters)
        status.resident_jobs = len(self.states)
        status.gpu_memory_allocated_bytes, status.gpu_memory_reserved_bytes = device_memory(getattr(self.pipeline, "device", None))
        return status

    def start_stage_lane(self, conn: SchedulerConnection) -> None:
        """Stages run beside the steps from now on (one-GPU workers; stage_lane.py)."""
        def reply(command_id, elapsed_ms, results, frames):
            conn.send(wpb.WorkerMessage(result=wpb.Result(command_id=command_id, elapsed_ms=elapsed_ms, requests=results)), frames)

        self.stage_lane = StageLane(self.run_stage, reply, self.states.get, getattr(self.pipeline, "device", None))

    def serve(self, conn: SchedulerConnection | None) -> None:
        """Runs commands until Shutdown. Rank 0 takes them from the scheduler connection and
        broadcasts each to the other ranks, which pass conn=None and only follow. When rank 0 is
        asked to leave (conn.leave, on SIGTERM) it says Goodbye after the command it was running
        and the group shuts down."""
        parallel = self.parallel
        while True:
            if conn is not None:
                command = conn.commands.get()
                if isinstance(command, Leave):
                    log.info("leaving (%s): saying goodbye to the scheduler", command.reason)
                    conn.goodbye(command.reason)
                    command = wpb.Command(shutdown=wpb.Shutdown())
                if parallel.distributed:
                    parallel.broadcast_bytes(command.SerializeToString())
            else:
                command = wpb.Command.FromString(parallel.broadcast_bytes(None))
            kind = command.WhichOneof("body")
            if kind == "shutdown":
                log.info("shutdown requested")
                if self.stage_lane is not None:
                    self.stage_lane.close()
                return
            self.free(command.finished_ids)  # vLLM's finished_req_ids: freed before the body runs
            if kind == "run_stage" and self.stage_lane is not None:
                self.stage_lane.submit(command)
            elif kind == "admit":
                self.admit(command.admit)
            elif kind == "free":
                self.free(command.free.request_ids)
            elif kind == "free_all":
                self.free(list(self.states) + list(self.admit_errors))
            elif kind in ("run_stage", "denoise_step"):
                started = time.perf_counter()
                results, frames = self.run_stage(command.run_stage) if kind == "run_stage" else self.denoise(command.denoise_step)
                elapsed_ms = (time.perf_counter() - started) * 1e3
                if conn is not None:
                    result = wpb.Result(command_id=command.id, elapsed_ms=elapsed_ms, requests=results)
                    conn.send(wpb.WorkerMessage(result=result), frames)
                if self.group_broken:
                    log.error("leaving: the worker group is broken")
                    if conn is not None:
                        conn.stop()  # flushes the Result above before the process exits
                    raise SystemExit(1)

    def admit(self, admit: wpb.Admit) -> None:
        try:
            state = self.pipeline.admit(admit.request_id, admit.request)
            self.states[admit.request_id] = state
        except Exception as exc:
            log.exception("admitting %s failed", admit.request_id)
            self.admit_errors[admit.request_id] = error_status(exc)

    def free(self, request_ids) -> None:
        for rid in request_ids:
            self.states.pop(rid, None)
            self.admit_errors.pop(rid, None)

    def _state(self, request_id: str) -> RequestState:
        if request_id in self.admit_errors:
            raise _Refused(self.admit_errors[request_id])
        state = self.states.get(request_id)
        if state is None:
            raise _Refused(status_pb2.Status(code=code_pb2.NOT_FOUND, message=f"request {request_id} is not resident on this worker"))
        return state

    def run_stage(self, cmd: wpb.RunStage) -> tuple[list[wpb.RequestResult], list]:
        """One stage for each request of the command: an ENCODE of several runs the pipeline's
        `encode_batch` (one text-encoder call), falling back to one request at a time if that fails,
        so each request gets its own error; the other stages run one request at a time."""
        results = {rid: wpb.RequestResult(request_id=rid) for rid in cmd.request_ids}
        frames: list = []
        states = []
        for rid in cmd.request_ids:
            try:
                states.append(self._state(rid))
            except _Refused as exc:
                results[rid].status.CopyFrom(exc.status)
        batch = getattr(self.pipeline, "encode_batch", None) if cmd.stage == wpb.WORKER_STAGE_ENCODE else None
        if batch is not None and len(states) > 1:
            try:
                batch(states)
                states = []
            except Exception:
                log.warning("encoding %d requests at once failed; encoding them one at a time:\n%s", len(states), traceback.format_exc())
        for state in states:
            result = results[state.request_id]
            try:
                self._stage_one(cmd.stage, state, result, frames)
            except Exception as exc:
                stage = wpb.WorkerStage.Name(cmd.stage) if cmd.stage in wpb.WorkerStage.values() else cmd.stage
                log.error("stage %s of %s failed:\n%s", stage, state.request_id, traceback.format_exc())
                result.status.CopyFrom(error_status(exc))
        return list(results.values()), frames

    def _stage_one(self, stage: int, state: RequestState, result: wpb.RequestResult, frames: list) -> None:
        if stage == wpb.WORKER_STAGE_ENCODE:
            self.pipeline.encode(state)
        elif stage == wpb.WORKER_STAGE_PREPARE:
            self.pipeline.prepare(state)
        elif stage == wpb.WORKER_STAGE_DECODE and self.parallel.rank != 0:
            if self.pipeline.capabilities.decodes_on_every_rank:
                self.pipeline.decode(state)  # its share of a parallel decode; rank 0 answers
        elif stage == wpb.WORKER_STAGE_DECODE:
            video = np.ascontiguousarray(self.pipeline.decode(state), dtype=np.uint8)
            result.frames.CopyFrom(wpb.Tensor(dtype="uint8", shape=video.shape, frame=len(frames)))
            frames.append(memoryview(video).cast("B"))
        else:
            raise ValueError(f"unknown stage {stage}")

    def denoise(self, cmd: wpb.DenoiseStep) -> tuple[list[wpb.RequestResult], list]:
        results = {e.request_id: wpb.RequestResult(request_id=e.request_id) for e in cmd.entries}
        runnable: list[RequestState] = []
        for entry in cmd.entries:
            try:
                state = self._state(entry.request_id)
                if entry.step_index != state.step or state.latents is None:
                    raise _Refused(status_pb2.Status(code=code_pb2.FAILED_PRECONDITION, message=f"asked for step {entry.step_index}, request is at step {state.step}"))
                runnable.append(state)
            except _Refused as exc:
                results[entry.request_id].status.CopyFrom(exc.status)
        if runnable:
            try:
                self.fence.before_launch()
                if self.trace is not None:
                    self.trace.before_step()
                with self.sync_debug:
                    rows = self.pipeline.denoise_step(runnable)
                self.fence.launched()
                if self.trace is not None:
                    self.trace.after_step()
                self.counters.step_commands += 1
                self.counters.batched_step_commands += int(len(runnable) > 1)
                self.counters.denoise_rows += rows
            except Exception as exc:
                log.error("denoising step failed for %d requests:\n%s", len(runnable), traceback.format_exc())
                status = error_status(exc)
                if self.parallel.distributed and isinstance(exc, RuntimeError) and not isinstance(exc, torch.OutOfMemoryError):
                    # A failed collective leaves the group unusable: answer, then exit so the
                    # launcher restarts the whole group.
                    status.message = f"the worker group lost a rank during the step ({exc})"
                    self.group_broken = True
                for state in runnable:
                    results[state.request_id].status.CopyFrom(status)
        return list(results.values()), []


class _Refused(Exception):
    def __init__(self, status: status_pb2.Status):
        super().__init__(status.message)
        self.status = status
