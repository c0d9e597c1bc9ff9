"""Shared fixtures and the suite's tiers.

Tiers, by folder (each gets the marker of its name, so `-m "not service"` works from the root too):

    tests/unit/         no torch, no sockets: scheduler policy, validation, tables, flags  (seconds)
    tests/models/       model level on the CPU: DiTs, kernels, samplers, compile, warm-up
    tests/distributed/  worker groups over gloo: sequence / tensor / cfg parallel, parallel VAE
    tests/service/      real `diffserve serve` processes: API, lifecycle, parity with diffusers

This file imports neither torch nor grpc at module level (the unit tier must not pay for them):
the tiny Wan checkpoint and the `diffserve serve` processes import what they need when used.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
# Shared helpers (jobs_util, dist_util, reference, `from conftest import ServerProcess`) import by
# their bare names from every tier's folder.
sys.path.insert(0, str(TESTS))

# `diffserve serve` without --model-path serves the built-in demo model. The tests' servers either name
# their model or mean a bare scheduler that remote / simulated workers join: --no-local-worker, through
# its DIFFSERVE_* variable, for every process the suite starts. test_demo_quality.py covers the default
# (`generate` and the Engine start private servers, which ignore DIFFSERVE_* variables).
os.environ["DIFFSERVE_NO_LOCAL_WORKER"] = "1"

# One intra-op thread per process (before torch is imported here or in any process the tests start): two
# test workers on two cores already fill the machine, and each test may start several processes of its own
# (servers, worker groups); more threads only contend (~6 % of the models and gloo tiers' time).
os.environ.setdefault("OMP_NUM_THREADS", "1")

TIERS = ("unit", "models", "distributed", "service")  # the markers are declared in pyproject.toml


@pytest.hookimpl(tryfirst=True)  # before -m deselects: `items` is everything collected
def pytest_collection_modifyitems(config, items):
    tiers = set()
    for item in items:
        parts = Path(str(item.path)).resolve().relative_to(TESTS.resolve()).parts
        tier = parts[0] if len(parts) > 1 and parts[0] in TIERS else None
        tiers.add(tier)
        if tier:
            item.add_marker(tier)
    # The unit tier stays torch-free: a collection of only tests/unit that imported torch is an error.
    if tiers == {"unit"} and "torch" in sys.modules:
        raise pytest.UsageError("tests/unit imported torch; move the test to tests/models/ (or import torch lazily)")


@pytest.fixture
def event_loop_for_jobs():
    """A fresh event loop set as the current one: Job objects make their asyncio.Event on it.
    Unit modules whose tests build jobs use it for every test (pytestmark usefixtures). It lives here,
    not in a tests/unit/conftest.py: a second `conftest` module would shadow this one for the tiers
    that `from conftest import ServerProcess`."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def tiny_wan(tmp_path_factory) -> Path:
    from tests.fixtures.tiny import build

    return build("wan", tmp_path_factory.mktemp("ckpt") / "tiny-wan")


def interrupt(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    """Ctrl-C for a `diffserve serve` subprocess (it drains and exits), killed if it has not exited
    within timeout_s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ServerProcess:
    """A `diffserve serve` subprocess with its local worker, on a free port (or `port`). A second
    one on the same workdir uses the same state and output folders (a restart)."""

    def __init__(self, model_path: Path, workdir: Path, *extra: str, port: int = 0):
        self.workdir = workdir
        ready = workdir / "port"
        ready.unlink(missing_ok=True)
        self.output_dir = workdir / "outputs"
        cmd = [sys.executable, "-m", "diffserve.client.cli", "serve", "--model-path", str(model_path), "--port", str(port),
               "--output-dir", str(self.output_dir), "--state-dir", str(workdir / "state"), "--ready-file", str(ready), "--log-level", "WARNING", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, env=env)
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert self.proc.poll() is None, f"server exited with {self.proc.returncode}"
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        ports = ready.read_text().split()  # the gRPC port, then the HTTP port with --http-port
        self.port = int(ports[0])
        self.http_port = int(ports[1]) if len(ports) > 1 else 0
        self.target = f"127.0.0.1:{self.port}"
        from diffserve.client import Client, DiffserveError

        self.client = Client(self.target)
        try:  # Health.Watch: returns as soon as the server says SERVING
            self.client.wait_until_serving(120, alive=lambda: self.proc.poll() is None)
        except DiffserveError as err:
            raise AssertionError(f"not SERVING: {err} (server exit code {self.proc.poll()})") from None

    def wait_health(self, status: str, timeout_s: float = 30) -> None:
        from diffserve.client import DiffserveError

        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            try:
                last = self.client.health()
            except DiffserveError as err:
                last = str(err)
            if last == status:
                return
            assert self.proc.poll() is None, f"server exited with {self.proc.returncode}"
            time.sleep(0.1)
        raise AssertionError(f"health stayed {last}, expected {status}")

    def worker_pids(self) -> list[int]:
        import psutil

        return [c.pid for c in psutil.Process(self.proc.pid).children() if "diffserve.worker" in " ".join(c.cmdline())]

    def worker_status(self):
        (model,) = self.client.list_models()
        return model.workers

    def stop(self) -> int:
        self.client.close()
        interrupt(self.proc)
        return self.proc.returncode


@pytest.fixture
def start_server(tmp_path):
    """Factory: start_server(model_path, *flags, workdir=None) -> ServerProcess, stopped at
    teardown. Give the workdir of a stopped server to restart it on the same state and outputs."""
    servers: list[ServerProcess] = []

    def start(model_path: Path, *extra: str, workdir: Path | None = None) -> ServerProcess:
        if workdir is None:
            workdir = tmp_path / f"server{len(servers)}"
            workdir.mkdir()
        servers.append(ServerProcess(model_path, workdir, *extra))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def wan_server(tiny_wan, tmp_path_factory):
    """One server shared by a test module (jobs are independent)."""
    server = ServerProcess(tiny_wan, tmp_path_factory.mktemp("server"), "--max-batch-size", "4", "--warmup-shape", "32x32x1")
    yield server
    server.stop()
