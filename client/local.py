"""`diffserve generate --model-path`: a one-job local server, started as a subprocess by module
name (the client imports no scheduler or worker code)."""

from __future__ import annotations

import argparse
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from diffserve.worker.v1.launch import worker_argv

SERVER_MODULE = "diffserve.scheduler.app"  # the composition root


@contextlib.contextmanager
def local_server(args: argparse.Namespace, workdir: str | Path, log_level: str = "WARNING") -> Iterator[tuple[subprocess.Popen, str]]:
    """A one-job `diffserve serve` subprocess on a free port with the worker flags parsed into
    `args` (add_worker_flags(outer=True)); yields (process, "127.0.0.1:PORT") and stops it on exit."""
    ready = Path(workdir) / "port"
    cmd = [sys.executable, "-m", SERVER_MODULE, *worker_argv(args, outer=True), "--port", "0",
           "--output-dir", str(Path(workdir) / "outputs"), "--state-dir", str(Path(workdir) / "state"), "--ready-file", str(ready), "--log-level", log_level,
           "--no-restart-workers", "--max-queue", "1"]
    proc = subprocess.Popen(cmd)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"error: the local server did not start (exit code {proc.poll()})")
            time.sleep(0.05)
        yield proc, f"127.0.0.1:{ready.read_text()}"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
