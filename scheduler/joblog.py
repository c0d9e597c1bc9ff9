"""The scheduler's job log: one INFO line per job event that matters, and the JSON log format.

Lines (logger `diffserve.scheduler.joblog`), each with `extra` fields job_id, principal and
job_event for the JSON format:

    job 3f2a… submitted by alice: model wan size 832x480x33 steps 30 priority 0
    job 3f2a… started on worker local-0 (attempt 1) after 0.012 s in the queue
    job 3f2a… restarted (attempt 2): worker local-0 lost: ...
    job 3f2a… succeeded: queue wait 0.012 s, run 4.210 s, total 4.222 s
    job 3f2a… failed: INTERNAL: ... (queue wait ..., run ..., total ...)
    job 3f2a… cancelled: CANCELLED: ... (queue wait ..., run ..., total ...)

`submitted` is called by JobTable.add (a new job, once it is stored); `changed` by Job.advance
after every phase change, never on the denoising steps (which keep the phase). Imports nothing
heavy (no torch, no sockets).
"""

from __future__ import annotations

import logging

from google.rpc import code_pb2

from diffserve.scheduler.lifecycle import Event, Phase
from diffserve.worker.v1 import logformat

log = logging.getLogger(__name__)

# The LogRecord attributes the JSON format writes when a line carries them (`extra=`).
FIELDS = ("job_id", "principal", "job_event", "model", "worker", "attempt", "reason", "code",
          "queue_wait_s", "run_s", "total_s")


def _seconds(ts) -> float | None:
    return None if ts is None else ts.seconds + ts.nanos / 1e9


def _size(params) -> str:
    size = f"{params.width}x{params.height}"
    return f"{size}x{params.num_frames}" if params.num_frames > 1 else size


def _code_name(code: int) -> str:
    try:
        return code_pb2.Code.Name(code)
    except ValueError:
        return str(code)


def submitted(job) -> None:
    """A new job was accepted (and is on disk, with a store)."""
    if not log.isEnabledFor(logging.INFO):
        return
    p = job.params
    log.info("job %s submitted by %s: model %s size %s steps %d priority %d", job.id, job.principal, p.model, _size(p),
             p.num_inference_steps, job.priority,
             extra={"job_id": job.id, "principal": job.principal, "job_event": "submitted", "model": p.model})


def changed(job, before: Phase, event: Event) -> None:
    """After `job.advance(event)` moved the job from `before` (or recorded a cancel that waits)."""
    if not log.isEnabledFor(logging.INFO):
        return
    base = {"job_id": job.id, "principal": job.principal}
    created, started, ended = _seconds(job.created), _seconds(job.started), _seconds(job.ended)
    if event is Event.ADMIT:
        wait = started - created
        log.info("job %s started on worker %s (attempt %d) after %.3f s in the queue", job.id, job.worker_id, job.attempt, wait,
                 extra={**base, "job_event": "started", "worker": job.worker_id, "attempt": job.attempt, "queue_wait_s": round(wait, 6)})
    elif event is Event.REQUEUE:
        last = job.events[-1] if job.events else None
        reason = last.restarted.reason if last is not None and last.WhichOneof("event") == "restarted" else ""
        log.info("job %s restarted (attempt %d): %s", job.id, job.attempt, reason or "no reason given",
                 extra={**base, "job_event": "restarted", "attempt": job.attempt, "reason": reason})
    elif event is Event.CANCEL_LATER and not job.phase.terminal:
        log.info("job %s cancel requested: it ends at the next step boundary", job.id, extra={**base, "job_event": "cancel_requested"})
    elif job.phase.terminal:
        total = ended - created
        run = ended - started if started is not None else None
        wait = total - run if run is not None else total
        durations = f"queue wait {wait:.3f} s, run {run:.3f} s, total {total:.3f} s" if run is not None else f"queue wait {wait:.3f} s, never started, total {total:.3f} s"
        fields = {**base, "job_event": job.phase.value, "attempt": job.attempt, "queue_wait_s": round(wait, 6), "total_s": round(total, 6)}
        if run is not None:
            fields["run_s"] = round(run, 6)
        if job.phase is Phase.SUCCEEDED:
            log.info("job %s succeeded: %s", job.id, durations, extra=fields)
        else:
            code = _code_name(job.error.code) if job.error is not None else "UNKNOWN"
            message = job.error.message if job.error is not None else ""
            fields["code"], fields["reason"] = code, message
            log.info("job %s %s: %s: %s (%s)", job.id, job.phase.value, code, message, durations, extra=fields)


class JsonFormatter(logformat.JsonFormatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, and the job fields
    (FIELDS) of the lines that carry them; `exc` holds a traceback (diffserve.worker.v1.logformat)."""

    def __init__(self):
        super().__init__(FIELDS)


TEXT_FORMAT = logformat.text_format("scheduler")


def configure(level: str, fmt: str = "text") -> None:
    """The scheduler process's logging: `text` (as before) or `json` (JsonFormatter) on stderr."""
    logformat.configure("scheduler", level, fmt, fields=FIELDS)
