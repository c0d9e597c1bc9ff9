"""A job's lifecycle: its phases, the events that move it, and the one table of allowed moves.

    QUEUED ─ADMIT─► ENCODE ─DONE─► PREPARE ─DONE─► DENOISE ─STEP─► DENOISE … ─DONE─► DECODE ─DONE─► SAVE ─DONE─► SUCCEEDED
       any phase that is not terminal ─FAIL─► FAILED, ─CANCEL─► CANCELLED
       any running phase ─REQUEUE─► QUEUED (attempt + 1: its worker group was lost, or the
       scheduler restarted; it runs again from step 0)

ENCODE, PREPARE, DENOISE and DECODE run on the job's worker; SAVE runs on the scheduler. Two
events keep the phase: DISPATCH (the job is part of a command its worker is now running) and
CANCEL_LATER (a cancel arrived while the job is busy; it ends at the next step boundary).

`Job.advance` (jobs.py) is the only writer of a job's phase; this module holds the rules and the
mapping to the public API's JobState / Stage, and imports neither sockets nor torch.
"""

from __future__ import annotations

import enum

from diffserve.v1 import generation_pb2 as pb


class Phase(enum.Enum):
    QUEUED = "queued"
    ENCODE = "encode"
    PREPARE = "prepare"
    DENOISE = "denoise"
    DECODE = "decode"
    SAVE = "save"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    # Members are singletons: identity hashing, not Enum's hash of the name (a Python call on every
    # set / dict lookup of the hot path; bench/scheduler_capacity.py).
    __hash__ = object.__hash__

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def on_worker(self) -> bool:
        """The job's next command runs on its worker (it is resident there)."""
        return self in WORKER_PHASES

    @property
    def job_state(self) -> int:
        """The public diffserve.v1.JobState of a job in this phase."""
        return _JOB_STATE.get(self, pb.JOB_STATE_RUNNING)

    @property
    def stage(self) -> int:
        """The public diffserve.v1.Stage of a job in this phase (UNSPECIFIED unless running)."""
        return _STAGE.get(self, pb.STAGE_UNSPECIFIED)


class Event(enum.Enum):
    ADMIT = "admit"  # placed on a worker, which got Admit
    DISPATCH = "dispatch"  # part of the command its worker is now running
    STEP = "step"  # one denoising step returned; the last one also moves the job to DECODE
    DONE = "done"  # the phase's work returned (ENCODE, PREPARE, DECODE on the worker; SAVE here)
    CANCEL_LATER = "cancel_later"  # cancel requested while busy (in a command, or saving)
    CANCEL = "cancel"
    FAIL = "fail"
    REQUEUE = "requeue"  # back to the queue from a running phase, to start again from step 0

    __hash__ = object.__hash__  # as Phase


TERMINAL = frozenset({Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED})
WORKER_PHASES = frozenset({Phase.ENCODE, Phase.PREPARE, Phase.DENOISE, Phase.DECODE})
RUNNING = (Phase.ENCODE, Phase.PREPARE, Phase.DENOISE, Phase.DECODE, Phase.SAVE)

# Every allowed (phase, event) → next phase. Anything else raises IllegalTransition.
TRANSITIONS: dict[tuple[Phase, Event], Phase] = {
    (Phase.QUEUED, Event.ADMIT): Phase.ENCODE,
    (Phase.ENCODE, Event.DONE): Phase.PREPARE,
    (Phase.PREPARE, Event.DONE): Phase.DENOISE,
    (Phase.DENOISE, Event.STEP): Phase.DENOISE,
    (Phase.DENOISE, Event.DONE): Phase.DECODE,
    (Phase.DECODE, Event.DONE): Phase.SAVE,
    (Phase.SAVE, Event.DONE): Phase.SUCCEEDED,
    **{(phase, Event.DISPATCH): phase for phase in WORKER_PHASES},
    **{(phase, Event.CANCEL_LATER): phase for phase in RUNNING},
    **{(phase, Event.CANCEL): Phase.CANCELLED for phase in (Phase.QUEUED, *RUNNING)},
    **{(phase, Event.FAIL): Phase.FAILED for phase in (Phase.QUEUED, *RUNNING)},
    **{(phase, Event.REQUEUE): Phase.QUEUED for phase in RUNNING},
}

_JOB_STATE = {
    Phase.QUEUED: pb.JOB_STATE_QUEUED,
    Phase.SUCCEEDED: pb.JOB_STATE_SUCCEEDED,
    Phase.FAILED: pb.JOB_STATE_FAILED,
    Phase.CANCELLED: pb.JOB_STATE_CANCELLED,
}
_STAGE = {
    Phase.ENCODE: pb.STAGE_ENCODE,
    Phase.PREPARE: pb.STAGE_PREPARE,
    Phase.DENOISE: pb.STAGE_DENOISE,
    Phase.DECODE: pb.STAGE_DECODE,
    Phase.SAVE: pb.STAGE_SAVE,
}


class IllegalTransition(RuntimeError):
    """An event that the job's phase does not allow: a bug in the engine, never a client error."""


def next_phase(phase: Phase, event: Event) -> Phase:
    try:
        return TRANSITIONS[(phase, event)]
    except KeyError:
        raise IllegalTransition(f"{event.name} is not allowed in phase {phase.name}") from None
