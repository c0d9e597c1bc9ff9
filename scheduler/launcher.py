"""Starts and watches the worker processes that `diffserve serve` runs on this machine.

Each worker runs in its own session (process group), so a terminal's Ctrl-C (SIGINT to the
foreground process group) reaches the scheduler alone, which then stops its workers itself
(server.py). A worker dies with the scheduler even when the scheduler is SIGKILLed (--parent-pid:
a parent-death signal, else a poll). Its stderr passes through the scheduler's, and its last lines
are kept for the error shown when it exits before it registered.

A worker that exits is reported to the engine at once (its jobs go back to the queue within a
poll interval, faster than the heartbeat timeout) and, unless disabled, started again with a
growing delay. A worker that exits before it ever registered (it could not load: a missing
package, a bad model path, an impossible layout) is not restarted: `on_fatal` gets its last lines.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from diffserve.worker.v1.launch import EXIT_CANNOT_LOAD

log = logging.getLogger(__name__)

TAIL_LINES = 12  # a worker's last stderr lines kept for the error when it cannot start


@dataclass
class LocalWorkerSpec:
    worker_id: str
    args: list[str]  # extra command-line arguments for `python -m diffserve.worker`
    env: dict[str, str] = field(default_factory=dict)
    world_size: int = 1  # processes in the worker group; rank 0 registers as worker_id


class _Tail:
    """Copies a worker's stderr to ours, line by line, keeping the last TAIL_LINES."""

    def __init__(self, stream):
        self.lines: deque[str] = deque(maxlen=TAIL_LINES)
        self._thread = threading.Thread(target=self._pump, args=(stream,), name="worker-stderr", daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        for line in iter(stream.readline, b""):
            text = line.decode(errors="replace")
            self.lines.append(text.rstrip())
            try:
                sys.stderr.write(text)
                sys.stderr.flush()
            except (OSError, ValueError):  # our stderr is gone: keep draining the pipe
                pass
        stream.close()

    def text(self, wait_s: float = 1.0) -> str:
        self._thread.join(wait_s)  # the pipe's last lines, once the process has exited
        return "\n".join(f"  | {line}" for line in self.lines if line.strip())


class LocalWorkers:
    """Owns the local worker subprocesses."""

    def __init__(self, scheduler_address: str, specs: list[LocalWorkerSpec], on_exit, restart: bool = True, on_fatal=None,
                 auth_args: list[str] = (), registered: Callable[[str], bool] = lambda worker_id: False):
        self.address = scheduler_address
        self.auth_args = list(auth_args)  # the key files' paths (never a secret in argv), or the plain-TCP flag
        self.specs = specs
        self.on_exit = on_exit  # on_exit(worker_id, reason)
        self.restart = restart
        self.on_fatal = on_fatal  # on_fatal(reason): a worker cannot start at all (bad model path, missing package...)
        self.registered = registered  # registered(worker_id): the engine knows it now
        self._ever_registered: set[str] = set()
        self._started_at: dict[str, float] = {}
        self.restarts: dict[str, int] = {}  # worker id -> times its group was started again (metrics)
        self.procs: dict[str, list[subprocess.Popen]] = {}  # worker id -> its group's processes, rank order
        self._tails: dict[int, _Tail] = {}  # pid -> its stderr tail
        self._stopping = False

    def _start(self, spec: LocalWorkerSpec) -> None:
        cmd = [sys.executable, "-m", "diffserve.worker", "--scheduler", self.address, "--worker-id", spec.worker_id,
               "--parent-pid", str(os.getpid()), *self.auth_args, *spec.args]
        group = []
        if spec.world_size > 1:
            with socket.socket() as s:  # a free port for the group's torch.distributed rendezvous
                s.bind(("127.0.0.1", 0))
                init = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        for rank in range(spec.world_size):
            rank_cmd = cmd + (["--rank", str(rank), "--dist-init", init] if spec.world_size > 1 else [])
            log.info("starting worker %s rank %d: %s", spec.worker_id, rank, " ".join(rank_cmd))
            # Own session: a terminal's Ctrl-C is for the scheduler, which stops its workers itself.
            proc = subprocess.Popen(rank_cmd, env={**os.environ, **spec.env}, stderr=subprocess.PIPE, start_new_session=True)
            self._tails[proc.pid] = _Tail(proc.stderr)
            group.append(proc)
        self.procs[spec.worker_id] = group
        self._started_at[spec.worker_id] = time.monotonic()

    async def run(self) -> None:
        for spec in self.specs:
            self._start(spec)
        delays = {spec.worker_id: 1.0 for spec in self.specs}
        while not self._stopping:
            await asyncio.sleep(0.25)
            for spec in self.specs:
                group = self.procs.get(spec.worker_id)
                if group and spec.worker_id not in self._ever_registered and self.registered(spec.worker_id):
                    self._ever_registered.add(spec.worker_id)
                exited = [p for p in group or [] if p.poll() is not None]
                if not exited or self._stopping:
                    continue
                proc = exited[0]
                reason = f"worker process {proc.pid} exited with code {proc.returncode}"
                if proc.returncode < 0:
                    reason += f" ({signal.Signals(-proc.returncode).name})"
                if len(group) > 1:  # one rank gone: the group cannot go on
                    reason += f" (rank {group.index(proc)} of {len(group)}; the group was stopped)"
                    for other in group:
                        if other.poll() is None:
                            _kill_group(other)
                            other.wait()
                del self.procs[spec.worker_id]
                tails = [self._tails.pop(p.pid) for p in group if p.pid in self._tails]
                self.on_exit(spec.worker_id, reason)
                if proc.returncode == EXIT_CANNOT_LOAD or spec.worker_id not in self._ever_registered:
                    last = "\n".join(text for text in (t.text() for t in tails) if text)
                    why = "cannot load its model" if proc.returncode == EXIT_CANNOT_LOAD else "exited before it registered"
                    fatal = f"worker {spec.worker_id} {why} ({reason}; not restarting it)" + (f"; its last lines:\n{last}" if last else "")
                    if self.on_fatal is not None:
                        self.on_fatal(fatal)
                    else:
                        log.error("%s", fatal)
                    continue
                if time.monotonic() - self._started_at[spec.worker_id] > 60:
                    delays[spec.worker_id] = 1.0  # it ran fine for a while: restart promptly
                if self.restart:
                    delay = delays[spec.worker_id]
                    delays[spec.worker_id] = min(delay * 2, 60.0)
                    log.warning("%s; restarting it in %.0f s", reason, delay)
                    asyncio.get_running_loop().call_later(delay, self._restart, spec)

    def _restart(self, spec: LocalWorkerSpec) -> None:
        if not self._stopping and spec.worker_id not in self.procs:
            self.restarts[spec.worker_id] = self.restarts.get(spec.worker_id, 0) + 1
            self._start(spec)

    def pids(self) -> dict[str, list[int]]:
        return {wid: [p.pid for p in group] for wid, group in self.procs.items()}

    async def stop(self, grace_s: float = 3.0, timeout_s: float = 10.0) -> None:
        """Waits for the registered workers (told to shut down) up to grace_s, terminates the
        others (still loading their model: SIGTERM ends them at once) and those still running,
        and kills those that hang timeout_s more."""
        self._stopping = True
        loop = asyncio.get_running_loop()
        for worker_id, group in list(self.procs.items()):
            told = self.registered(worker_id)
            for proc in group:
                steps = ((None, grace_s if told else 0.0), ("terminate", timeout_s), ("kill", None))
                for action, wait_s in steps:
                    if action is not None and proc.poll() is None:
                        level = logging.WARNING if told or action == "kill" else logging.INFO  # a loading one is expected
                        log.log(level, "worker %d still running; %s", proc.pid, action)
                        proc.terminate() if action == "terminate" else _kill_group(proc)
                    try:
                        await loop.run_in_executor(None, proc.wait, wait_s)
                        break
                    except subprocess.TimeoutExpired:
                        continue

    def kill(self) -> None:
        """Kills every worker (and anything in its process group) now and reaps it: a forced exit."""
        self._stopping = True
        for group in list(self.procs.values()):
            for proc in group:
                _kill_group(proc)
            for proc in group:
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    log.error("worker %d did not die", proc.pid)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to the worker's process group (its session: the worker and anything it started)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        if proc.poll() is None:
            proc.kill()
