"""The worker registry: which worker groups are registered, what they serve, and where a job goes.

Contract:
- `register(worker_id, hello)` adds a worker (`compatible` checks its protocol first) and
  remembers its model card; `remove(worker_id)` drops it. A card outlives its workers, so a
  model whose workers are all gone is still listed (NOT_SERVING) and still validates requests.
- The first card registered for a model name is its contract for the scheduler's lifetime:
  `refusal(hello, max_message_bytes)` names why a Hello may not register (a card that differs
  from the contract in any field, so a worker cannot raise the limits requests are validated
  against; or a card whose largest output exceeds the message size cap). None = it may.
- `place(job)` picks the live worker serving the job's model with room for one more resident
  job, the least loaded first; None when there is none (the job stays queued).
- `model_for(name)` resolves a request's model name (empty = the only one) or raises a
  RequestError naming `params.model`.
A worker is alive from its Hello until it misses heartbeats for `heartbeat_timeout_s`, its local
process exits or a send to it fails. Pure state: no sockets, no job transitions. Replicas and
routing by load land here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from google.protobuf.message import Message

from diffserve.v1 import generation_pb2 as pb
from diffserve.worker.v1 import worker_pb2 as wpb

from diffserve.scheduler import errors
from diffserve.scheduler.cards import public_model
from diffserve.scheduler.jobs import Job
from diffserve.scheduler.wire import peer

log = logging.getLogger(__name__)

PROTOCOL_VERSION = wpb.PROTOCOL_VERSION_3


@dataclass(eq=False)
class WorkerHandle:
    """What the scheduler knows of one worker group (its rank 0): the jobs resident on it, the
    command it is running, and the ids it must still be told to free."""

    id: str  # ZeroMQ routing id
    hello: wpb.Hello
    alive: bool = True
    last_seen: float = field(default_factory=time.monotonic)
    in_flight: int = 0  # id of the compute command it is running, 0 when idle (its denoising step, with concurrent stages)
    stage_in_flight: int = 0  # with concurrent stages: id of the RunStage on its stage lane, 0 when free
    status: pb.WorkerStatus = field(default_factory=pb.WorkerStatus)
    jobs: dict = field(default_factory=dict)  # job id -> Job admitted to this worker
    finished: list[str] = field(default_factory=list)  # ids that left it; freed by its next command
    lost_soon: bool = False  # a send to it failed: declared lost shortly (engine._socket_gone)

    @property
    def model(self) -> wpb.ModelCard:
        return self.hello.card

    @property
    def concurrent_stages(self) -> bool:
        return self.hello.concurrent_stages

    @property
    def idle(self) -> bool:
        """It can take a command now: its (step) lane is free, or its stage lane is."""
        return self.alive and not self.lost_soon and (not self.in_flight or (self.hello.concurrent_stages and not self.stage_in_flight))

    @property
    def has_room(self) -> bool:
        return self.alive and not self.lost_soon and len(self.jobs) < self.hello.max_resident

    def admit(self, job) -> None:
        """The job's state now lives on this worker (it was sent Admit)."""
        self.jobs[job.id] = job

    def release(self, job_id: str) -> None:
        """The job left this worker: its state is freed with the next command (or a Free)."""
        if self.jobs.pop(job_id, None) is not None:
            self.finished.append(job_id)

    def take_finished(self) -> list[str]:
        finished, self.finished = self.finished, []
        return finished

    def public_status(self) -> pb.WorkerStatus:
        status = pb.WorkerStatus()
        status.CopyFrom(self.status)
        status.id = self.id
        status.alive = self.alive
        return status



class WorkerRegistry:
    """Owns the registered workers (by ZeroMQ id) and the first model card seen per model name."""

    def __init__(self) -> None:
        self._workers: dict[str, WorkerHandle] = {}
        self._models: dict[str, pb.Model] = {}  # public card per model name, kept while no worker serves it
        self._contracts: dict[str, wpb.ModelCard] = {}  # first card registered per model name

    def compatible(self, worker_id: str, hello: wpb.Hello) -> bool:
        """False (and a log line) for a worker that speaks another protocol version: ignore it."""
        if hello.protocol_version != PROTOCOL_VERSION:
            log.error("worker %s speaks protocol %d, we speak %d: ignored", peer(worker_id), hello.protocol_version, PROTOCOL_VERSION)
            return False
        return True

    def refusal(self, hello: wpb.Hello, max_message_bytes: int) -> str | None:
        card = hello.card
        contract = self._contracts.get(card.name)
        if contract is not None and card != contract:
            return f"its card for model {peer(card.name)} differs from the one registered first ({card_diff(contract, card)})"
        largest = max(1, card.limits.max_num_frames) * min(card.limits.max_height * card.limits.max_width, card.limits.max_pixels or 2**62) * 3
        if largest > max_message_bytes:
            return f"its largest output ({largest} bytes) exceeds the worker message cap ({max_message_bytes} bytes; --max-worker-message-bytes)"
        return None

    def register(self, worker_id: str, hello: wpb.Hello) -> WorkerHandle:
        """Adds a compatible worker whose card has no `refusal`. The caller has removed an earlier
        registration under its id."""
        model = public_model(hello.card)  # first: a card that does not convert registers nothing
        worker = WorkerHandle(id=worker_id, hello=hello)
        self._workers[worker_id] = worker
        if hello.card.name not in self._contracts:
            self._contracts[hello.card.name] = hello.card
            self._models[hello.card.name] = model
        log.info("worker %s registered: model %s (%s), world size %d", peer(worker_id), peer(hello.card.name), peer(hello.description), hello.world_size)
        return worker

    def remove(self, worker_id: str) -> WorkerHandle | None:
        worker = self._workers.pop(worker_id, None)
        if worker is not None:
            worker.alive = False
        return worker

    def get(self, worker_id: str | None) -> WorkerHandle | None:
        return self._workers.get(worker_id) if worker_id else None

    def __iter__(self):
        return iter(list(self._workers.values()))

    def idle(self) -> list[WorkerHandle]:
        return [w for w in self._workers.values() if w.idle]

    def any_alive(self) -> bool:
        return any(w.alive for w in self._workers.values())

    def any_room(self) -> bool:
        """Some live worker can take one more resident job (of its model)."""
        return any(w.has_room for w in self._workers.values())

    def place(self, job: Job) -> WorkerHandle | None:
        candidates = [w for w in self._workers.values() if w.has_room and w.model.name == job.params.model]
        return min(candidates, key=lambda w: len(w.jobs)) if candidates else None

    def model(self, name: str) -> pb.Model:
        """The card of a model seen before (the job's params.model is resolved already)."""
        return self._models[name]

    def model_for(self, name: str) -> pb.Model:
        if not self._models:
            raise errors.RequestError(errors.unavailable("no model is loaded yet; retry when health is SERVING", "NO_MODEL"))
        if not name:
            if len(self._models) == 1:
                return next(iter(self._models.values()))
            raise errors.invalid_argument([("params.model", f"required when several models are served: {sorted(self._models)}")])
        if name not in self._models:
            raise errors.invalid_argument([("params.model", f"unknown model {name!r}; served: {sorted(self._models)}")])
        return self._models[name]

    def list_models(self) -> list[pb.Model]:
        out = []
        for name, card in sorted(self._models.items()):
            model = pb.Model()
            model.CopyFrom(card)
            live = [w for w in self._workers.values() if w.alive and w.model.name == name]
            model.state = pb.SERVING_STATE_SERVING if live else pb.SERVING_STATE_NOT_SERVING
            model.workers.extend(w.public_status() for w in self._workers.values() if w.model.name == name)
            out.append(model)
        return out

    def serving(self) -> dict[str, bool]:
        return {name: any(w.alive and w.model.name == name for w in self._workers.values()) for name in self._models}


def card_diff(contract: wpb.ModelCard, card: wpb.ModelCard, limit: int = 4) -> str:
    """The first fields where `card` differs from `contract`, e.g. 'limits.max_num_inference_steps 1000 -> 1000000000'."""
    out: list[str] = []

    def walk(a, b, prefix: str) -> None:
        for field_ in a.DESCRIPTOR.fields:
            x, y = getattr(a, field_.name), getattr(b, field_.name)
            if isinstance(x, Message):
                walk(x, y, f"{prefix}{field_.name}.")
            elif x != y:
                out.append(f"{prefix}{field_.name} {peer(x)} -> {peer(y)}")

    walk(contract, card, "")
    return ", ".join(out[:limit]) + (", ..." if len(out) > limit else "") if out else "unknown fields"
