"""Prometheus metrics of one scheduler: its own CollectorRegistry, served as an ASGI app at /metrics.

Two kinds of metric, chosen by how often they change:

- State now (jobs by phase, queue depth, worker groups up, GPU memory, step and row counters the
  workers report) is read from the engine when Prometheus scrapes (`_EngineCollector`): nothing is
  kept up to date on the way.
- Events (jobs submitted and finished, failures by reason, requeues, queue wait and end-to-end
  times, worker groups lost, artifact bytes) are counted when a job changes phase: the job table
  calls `submitted(job)` and `changed(job, before, event)` beside its job log (jobs.py), a few
  times per job; the engine calls `worker_lost` and `step` (per step command).
- The step hot path (`step`, once per denoising step command) does a few integer adds into plain
  accumulators (`_Steps`), turned into histograms and counters only when scraped; no lock, no
  label lookup (everything runs on the event loop, the scrape included).

Every metric is named `diffserve_*` in base units (seconds, bytes) with low-cardinality labels:
`model` (a registered model's name), `phase` / `outcome` / `reason` (fixed sets; failure reasons
are the ErrorInfo reason or the google.rpc code name, sanitised and capped), `worker` (a worker
group's id: one per group). Never a job id, a principal or a prompt. The metrics list with each
one's meaning is in docs/http.md ("Metrics").

A registry per scheduler, not prometheus_client's global one: two servers (or tests) in one
process keep apart. Imports neither torch nor sockets.
"""

from __future__ import annotations

import bisect
import math
import re
import time
from collections.abc import Iterable

from google.rpc import code_pb2, error_details_pb2
from prometheus_client import CollectorRegistry, Counter, Histogram, make_asgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from diffserve.scheduler.lifecycle import Event, Phase

# End-to-end and queue-wait times: from a fraction of a second (a tiny image) to an hour (a long
# video behind a deep queue).
JOB_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)
# One denoising step command: a millisecond (tiny models, the simulated worker) to half a minute
# (a large video on one GPU).
STEP_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Jobs per step command (bounded by --max-batch-size).
BATCH_JOBS_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)

ACTIVE_PHASES = (Phase.QUEUED, Phase.ENCODE, Phase.PREPARE, Phase.DENOISE, Phase.DECODE, Phase.SAVE)
OUTCOMES = (Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED)

# Failure reasons come from statuses a worker may have written: only short upper-case words count,
# and at most MAX_REASONS of them per scheduler (then "OTHER"), so a peer cannot grow the series.
_REASON = re.compile(r"^[A-Z][A-Z0-9_]{0,47}$")
MAX_REASONS = 64

# Why a worker group was lost, from engine.worker_lost's reason text (a fixed set).
LOST_REASONS = (
    ("no heartbeat", "heartbeat_timeout"),
    ("it sent a malformed message", "malformed_message"),
    ("it is shutting down", "goodbye"),
    ("the worker restarted", "reregistered"),
    ("its socket is gone", "socket_gone"),
    ("worker process", "process_exited"),
)


def lost_reason(reason: str) -> str:
    """The label of a worker group's loss ("other" for a reason not in LOST_REASONS)."""
    for prefix, label in LOST_REASONS:
        if reason.startswith(prefix):
            return label
    return "other"


def _seconds(ts) -> float | None:
    return None if ts is None else ts.seconds + ts.nanos / 1e9


class _Histogram:
    """A histogram's buckets as plain integers (observe: one bisect, two adds)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Iterable[float]):
        self.bounds = (*bounds, math.inf)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # le: a value on a bound counts in it
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, count in zip(self.bounds, self.counts):
            total += count
            out.append(("+Inf" if bound == math.inf else repr(float(bound)), total))
        return out


class _Steps:
    """One model's step commands: how many, their time, their jobs."""

    __slots__ = ("commands", "seconds", "jobs")

    def __init__(self) -> None:
        self.commands = 0
        self.seconds = _Histogram(STEP_SECONDS_BUCKETS)
        self.jobs = _Histogram(BATCH_JOBS_BUCKETS)


class Metrics:
    """Owns one scheduler's registry, its event metrics, and the collector of its state now.

    `watch(engine)` names the engine whose state is read at scrape time (engine.Engine does it);
    `local_workers` (launcher.LocalWorkers, set by server.py) adds the restarts of local groups."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.engine = None
        self.local_workers = None
        self._steps: dict[str, _Steps] = {}
        self._requeued_at: dict[str, float] = {}  # job id -> time.monotonic() it went back to the queue
        self._reasons: set[str] = set()
        r = self.registry
        self.submitted_total = Counter("diffserve_jobs_submitted", "Jobs accepted (new jobs, not idempotent repeats).", ["model"], registry=r)
        self.finished_total = Counter("diffserve_jobs_finished", "Jobs that ended, by outcome: succeeded, failed, cancelled.",
                                      ["model", "outcome"], registry=r)
        self.failures_total = Counter("diffserve_job_failures", "Failed jobs by reason: the error's ErrorInfo reason "
                                      "(WORKER_LOST, ARTIFACT_SAVE_FAILED, ...) or its google.rpc code name.", ["model", "reason"], registry=r)
        self.requeues_total = Counter("diffserve_job_requeues", "Jobs put back in the queue to run again from step 0 "
                                      "(their worker group was lost, or the scheduler restarted).", ["model"], registry=r)
        self.queue_wait = Histogram("diffserve_job_queue_wait_seconds", "Time from submission (or requeue) to placement on a worker group.",
                                    ["model"], buckets=JOB_SECONDS_BUCKETS, registry=r)
        self.duration = Histogram("diffserve_job_duration_seconds", "End-to-end time of finished jobs, submission to end, by outcome.",
                                  ["model", "outcome"], buckets=JOB_SECONDS_BUCKETS, registry=r)
        self.workers_lost_total = Counter("diffserve_worker_groups_lost", "Worker groups declared lost, by reason: heartbeat_timeout, "
                                          "process_exited, goodbye, malformed_message, reregistered, socket_gone, other.",
                                          ["model", "reason"], registry=r)
        self.artifact_bytes_total = Counter("diffserve_artifact_written_bytes", "Bytes of the artifacts of succeeded jobs written to the artifact store.",
                                            ["model"], registry=r)
        r.register(_EngineCollector(self))
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ...

    def watch(self, engine) -> None:
        self.engine = engine

    def asgi_app(self) -> MetricsApp:
        """The ASGI app serving the exposition format at /metrics."""
        return MetricsApp(self.registry)

    # ---- events (the job table, beside joblog) ----

    def submitted(self, job) -> None:
        self.submitted_total.labels(job.params.model).inc()

    def changed(self, job, before: Phase, event: Event) -> None:
        """After job.advance moved the job from `before` (never called for the denoising steps)."""
        model = job.params.model
        phase = job.phase
        if event is Event.ADMIT:
            queued_at = self._requeued_at.pop(job.id, None)
            if queued_at is not None:
                wait = time.monotonic() - queued_at
            else:
                wait = _seconds(job.started) - _seconds(job.created)
            self.queue_wait.labels(model).observe(max(0.0, wait))
        elif event is Event.REQUEUE:
            self.requeues_total.labels(model).inc()
            self._requeued_at[job.id] = time.monotonic()
        elif phase.terminal and not before.terminal:
            self._requeued_at.pop(job.id, None)
            outcome = phase.value
            self.finished_total.labels(model, outcome).inc()
            created, ended = _seconds(job.created), _seconds(job.ended)
            if created is not None and ended is not None:
                self.duration.labels(model, outcome).observe(max(0.0, ended - created))
            if phase is Phase.FAILED:
                self.failures_total.labels(model, self.reason(job.error)).inc()
            elif phase is Phase.SUCCEEDED and job.artifact is not None:
                self.artifact_bytes_total.labels(model).inc(max(0, job.artifact.size_bytes))

    def reason(self, status) -> str:
        """A failure's reason label: its ErrorInfo reason, else its code's name; "OTHER" past the cap."""
        reason = ""
        if status is not None:
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    reason = info.reason
                    break
            if not reason:
                try:
                    reason = code_pb2.Code.Name(status.code)
                except ValueError:
                    reason = ""
        if not _REASON.match(reason):
            return "UNKNOWN"
        if reason not in self._reasons:
            if len(self._reasons) >= MAX_REASONS:
                return "OTHER"
            self._reasons.add(reason)
        return reason

    # ---- the engine ----

    def step(self, model: str, elapsed_ms: float, jobs: int) -> None:
        """A denoising step command returned (its worker's wall time, its jobs). The hot path."""
        steps = self._steps.get(model)
        if steps is None:
            steps = self._steps[model] = _Steps()
        steps.commands += 1
        steps.jobs.observe(jobs)
        if 0.0 <= elapsed_ms < 1e9:  # a worker's number: NaN, negative or absurd ones are not timed
            steps.seconds.observe(elapsed_ms / 1000.0)

    def worker_lost(self, model: str, reason: str) -> None:
        self.workers_lost_total.labels(model, lost_reason(reason)).inc()


class _EngineCollector(Collector):
    """The engine's state at scrape time (runs on the event loop, like everything that changes it)."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self):
        return []  # names vary with the models served: not checked at registration

    def collect(self):
        metrics = self.metrics
        engine = metrics.engine
        steps = metrics._steps
        commands = CounterMetricFamily("diffserve_step_commands", "Denoising step commands that returned (rate(): commands per second).", labels=["model"])
        step_s = HistogramMetricFamily("diffserve_step_duration_seconds", "Worker wall time of one denoising step command "
                                       "(all its jobs; the step_ms of StepCompleted events).", labels=["model"])
        batch = HistogramMetricFamily("diffserve_step_batch_jobs", "Jobs per denoising step command (batch size).", labels=["model"])
        for model, s in sorted(steps.items()):
            commands.add_metric([model], s.commands)
            step_s.add_metric([model], s.seconds.cumulative(), s.seconds.sum)
            batch.add_metric([model], s.jobs.cumulative(), s.jobs.sum)
        yield from (commands, step_s, batch)
        if engine is None:
            return
        models = sorted(engine.serving())
        by_phase = {(m, p): 0 for m in models for p in ACTIVE_PHASES}
        for job in engine.list_jobs():
            if not job.phase.terminal:
                key = (job.params.model, job.phase)
                by_phase[key] = by_phase.get(key, 0) + 1
        jobs = GaugeMetricFamily("diffserve_jobs", "Jobs not yet finished, by phase: queued, encode, prepare, denoise, decode, save.",
                                 labels=["model", "phase"])
        for (model, phase), n in sorted(by_phase.items(), key=lambda kv: (kv[0][0], ACTIVE_PHASES.index(kv[0][1]))):
            jobs.add_metric([model, phase.value], n)
        yield jobs
        depth = GaugeMetricFamily("diffserve_queue_depth", "Jobs waiting in the queue for a worker group.", labels=["model"])
        for model in sorted({m for m, _ in by_phase}):
            depth.add_metric([model], by_phase.get((model, Phase.QUEUED), 0))
        yield depth
        yield GaugeMetricFamily("diffserve_queue_limit", "Queued jobs beyond which submits are refused (--max-queue).",
                                value=engine.config.max_queue)
        yield GaugeMetricFamily("diffserve_accepting_jobs", "1 while new jobs are accepted, 0 while draining.", value=int(engine.accepting))

        workers = engine.workers()
        up = GaugeMetricFamily("diffserve_worker_groups_up", "Registered worker groups that are alive.", labels=["model"])
        alive = {m: 0 for m in models}
        for w in workers:
            if w.alive:
                alive[w.model.name] = alive.get(w.model.name, 0) + 1
        for model, n in sorted(alive.items()):
            up.add_metric([model], n)
        yield up
        labels = ["worker", "model"]
        resident = GaugeMetricFamily("diffserve_worker_resident_jobs", "Jobs whose state a worker group holds now.", labels=labels)
        allocated = GaugeMetricFamily("diffserve_worker_gpu_memory_allocated_bytes",
                                      "GPU memory held by tensors on the group's rank 0 (torch's allocator; heartbeat; 0 on the CPU).", labels=labels)
        reserved = GaugeMetricFamily("diffserve_worker_gpu_memory_reserved_bytes",
                                     "GPU memory reserved by torch's caching allocator on the group's rank 0 (heartbeat; 0 on the CPU).", labels=labels)
        rows = CounterMetricFamily("diffserve_worker_denoise_rows", "Transformer rows (one per job, two with CFG) the group ran "
                                   "in step commands since it started (heartbeat).", labels=labels)
        worker_steps = CounterMetricFamily("diffserve_worker_step_commands", "Step commands the group ran since it started (heartbeat).",
                                           labels=labels)
        for w in sorted(workers, key=lambda w: w.id):
            if not w.alive:
                continue
            key, status = [w.id, w.model.name], w.status
            resident.add_metric(key, len(w.jobs))
            allocated.add_metric(key, status.gpu_memory_allocated_bytes)
            reserved.add_metric(key, status.gpu_memory_reserved_bytes)
            rows.add_metric(key, status.denoise_rows)
            worker_steps.add_metric(key, status.step_commands)
        yield from (resident, allocated, reserved, rows, worker_steps)
        local = metrics.local_workers
        if local is not None:
            restarts = CounterMetricFamily("diffserve_worker_group_restarts", "Local worker groups started again after their process exited.",
                                           labels=["worker"])
            for worker_id, n in sorted(local.restarts.items()):
                restarts.add_metric([worker_id], n)
            yield restarts


class MetricsApp:
    """ASGI app serving the registry at exactly /metrics (GET, HEAD); 404 elsewhere, 405 for other
    methods. A class, not a function: Starlette's Route serves a class instance as an ASGI app
    (http/app.py adds it as the /metrics route; `serve --metrics-port` serves it alone)."""

    def __init__(self, registry: CollectorRegistry):
        self._app = make_asgi_app(registry)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        status = 404 if scope["path"].rstrip("/") != "/metrics" else 405 if scope["method"] not in ("GET", "HEAD") else 0
        if not status:
            await self._app(scope, receive, send)
            return
        body = b"not found: Prometheus metrics are at /metrics\n" if status == 404 else b"method not allowed: GET /metrics\n"
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
        if status == 405:
            headers.append((b"allow", b"GET, HEAD"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
