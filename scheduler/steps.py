"""The step loop's dispatch half: policy → one command per idle worker, and its bookkeeping.

Contract:
- `dispatch(worker)` asks the policy for the worker's next plan and sends it as one command
  (RunStage for a stage, DenoiseStep for a step), carrying in `finished_ids` every job that left
  the worker since its last command. Each job of the plan gets DISPATCH. With no plan, pending
  frees go out as one `Free` (see docs/decisions.md: the worker is idle, so no command would
  carry them soon). Returns False when the worker's socket is gone.
- `complete(worker, command_id)` returns the plan of a command whose Result arrived and marks
  the worker idle; None for a command it does not know (stale: its worker was declared lost)
  and for a Result from any worker but the one the command was sent to. Only the right
  worker's Result removes the command: a peer guessing command ids cannot take one away.
- `forget(worker_id)` drops the commands of a lost worker, so their late Results are ignored.
At most one compute command is in flight per worker; a worker whose Hello says
`concurrent_stages` has two lanes, one for stages (RunStage) and one for denoising steps, and
may have one command in flight on each: an arriving job's encode and a finished job's decode run
beside the batch's steps instead of between them. The policy's fair share (policy.FairShare)
is charged with each command's time as measured here, from send to Result.

With DIFFSERVE_DISPATCH_TRACE=FILE (bench/scheduler_capacity.py) the loop measures its dispatch
latency: from the moment the Result that left a worker idle was received to the moment its next
command was handed to the socket. Off by default (nothing is timed).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from diffserve.worker.v1 import worker_pb2 as wpb

from diffserve.scheduler.lifecycle import Event, Phase
from diffserve.scheduler.jobs import Job
from diffserve.scheduler.policy import FairShare, Packing, Plan
from diffserve.scheduler.registry import WorkerHandle
from diffserve.scheduler.requests import worker_stage

if TYPE_CHECKING:  # the link is the only part that needs sockets; unit tests pass a fake
    from diffserve.scheduler.workers import WorkerLink


class DispatchTrace:
    """Dispatch latency samples (seconds), appended to `path` once a second as JSON lines
    {"t": wall time, "gaps_s": [...]}: a benchmark's instrument, not a production metric."""

    FLUSH_S = 1.0

    def __init__(self, path: str):
        self.path = path
        self._ready: dict[str, float] = {}
        self._gaps: list[float] = []
        self._flushed = time.monotonic()

    @classmethod
    def from_env(cls) -> DispatchTrace | None:
        path = os.environ.get("DIFFSERVE_DISPATCH_TRACE", "")
        return cls(path) if path else None

    def ready(self, worker_id: str, received: float) -> None:
        """A Result received at `received` (time.perf_counter) left the worker idle."""
        self._ready[worker_id] = received

    def sent(self, worker_id: str, command: bool) -> None:
        """The worker's next command (command=True) was sent, or it has none to run."""
        received = self._ready.pop(worker_id, None)
        if received is not None and command:
            self._gaps.append(time.perf_counter() - received)
        now = time.monotonic()
        if now - self._flushed >= self.FLUSH_S:
            self._flushed = now
            if self._gaps:
                with open(self.path, "a") as f:
                    f.write(json.dumps({"t": time.time(), "gaps_s": self._gaps}) + "\n")
                self._gaps = []


def latent_tokens(card: wpb.ModelCard) -> Callable[[Job], int]:
    """A job's latent tokens on this model (what a packed step's budget counts): latent frames times
    the height and width over the card's size multiple (the VAE's scale times the patch)."""
    multiple, frame_step = max(1, card.limits.size_multiple), max(1, card.limits.frame_step)

    def tokens(job: Job) -> int:
        height, width, frames = job.shape_key
        return ((frames - 1) // frame_step + 1) * (height // multiple) * (width // multiple)

    return tokens


ONE_LANE, STEP_LANE, STAGE_LANE = "one", "step", "stage"


class StepLoop:
    """Owns the commands in flight (command id → worker id and plan)."""

    def __init__(self, link: WorkerLink, max_batch_size: int, pack_tokens: int = 0):
        self.link = link
        self.max_batch_size = max_batch_size
        self.pack_tokens = pack_tokens
        self.policy = FairShare()
        self._commands: dict[int, tuple[str, Plan, float, str]] = {}  # id -> (worker id, plan, sent at, lane)
        self.trace = DispatchTrace.from_env()

    async def dispatch(self, worker: WorkerHandle) -> bool:
        max_batch = min(self.max_batch_size, worker.hello.max_batch_size or 1)
        packing = None
        if self.pack_tokens > 0 and worker.hello.card.packs_mixed_shapes:
            packing = Packing(latent_tokens(worker.hello.card), self.pack_tokens)
        if worker.concurrent_stages:  # a stage lane beside the step lane; each takes its own kind
            lanes = ([STAGE_LANE] if not worker.stage_in_flight else []) + ([STEP_LANE] if not worker.in_flight else [])
        else:
            lanes = [ONE_LANE] if not worker.in_flight else []
        sent_any = False
        for lane in lanes:
            plan = self.policy.next_plan(worker.id, worker.jobs.values(), max_batch, packing, stages=lane != STEP_LANE, steps=lane != STAGE_LANE)
            if plan is None:
                continue
            if not await self._send(worker, plan, lane):
                return False
            sent_any = True
        if self.trace is not None:
            self.trace.sent(worker.id, sent_any)
        if not sent_any:
            finished = worker.take_finished()
            if finished:
                return await self.link.send(worker.id, wpb.Command(free=wpb.Free(request_ids=finished)))
        return True

    async def _send(self, worker: WorkerHandle, plan: Plan, lane: str) -> bool:
        command = wpb.Command(id=self.link.next_command_id(), finished_ids=worker.take_finished())
        if plan.phase is Phase.DENOISE:
            entries = command.denoise_step.entries
            for job in plan.jobs:
                entries.add(request_id=job.id, step_index=job.step)
        else:
            command.run_stage.request_ids.extend(job.id for job in plan.jobs)
            command.run_stage.stage = worker_stage(plan.stage)
        for job in plan.jobs:
            job.advance(Event.DISPATCH)
        if lane == STAGE_LANE:
            worker.stage_in_flight = command.id
        else:
            worker.in_flight = command.id
        self._commands[command.id] = (worker.id, plan, time.monotonic(), lane)
        return await self.link.send(worker.id, command)

    def complete(self, worker: WorkerHandle | None, command_id: int) -> Plan | None:
        entry = self._commands.get(command_id)
        if entry is None or worker is None or entry[0] != worker.id:
            return None
        lane = entry[3]
        if (worker.stage_in_flight if lane == STAGE_LANE else worker.in_flight) != command_id:
            return None
        del self._commands[command_id]
        if lane == STAGE_LANE:
            worker.stage_in_flight = 0
        else:
            worker.in_flight = 0
        self.policy.charge(worker.id, entry[1], time.monotonic() - entry[2], latent_tokens(worker.hello.card))
        return entry[1]

    def forget(self, worker_id: str) -> None:
        for command_id in [c for c, entry in self._commands.items() if entry[0] == worker_id]:
            del self._commands[command_id]
        self.policy.forget(worker_id)
