"""The scheduler's job log (scheduler/joblog.py): one INFO line per job event that matters —
submitted, started, restarted, succeeded / failed / cancelled with durations — none per step,
and the JSON format's lines parse with their job fields.

Imports neither torch nor sockets: jobs are driven through Job.advance directly.
"""

from __future__ import annotations

import json
import logging

import pytest

from diffserve.scheduler import joblog
from diffserve.scheduler.errors import cancelled, internal
from diffserve.scheduler.jobs import Job, JobTable
from diffserve.scheduler.lifecycle import Event, Phase
from diffserve.v1 import generation_pb2 as pb

STEPS = 4
LOGGER = "diffserve.scheduler.joblog"


pytestmark = pytest.mark.usefixtures("event_loop_for_jobs")  # tests/conftest.py


def new_job(table: JobTable) -> Job:
    job = Job(params=pb.GenerationParams(model="tiny-wan", prompt="x", height=48, width=64, num_frames=5, num_inference_steps=STEPS),
              principal="alice", priority=3)
    table.add(job)
    return job


def run_to_denoise(job: Job, worker: str) -> None:
    job.advance(Event.ADMIT, worker_id=worker)
    for _ in range(2):  # ENCODE, PREPARE
        job.advance(Event.DISPATCH)
        job.advance(Event.DONE)


def job_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER]


def test_a_life_with_a_restart_logs_one_line_per_event_that_matters(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    job = new_job(JobTable())
    run_to_denoise(job, "local-0")
    job.advance(Event.DISPATCH)
    job.advance(Event.STEP, step_ms=5.0, batch_jobs=1)
    job.advance(Event.REQUEUE, reason="worker local-0 lost: exited with code 1")
    run_to_denoise(job, "local-1")
    for _ in range(STEPS):
        job.advance(Event.DISPATCH)
        job.advance(Event.STEP, step_ms=5.0, batch_jobs=1)
    job.advance(Event.DISPATCH)
    job.advance(Event.DONE)  # DECODE → SAVE
    job.advance(Event.DONE, artifact=pb.Artifact(id="a"))

    records = job_lines(caplog)
    assert [r.job_event for r in records] == ["submitted", "started", "restarted", "started", "succeeded"]  # none per step
    assert all(r.levelno == logging.INFO and r.job_id == job.id and r.principal == "alice" for r in records)
    messages = [r.getMessage() for r in records]
    assert messages[0] == f"job {job.id} submitted by alice: model tiny-wan size 64x48x5 steps {STEPS} priority 3"
    assert messages[1].startswith(f"job {job.id} started on worker local-0 (attempt 1) after ") and messages[1].endswith(" s in the queue")
    assert messages[2] == f"job {job.id} restarted (attempt 2): worker local-0 lost: exited with code 1"
    assert "worker local-1 (attempt 2)" in messages[3]
    assert messages[4].startswith(f"job {job.id} succeeded: queue wait ") and ", run " in messages[4] and ", total " in messages[4]
    done = records[4]
    assert done.queue_wait_s >= 0 and done.run_s >= 0 and done.total_s == pytest.approx(done.queue_wait_s + done.run_s, abs=1e-5)


def test_failed_and_cancelled_lines_carry_the_code_and_message(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    table = JobTable()
    failing, waiting, queued = new_job(table), new_job(table), new_job(table)
    run_to_denoise(failing, "local-0")
    failing.advance(Event.DISPATCH)
    failing.advance(Event.FAIL, status=internal("the worker raised: boom"))
    run_to_denoise(waiting, "local-0")
    waiting.advance(Event.DISPATCH)
    waiting.advance(Event.CANCEL_LATER, status=cancelled("by the test"))
    waiting.advance(Event.STEP, step_ms=1.0, batch_jobs=1)
    waiting.advance(Event.CANCEL)
    queued.advance(Event.CANCEL, status=cancelled())

    last = {}
    for r in job_lines(caplog):
        last[r.job_id] = r
    f, w, q = last[failing.id], last[waiting.id], last[queued.id]
    assert (f.job_event, f.code, f.reason) == ("failed", "INTERNAL", "the worker raised: boom")
    assert f.getMessage().startswith(f"job {failing.id} failed: INTERNAL: the worker raised: boom (queue wait ")
    assert (w.job_event, w.code, w.reason) == ("cancelled", "CANCELLED", "by the test")
    assert any(r.job_event == "cancel_requested" and r.job_id == waiting.id for r in job_lines(caplog))
    assert q.job_event == "cancelled" and "never started" in q.getMessage() and not hasattr(q, "run_s")
    assert q.queue_wait_s == q.total_s


def test_no_lines_above_info(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    job = new_job(JobTable())
    run_to_denoise(job, "local-0")
    job.advance(Event.FAIL, status=internal("boom"))
    assert job_lines(caplog) == []


def test_the_json_format_writes_one_object_per_line_with_the_job_fields(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    job = new_job(JobTable())
    run_to_denoise(job, "local-0")
    job.advance(Event.FAIL, status=internal("boom"))
    formatter = joblog.JsonFormatter()
    lines = [formatter.format(r) for r in job_lines(caplog)]
    assert all("\n" not in line for line in lines)
    objects = [json.loads(line) for line in lines]
    assert [o["job_event"] for o in objects] == ["submitted", "started", "failed"]
    for o in objects:
        assert {"time", "level", "logger", "message", "job_id", "principal"} <= o.keys()
        assert (o["level"], o["logger"], o["job_id"], o["principal"]) == ("INFO", LOGGER, job.id, "alice")
        assert o["time"].endswith("+00:00")
    assert objects[1]["worker"] == "local-0" and objects[2]["code"] == "INTERNAL" and "run_s" in objects[2]

    # A line about no job has no job fields; a traceback goes in "exc", still on one line.
    other = logging.getLogger("diffserve.scheduler.engine")
    try:
        raise ValueError("bad")
    except ValueError:
        record = other.makeRecord(other.name, logging.ERROR, __file__, 1, "worker %s lost", ("w1",), exc_info=__import__("sys").exc_info())
    plain = json.loads(formatter.format(record))
    assert plain["message"] == "worker w1 lost" and plain["level"] == "ERROR" and "job_id" not in plain
    assert "ValueError: bad" in plain["exc"]


def test_serve_takes_log_format():
    import argparse

    from diffserve.scheduler.app import add_serve_flags

    parser = argparse.ArgumentParser()
    add_serve_flags(parser)
    assert parser.parse_args([]).log_format == "text"
    assert parser.parse_args(["--log-format", "json"]).log_format == "json"
    with pytest.raises(SystemExit):
        parser.parse_args(["--log-format", "xml"])
