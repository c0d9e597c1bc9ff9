"""A job's lifecycle: every allowed transition of lifecycle.TRANSITIONS, every other one refused,
the guards that the table cannot express, and the public JobState / Stage / events they imply.

Imports neither torch nor sockets.
"""

from __future__ import annotations

import itertools

import pytest

from diffserve.scheduler.errors import cancelled, internal
from diffserve.scheduler.jobs import Job
from diffserve.scheduler.lifecycle import RUNNING, TERMINAL, TRANSITIONS, WORKER_PHASES, Event, IllegalTransition, Phase
from diffserve.v1 import generation_pb2 as pb

STEPS = 3


pytestmark = pytest.mark.usefixtures("event_loop_for_jobs")  # tests/conftest.py


def job_in(phase: Phase, *, in_flight: bool = False, step: int = 0) -> Job:
    """A job placed in `phase` directly (test setup only; the engine moves jobs with advance)."""
    job = Job(params=pb.GenerationParams(prompt="x", height=32, width=32, num_frames=1, num_inference_steps=STEPS))
    job.phase, job.in_flight, job.step = phase, in_flight, step
    if phase is not Phase.QUEUED and not phase.terminal and phase is not Phase.SAVE:
        job.worker_id = "w"
    return job


def satisfying_guards(phase: Phase, event: Event) -> Job:
    """A job in `phase` for which `event` is allowed by the guards beside the table."""
    if event is Event.DISPATCH:
        return job_in(phase)
    if event is Event.CANCEL_LATER:
        return job_in(phase, in_flight=phase.on_worker)
    if event is Event.DONE and phase is Phase.DENOISE:
        return job_in(phase, in_flight=True, step=STEPS)
    if event in (Event.STEP, Event.DONE) and phase.on_worker:
        return job_in(phase, in_flight=True)
    return job_in(phase)


def kwargs_for(event: Event) -> dict:
    if event is Event.ADMIT:
        return {"worker_id": "w"}
    if event in (Event.CANCEL, Event.CANCEL_LATER):
        return {"status": cancelled()}
    if event is Event.FAIL:
        return {"status": internal("boom")}
    if event is Event.DONE:
        return {"artifact": pb.Artifact(id="a")}
    return {}


@pytest.mark.parametrize("phase,event", sorted(TRANSITIONS, key=lambda k: (k[0].value, k[1].value)),
                         ids=lambda x: x.name)
def test_every_allowed_transition(phase, event):
    job = satisfying_guards(phase, event)
    assert job.advance(event, **kwargs_for(event)) is TRANSITIONS[(phase, event)]
    assert job.phase is TRANSITIONS[(phase, event)]


FORBIDDEN = [(p, e) for p, e in itertools.product(Phase, Event) if (p, e) not in TRANSITIONS]


@pytest.mark.parametrize("phase,event", FORBIDDEN, ids=lambda x: x.name)
def test_every_other_transition_raises_and_changes_nothing(phase, event):
    job = satisfying_guards(phase, event)
    before = (job.phase, job.step, job.in_flight, job.worker_id, len(job.events))
    with pytest.raises(IllegalTransition):
        job.advance(event, **kwargs_for(event))
    assert (job.phase, job.step, job.in_flight, job.worker_id, len(job.events)) == before


def test_terminal_phases_allow_nothing():
    assert not [k for k in TRANSITIONS if k[0] in TERMINAL]


@pytest.mark.parametrize("job,event", [
    (job_in(Phase.ENCODE, in_flight=True), Event.DISPATCH),  # already in a command
    (job_in(Phase.DENOISE), Event.CANCEL_LATER),  # between commands: cancel now instead
    (job_in(Phase.ENCODE), Event.DONE),  # a result for a job in no command
    (job_in(Phase.DENOISE), Event.STEP),
    (job_in(Phase.DENOISE, in_flight=True, step=1), Event.DONE),  # steps left
], ids=["dispatch-twice", "cancel-later-idle", "done-not-dispatched", "step-not-dispatched", "denoise-done-early"])
def test_guards_beside_the_table(job, event):
    with pytest.raises(IllegalTransition):
        job.advance(event, **kwargs_for(event))


def test_phase_maps_to_public_state_and_stage_in_one_place():
    expected = {
        Phase.QUEUED: (pb.JOB_STATE_QUEUED, pb.STAGE_UNSPECIFIED),
        Phase.ENCODE: (pb.JOB_STATE_RUNNING, pb.STAGE_ENCODE),
        Phase.PREPARE: (pb.JOB_STATE_RUNNING, pb.STAGE_PREPARE),
        Phase.DENOISE: (pb.JOB_STATE_RUNNING, pb.STAGE_DENOISE),
        Phase.DECODE: (pb.JOB_STATE_RUNNING, pb.STAGE_DECODE),
        Phase.SAVE: (pb.JOB_STATE_RUNNING, pb.STAGE_SAVE),
        Phase.SUCCEEDED: (pb.JOB_STATE_SUCCEEDED, pb.STAGE_UNSPECIFIED),
        Phase.FAILED: (pb.JOB_STATE_FAILED, pb.STAGE_UNSPECIFIED),
        Phase.CANCELLED: (pb.JOB_STATE_CANCELLED, pb.STAGE_UNSPECIFIED),
    }
    assert set(expected) == set(Phase)
    for phase, (state, stage) in expected.items():
        job = job_in(phase)
        proto = job.to_proto()
        assert (job.state, proto.state, proto.stage) == (state, state, stage), phase
        assert job.done == (phase in TERMINAL)
    assert set(RUNNING) == WORKER_PHASES | {Phase.SAVE}


def test_a_whole_life_emits_the_public_events():
    job = job_in(Phase.QUEUED)
    job.advance(Event.ADMIT, worker_id="w1")
    assert job.worker_id == "w1" and job.started is not None
    for _ in range(2):  # ENCODE, PREPARE
        job.advance(Event.DISPATCH)
        job.advance(Event.DONE)
    for _ in range(STEPS):
        job.advance(Event.DISPATCH)
        job.advance(Event.STEP, step_ms=5.0, batch_jobs=2)
    assert job.phase is Phase.DECODE and job.step == STEPS
    job.advance(Event.DISPATCH)
    job.advance(Event.DONE)
    assert job.phase is Phase.SAVE and job.worker_id is None and job.busy
    job.advance(Event.DONE, artifact=pb.Artifact(id="a"))
    assert job.phase is Phase.SUCCEEDED and job.error is None and job.ended is not None
    kinds = [(e.WhichOneof("event"), e.stage_started.stage if e.HasField("stage_started") else e.step_completed.step)
             for e in job.events]
    assert kinds == [
        ("stage_started", pb.STAGE_ENCODE), ("stage_started", pb.STAGE_PREPARE), ("stage_started", pb.STAGE_DENOISE),
        *[("step_completed", s) for s in range(1, STEPS + 1)],
        ("stage_started", pb.STAGE_DECODE), ("stage_started", pb.STAGE_SAVE), ("completed", 0),
    ]
    assert job.events[-1].completed.artifact.id == "a"
    assert [e.sequence for e in job.events] == list(range(1, len(job.events) + 1))
    step = job.events[3].step_completed
    assert (step.total_steps, step.step_ms, step.batch_jobs) == (STEPS, 5.0, 2)


def test_cancel_at_the_step_boundary_keeps_the_recorded_status():
    job = job_in(Phase.DENOISE, in_flight=True, step=1)
    status = cancelled("by the test")
    assert job.advance(Event.CANCEL_LATER, status=status) is Phase.DENOISE
    assert job.cancel_status == status and job.in_flight and not job.done
    assert job.advance(Event.CANCEL) is Phase.CANCELLED
    assert job.error == status and not job.in_flight and job.worker_id is None
    assert job.events[-1].cancelled.status == status


def test_failure_ends_a_job_in_flight():
    job = job_in(Phase.DECODE, in_flight=True)
    job.advance(Event.FAIL, status=internal("boom"))
    assert job.phase is Phase.FAILED and job.state == pb.JOB_STATE_FAILED and not job.in_flight
    assert job.events[-1].failed.status.message == "boom"
