"""A private `diffserve serve`, started as a subprocess by module name (the client imports no
scheduler or worker code): the one-job server of `diffserve generate --model-path` and the
in-process API's server (`diffserve.Engine`, client/engine.py) are both started here.

The server dies with the process that started it, however that process ends: it runs in its own
session (a terminal's Ctrl-C reaches the caller alone, which cancels its job and then stops the
server), it is told the caller's pid (--parent-pid: a parent-death signal, so even a SIGKILLed
caller stops it) and it removes the temporary folder it was given (--cleanup-dir) when it exits.
Its workers die with it the same way (scheduler/launcher.py). The parent-death signal follows the
thread that started the server (prctl): start it from a thread that outlives it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from diffserve.client.client import Client, DiffserveError
from diffserve.worker.v1.launch import NO_ENV, worker_argv

SERVER_MODULE = "diffserve.scheduler.app"  # the composition root
READY_WAIT_S = 60.0  # for the server to listen (the model loads afterwards, see wait_serving)
STOP_WAIT_S = 30.0  # for the server to stop after SIGTERM (no drain: its jobs are cancelled or done)
# serve flags a private server's starter sets itself (start() appends them, so they win).
OWNED_FLAGS = ("--port", "--ready-file", "--parent-pid", "--cleanup-dir")


class ServerStartError(RuntimeError):
    """The private server exited, or did not listen or load its model in time."""


def private_flags(workdir: str | Path, log_level: str = "WARNING") -> list[str]:
    """The serve flags that make `serve` a private server (its folders inside `workdir`, no worker
    restarts, no drain: stopping it cancels what runs). They go first: a flag given again after
    them wins (argparse keeps the last value)."""
    workdir = Path(workdir)
    return ["--output-dir", str(workdir / "outputs"), "--state-dir", str(workdir / "state"), "--log-level", log_level,
            "--no-restart-workers", "--drain-timeout", "0"]


def start(serve_argv: list[str], workdir: str | Path, *, stderr=None, stderr_tail: Callable[[], str] = lambda: "",
          quiet: bool = False) -> tuple[subprocess.Popen, str]:
    """Starts `python -m diffserve.scheduler.app *serve_argv` on a free loopback port and waits
    until it listens; returns (process, "127.0.0.1:PORT"). `workdir` is temporary: the server
    removes it when it exits. `stderr` is Popen's (default: inherited); `stderr_tail()` returns
    what the server wrote last, for the error when it does not start. quiet: no Hugging Face
    progress bars while the worker loads."""
    ready = Path(workdir) / "port"
    cmd = [sys.executable, "-m", SERVER_MODULE, *serve_argv, "--port", "0", "--ready-file", str(ready),
           "--parent-pid", str(os.getpid()), "--cleanup-dir", str(workdir)]
    # Configured by this command line alone: DIFFSERVE_* variables meant for the caller (or for the
    # user's own `serve`, such as DIFFSERVE_AUTH_TOKENS) must not reach the private server.
    env = {**os.environ, NO_ENV: "1"}
    if quiet:
        env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    proc = subprocess.Popen(cmd, start_new_session=True, stderr=stderr, env=env)
    try:
        deadline = time.monotonic() + READY_WAIT_S
        while not ready.exists():
            if proc.poll() is not None:
                raise ServerStartError(_with_tail(f"the local server exited (code {proc.returncode})", proc, stderr_tail))
            if time.monotonic() > deadline:
                raise ServerStartError(_with_tail(f"the local server did not listen within {READY_WAIT_S:.0f} s", proc, stderr_tail))
            time.sleep(0.05)
        return proc, f"127.0.0.1:{ready.read_text().split()[0]}"
    except BaseException:
        stop(proc)
        raise


def wait_serving(client: Client, proc: subprocess.Popen, timeout_s: float, stderr_tail: Callable[[], str] = lambda: "") -> None:
    """Until the server reports SERVING (its worker group has loaded the model: Health.Watch), or it
    exits, or timeout_s passes (ServerStartError with the end of its stderr)."""
    try:
        client.wait_until_serving(timeout_s, alive=lambda: proc.poll() is None)
    except DiffserveError as err:
        if proc.poll() is not None:
            raise ServerStartError(_with_tail(f"the server exited (code {proc.returncode}) before the model loaded", proc, stderr_tail)) from None
        if err.code.name == "DEADLINE_EXCEEDED":
            raise ServerStartError(_with_tail(f"the model did not load within {timeout_s:.0f} s", proc, stderr_tail)) from None
        raise ServerStartError(_with_tail(f"waiting for the server: {err}", proc, stderr_tail)) from None


def _with_tail(message: str, proc: subprocess.Popen, stderr_tail: Callable[[], str]) -> str:
    if proc.poll() is None:
        stop(proc)  # its last words, before reading them
    tail = stderr_tail().rstrip()
    return f"{message}; its stderr ended with:\n{tail}" if tail else message


@contextlib.contextmanager
def local_server(args: argparse.Namespace, workdir: str | Path, log_level: str = "WARNING") -> Iterator[tuple[subprocess.Popen, str]]:
    """`generate --model-path`'s one-job server, with the worker flags parsed into `args`
    (add_worker_flags(outer=True)); yields (process, "127.0.0.1:PORT") and stops it on exit.
    Without --verbose, the Hugging Face libraries' progress bars stay off while the worker loads."""
    proc, target = start([*worker_argv(args, outer=True), *private_flags(workdir, log_level), "--max-queue", "1"], workdir,
                         quiet=not getattr(args, "verbose", False))
    try:
        yield proc, target
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
