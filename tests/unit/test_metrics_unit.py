"""Prometheus metrics (scheduler/metrics.py) without sockets: the real engine driven by the scripted
worker of test_engine_unit, its registry read through prometheus_client's own parser. Names and
labels follow Prometheus conventions; counters and histograms move as a job runs, fails, is
requeued; gauges read the engine's state at scrape time; failure reasons cannot grow without bound;
the ASGI app answers /metrics only.
"""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace

from google.rpc import code_pb2, status_pb2
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from diffserve.scheduler import errors
from diffserve.scheduler.jobs import Job
from diffserve.scheduler.lifecycle import Phase
from diffserve.scheduler.metrics import MAX_REASONS, Metrics, lost_reason
from diffserve.v1 import generation_pb2 as pb
from diffserve.worker.v1 import worker_pb2 as wpb
from tests.unit.test_engine_unit import MODEL, PARAMS, Harness, run, until


def scrape(metrics: Metrics) -> dict:
    """{(sample name, frozenset(labels)): value} of one scrape."""
    text = generate_latest(metrics.registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_names_units_and_labels_follow_the_conventions(tmp_path):
    async def main():
        async with Harness(tmp_path) as h:
            await h.register()
            job, _ = h.engine.submit(PARAMS)
            await h.run_through(1, 5)
            await until(lambda: job.done, "the job")
            h.engine.metrics.worker_lost("m", "no heartbeat for 6.0 s")
            text = generate_latest(h.engine.metrics.registry).decode()
            families = list(text_string_to_metric_families(text))
            ours = [f for f in families if not f.name.startswith("process_")]
            assert ours and all(f.name.startswith("diffserve_") for f in ours)
            for family in ours:
                if family.type == "counter":
                    assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
                if family.type == "histogram":
                    assert family.name.endswith(("_seconds", "_jobs")), family.name
                for s in family.samples:
                    assert not {"job", "job_id", "id", "prompt", "principal"} & set(s.labels), (family.name, s.labels)
                    assert set(s.labels) <= {"model", "phase", "outcome", "reason", "worker", "le"}, (family.name, s.labels)
            assert job.id not in text

    run(main())


def test_a_job_moves_the_counters_and_histograms(tmp_path):
    async def main():
        async with Harness(tmp_path) as h:
            await h.register()
            status = pb.WorkerStatus(resident_jobs=0, step_commands=7, denoise_rows=14,
                                     gpu_memory_allocated_bytes=3 << 30, gpu_memory_reserved_bytes=4 << 30)
            await h.link.inbox.put(("w1", wpb.WorkerMessage(heartbeat=wpb.Heartbeat(sequence=1, status=status)), []))
            await until(lambda: h.engine.workers()[0].status.step_commands == 7, "the heartbeat")
            before = scrape(h.engine.metrics)
            assert value(before, "diffserve_worker_groups_up", model="m") == 1
            assert value(before, "diffserve_worker_gpu_memory_allocated_bytes", worker="w1", model="m") == 3 << 30
            assert value(before, "diffserve_worker_gpu_memory_reserved_bytes", worker="w1", model="m") == 4 << 30
            assert value(before, "diffserve_worker_denoise_rows_total", worker="w1", model="m") == 14
            assert value(before, "diffserve_worker_step_commands_total", worker="w1", model="m") == 7
            assert value(before, "diffserve_jobs", model="m", phase="queued") == 0
            assert value(before, "diffserve_queue_depth", model="m") == 0
            assert value(before, "diffserve_queue_limit") == h.engine.config.max_queue
            assert value(before, "diffserve_accepting_jobs") == 1
            assert value(before, "diffserve_step_commands_total", model="m") is None  # no step yet: no series

            job, _ = h.engine.submit(PARAMS)
            assert value(scrape(h.engine.metrics), "diffserve_jobs_submitted_total", model="m") == 1
            await h.run_through(1, 3)  # ENCODE, PREPARE, the first step
            await until(lambda: job.step == 1, "the first step")
            mid = scrape(h.engine.metrics)
            assert value(mid, "diffserve_jobs", model="m", phase="denoise") == 1
            assert value(mid, "diffserve_worker_resident_jobs", worker="w1", model="m") == 1
            assert value(mid, "diffserve_step_commands_total", model="m") == 1
            assert value(mid, "diffserve_job_queue_wait_seconds_count", model="m") == 1
            await h.run_through(4, 2)  # the second step, DECODE
            await until(lambda: job.done, "the job")
            after = scrape(h.engine.metrics)
            assert value(after, "diffserve_jobs_finished_total", model="m", outcome="succeeded") == 1
            assert value(after, "diffserve_step_commands_total", model="m") == PARAMS.num_inference_steps
            assert value(after, "diffserve_step_duration_seconds_count", model="m") == PARAMS.num_inference_steps
            assert math.isclose(value(after, "diffserve_step_duration_seconds_sum", model="m"), 0.002)  # elapsed_ms 1.0 each
            assert value(after, "diffserve_step_duration_seconds_bucket", model="m", le="0.001") == 2  # le: 1 ms counts in 0.001
            assert value(after, "diffserve_step_batch_jobs_sum", model="m") == 2
            assert value(after, "diffserve_step_batch_jobs_bucket", model="m", le="1.0") == 2
            assert value(after, "diffserve_job_duration_seconds_count", model="m", outcome="succeeded") == 1
            assert value(after, "diffserve_artifact_written_bytes_total", model="m") == job.artifact.size_bytes > 0
            assert value(after, "diffserve_jobs", model="m", phase="denoise") == 0
            assert value(after, "diffserve_jobs_finished_total", model="m", outcome="failed") is None

    run(main())


def test_failures_requeues_and_lost_groups(tmp_path):
    async def main():
        async with Harness(tmp_path, max_attempts=2) as h:
            await h.register()
            job, _ = h.engine.submit(PARAMS)
            await h.next_compute(1)
            h.engine.worker_lost("w1", "no heartbeat for 6.0 s")  # attempt 1 of 2: back to the queue
            assert job.phase is Phase.QUEUED
            await h.register("w2")
            await h.next_compute(2)
            h.engine.worker_lost("w2", "worker process 123 exited with code 1")  # attempt 2 of 2: fails
            assert job.phase is Phase.FAILED
            samples = scrape(h.engine.metrics)
            assert value(samples, "diffserve_job_requeues_total", model="m") == 1
            assert value(samples, "diffserve_job_queue_wait_seconds_count", model="m") == 2  # placed twice
            assert value(samples, "diffserve_worker_groups_lost_total", model="m", reason="heartbeat_timeout") == 1
            assert value(samples, "diffserve_worker_groups_lost_total", model="m", reason="process_exited") == 1
            assert value(samples, "diffserve_jobs_finished_total", model="m", outcome="failed") == 1
            assert value(samples, "diffserve_job_failures_total", model="m", reason="WORKER_LOST") == 1
            assert value(samples, "diffserve_worker_groups_up", model="m") == 0  # the model is still listed
            cancelled_job, _ = h.engine.submit(PARAMS)  # no worker: it stays queued
            samples = scrape(h.engine.metrics)
            assert value(samples, "diffserve_jobs", model="m", phase="queued") == 1
            assert value(samples, "diffserve_queue_depth", model="m") == 1
            h.engine.cancel(cancelled_job, errors.cancelled())
            samples = scrape(h.engine.metrics)
            assert value(samples, "diffserve_queue_depth", model="m") == 0
            assert value(samples, "diffserve_jobs_finished_total", model="m", outcome="cancelled") == 1
            h.engine.stop_accepting()
            assert value(scrape(h.engine.metrics), "diffserve_accepting_jobs") == 0

    run(main())


def test_failure_reasons_are_bounded():
    metrics = Metrics()
    assert metrics.reason(errors.internal("boom", "ARTIFACT_SAVE_FAILED")) == "ARTIFACT_SAVE_FAILED"
    assert metrics.reason(status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="out of device memory")) == "RESOURCE_EXHAUSTED"
    assert metrics.reason(errors.internal("x", "a prompt: with spaces")) == "UNKNOWN"  # a worker's free text is no label
    assert metrics.reason(status_pb2.Status(code=999)) == "UNKNOWN"
    assert metrics.reason(None) == "UNKNOWN"
    for i in range(MAX_REASONS + 10):
        metrics.reason(errors.internal("x", f"REASON_{i}"))
    assert metrics.reason(errors.internal("x", "ONE_MORE")) == "OTHER"
    assert metrics.reason(errors.internal("x", "ARTIFACT_SAVE_FAILED")) == "ARTIFACT_SAVE_FAILED"  # seen before: kept
    assert lost_reason("it is shutting down (SIGTERM)") == "goodbye" and lost_reason("anything else") == "other"


def test_a_bad_step_time_is_counted_not_timed():
    metrics = Metrics()
    metrics.step("m", float("nan"), 2)
    metrics.step("m", -5.0, 1)
    metrics.step("m", 20.0, 3)
    samples = scrape(metrics)
    assert value(samples, "diffserve_step_commands_total", model="m") == 3
    assert value(samples, "diffserve_step_duration_seconds_count", model="m") == 1
    assert value(samples, "diffserve_step_duration_seconds_sum", model="m") == 0.02
    assert value(samples, "diffserve_step_batch_jobs_count", model="m") == 3
    assert value(samples, "diffserve_step_batch_jobs_bucket", model="m", le="2.0") == 2


def test_each_scheduler_has_its_own_registry():
    a, b = Metrics(), Metrics()  # no "Duplicated timeseries" from a shared global registry
    a.step("m", 1.0, 1)
    assert value(scrape(a), "diffserve_step_commands_total", model="m") == 1
    assert value(scrape(b), "diffserve_step_commands_total", model="m") is None


def test_jobs_by_phase_read_at_scrape_time():
    """The collector counts unfinished jobs per model and phase, with zeros for every known model."""
    jobs = []
    for model, phase in (("a", Phase.QUEUED), ("a", Phase.QUEUED), ("a", Phase.DENOISE), ("b", Phase.SAVE), ("b", Phase.SUCCEEDED)):
        job = Job(params=pb.GenerationParams(model=model, num_inference_steps=2))
        job.phase = phase
        jobs.append(job)
    worker = SimpleNamespace(id="g0", alive=True, model=MODEL, jobs={}, status=pb.WorkerStatus(gpu_memory_allocated_bytes=5))
    engine = SimpleNamespace(serving=lambda: {"a": False, "b": True}, list_jobs=lambda: jobs, workers=lambda: [worker],
                             config=SimpleNamespace(max_queue=9), accepting=True)
    metrics = Metrics()
    metrics.watch(engine)
    metrics.local_workers = SimpleNamespace(restarts={"local-0": 2})
    samples = scrape(metrics)
    assert value(samples, "diffserve_jobs", model="a", phase="queued") == 2
    assert value(samples, "diffserve_jobs", model="a", phase="denoise") == 1
    assert value(samples, "diffserve_jobs", model="a", phase="save") == 0
    assert value(samples, "diffserve_jobs", model="b", phase="save") == 1
    assert value(samples, "diffserve_jobs", model="b", phase="succeeded") is None  # finished jobs are counters
    assert value(samples, "diffserve_queue_depth", model="a") == 2 and value(samples, "diffserve_queue_depth", model="b") == 0
    assert value(samples, "diffserve_worker_groups_up", model="m") == 1 and value(samples, "diffserve_worker_groups_up", model="a") == 0
    assert value(samples, "diffserve_worker_gpu_memory_allocated_bytes", worker="g0", model="m") == 5
    assert value(samples, "diffserve_worker_group_restarts_total", worker="local-0") == 2


def test_the_asgi_app_answers_metrics_only():
    metrics = Metrics()
    metrics.step("m", 1.0, 1)
    app = metrics.asgi_app()

    async def call(method: str, path: str) -> tuple[int, bytes]:
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": method, "path": path, "query_string": b"", "headers": []}
        await app(scope, receive, send)
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    status, body = asyncio.run(call("GET", "/metrics"))
    assert status == 200 and b'diffserve_step_commands_total{model="m"} 1.0' in body
    assert asyncio.run(call("GET", "/"))[0] == 404
    assert asyncio.run(call("POST", "/metrics"))[0] == 405
