"""`diffserve generate --model-path`: a one-job local server, started as a subprocess by module
name (the client imports no scheduler or worker code).

The server dies with `generate`, however `generate` ends: it runs in its own session (a terminal's
Ctrl-C reaches `generate` alone, which cancels its job and then stops the server), it is told
`generate`'s pid (--parent-pid: a parent-death signal, so even a SIGKILLed `generate` stops it),
and it removes the temporary folder it was given (--cleanup-dir) when it exits. Its workers die
with it the same way (scheduler/launcher.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from diffserve.worker.v1.launch import NO_ENV, worker_argv

SERVER_MODULE = "diffserve.scheduler.app"  # the composition root
STOP_WAIT_S = 30.0  # for the server to stop after SIGTERM (no drain: its one job is cancelled or done)


@contextlib.contextmanager
def local_server(args: argparse.Namespace, workdir: str | Path, log_level: str = "WARNING") -> Iterator[tuple[subprocess.Popen, str]]:
    """A one-job `diffserve serve` subprocess on a free port with the worker flags parsed into
    `args` (add_worker_flags(outer=True)); yields (process, "127.0.0.1:PORT") and stops it on exit.
    `workdir` is temporary: the server removes it when it exits."""
    ready = Path(workdir) / "port"
    cmd = [sys.executable, "-m", SERVER_MODULE, *worker_argv(args, outer=True), "--port", "0",
           "--output-dir", str(Path(workdir) / "outputs"), "--state-dir", str(Path(workdir) / "state"), "--ready-file", str(ready), "--log-level", log_level,
           "--no-restart-workers", "--max-queue", "1", "--drain-timeout", "0", "--parent-pid", str(os.getpid()), "--cleanup-dir", str(workdir)]
    # Configured by this command line alone: DIFFSERVE_* variables meant for `generate` (or for the
    # user's own `serve`, such as DIFFSERVE_AUTH_TOKENS) must not reach the private server.
    env = {**os.environ, NO_ENV: "1"}
    if not getattr(args, "verbose", False):
        # nor the Hugging Face libraries' progress bars while the worker loads ("Loading weights ...")
        env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    proc = subprocess.Popen(cmd, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"error: the local server did not start (exit code {proc.poll()})")
            time.sleep(0.05)
        yield proc, f"127.0.0.1:{ready.read_text()}"
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the server stops its workers and exits), then a second SIGTERM (it kills them and
    exits at once), then SIGKILL to its process group (its workers die with it)."""
    for action, wait_s in ((proc.terminate, STOP_WAIT_S), (proc.terminate, 5.0), (None, None)):
        if proc.poll() is not None:
            return
        if action is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        action()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait_s)
