"""Prometheus /metrics against a real `serve` (tiny Wan), scraped over HTTP: on the HTTP port
(--http-port), and alone on --metrics-port without the HTTP API. The values move as jobs run: a
running job shows in the phase gauge, a cancel and a success count once each, the step histogram
grows by the job's steps, the artifact bytes by its file, one worker group is up."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx2 as httpx  # the HTTP client the openai SDK brings
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ServerProcess

PARAMS = {"prompt": "a red fox", "height": 32, "width": 32, "num_frames": 1, "num_inference_steps": 3, "seed": 7}


def scrape(http: httpx.Client) -> dict:
    """{(sample name, frozenset(labels)): value} from GET /metrics."""
    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape_until(http: httpx.Client, what: str, name: str, expected: float, **labels) -> dict:
    """Scrapes until the sample `name{labels}` equals `expected`; returns that scrape."""

    def ready():
        samples = scrape(http)
        return samples if value(samples, name, **labels) == expected else None

    return wait_for(ready, what)


def wait_for(predicate, what: str, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def http_server(tiny_wan, tmp_path_factory):
    server = ServerProcess(tiny_wan, tmp_path_factory.mktemp("metrics-http"), "--http-port", "0")
    yield server
    server.stop()


def test_metrics_move_as_jobs_run(http_server):
    with httpx.Client(base_url=f"http://127.0.0.1:{http_server.http_port}", timeout=60) as http:
        model = http.get("/v1/models").json()["data"][0]["id"]
        before = scrape(http)  # open, like /health: no token needed
        assert value(before, "diffserve_worker_groups_up", model=model) == 1
        assert value(before, "diffserve_jobs_submitted_total", model=model) == 0

        # A long job shows as running (denoise) in the gauge, then counts once as cancelled.
        long = http.post("/v1/jobs", json={"params": {"model": model, **PARAMS, "num_inference_steps": 1000}}).json()["job"]
        try:
            wait_for(lambda: http.get(f"/v1/jobs/{long['id']}").json().get("step", 0) >= 2, "two steps of the long job")
            running = scrape(http)
            assert value(running, "diffserve_jobs", model=model, phase="denoise") == 1
            assert value(running, "diffserve_worker_resident_jobs", worker="local-0", model=model) == 1
            assert value(running, "diffserve_step_commands_total", model=model) >= 2
            assert value(running, "diffserve_step_batch_jobs_bucket", model=model, le="1.0") >= 2
        finally:
            assert http.delete(f"/v1/jobs/{long['id']}").status_code == 200
        wait_for(lambda: http.get(f"/v1/jobs/{long['id']}").json()["state"] == "JOB_STATE_CANCELLED", "the cancel")
        middle = scrape(http)
        assert value(middle, "diffserve_jobs_finished_total", model=model, outcome="cancelled") == 1
        assert value(middle, "diffserve_jobs", model=model, phase="denoise") == 0

        # A short job: succeeded + 1, its steps in the step histogram, its file in the artifact bytes.
        job = http.post("/v1/jobs", json={"params": {"model": model, **PARAMS}}).json()["job"]
        wait_for(lambda: http.get(f"/v1/jobs/{job['id']}").json()["state"] == "JOB_STATE_SUCCEEDED", "the short job")
        done = http.get(f"/v1/jobs/{job['id']}").json()
        after = scrape(http)
        assert value(after, "diffserve_jobs_submitted_total", model=model) == 2
        assert value(after, "diffserve_jobs_finished_total", model=model, outcome="succeeded") == 1
        steps = PARAMS["num_inference_steps"]
        assert value(after, "diffserve_step_duration_seconds_count", model=model) == value(middle, "diffserve_step_duration_seconds_count", model=model) + steps
        assert value(after, "diffserve_step_commands_total", model=model) == value(middle, "diffserve_step_commands_total", model=model) + steps
        assert value(after, "diffserve_artifact_written_bytes_total", model=model) == int(done["artifact"]["size_bytes"]) > 0
        assert value(after, "diffserve_job_duration_seconds_count", model=model, outcome="succeeded") == 1
        assert value(after, "diffserve_job_queue_wait_seconds_count", model=model) == 2
        # The worker's own counters (heartbeats, every second) catch up with the scheduler's count.
        commands = value(after, "diffserve_step_commands_total", model=model)
        beat = scrape_until(http, "a heartbeat with every step", "diffserve_worker_step_commands_total", commands, worker="local-0", model=model)
        assert value(beat, "diffserve_worker_denoise_rows_total", worker="local-0", model=model) >= commands
        assert value(after, "diffserve_worker_gpu_memory_allocated_bytes", worker="local-0", model=model) == 0  # CPU worker
        assert value(after, "process_resident_memory_bytes") > 0


def test_metrics_port_without_http(tiny_wan, tmp_path):
    server = ServerProcess(tiny_wan, tmp_path, "--metrics-port", "0")
    try:
        grpc_port, http_port, metrics_port = (int(p) for p in (tmp_path / "port").read_text().split())
        assert grpc_port == server.port and http_port == 0 and metrics_port > 0
        with httpx.Client(base_url=f"http://127.0.0.1:{metrics_port}", timeout=30) as http:
            (model,) = server.client.list_models()
            samples = scrape_until(http, "the worker group up", "diffserve_worker_groups_up", 1, model=model.name)
            assert value(samples, "diffserve_queue_limit") > 0
            assert http.get("/").status_code == 404 and http.get("/v1/models").status_code == 404  # metrics only
            assert http.post("/metrics").status_code == 405
    finally:
        server.stop()


def test_metrics_port_equal_to_http_port_is_refused(tmp_path):
    done = subprocess.run([sys.executable, "-m", "diffserve.scheduler.app", "--http-port", "18931", "--metrics-port", "18931",
                           "--state-dir", str(tmp_path / "state")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "--metrics-port" in done.stderr, done.stderr
