"""Starts and watches the worker processes that `diffserve serve` runs on this machine.

A worker that exits is reported to the engine at once (its jobs fail within a poll interval,
faster than the heartbeat timeout) and, unless disabled, started again with a growing delay.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

EXIT_CANNOT_LOAD = 2  # the worker's exit code when its model cannot be loaded (see worker/__main__.py)


@dataclass
class LocalWorkerSpec:
    worker_id: str
    args: list[str]  # extra command-line arguments for `python -m diffserve.worker`
    env: dict[str, str] = field(default_factory=dict)


class LocalWorkers:
    """Owns the local worker subprocesses."""

    def __init__(self, scheduler_address: str, specs: list[LocalWorkerSpec], on_exit, restart: bool = True, on_fatal=None):
        self.address = scheduler_address
        self.specs = specs
        self.on_exit = on_exit  # on_exit(worker_id, reason)
        self.restart = restart
        self.on_fatal = on_fatal  # on_fatal(reason): a worker cannot start at all (bad model path...)
        self._started_at: dict[str, float] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self._stopping = False

    def _start(self, spec: LocalWorkerSpec) -> None:
        cmd = [sys.executable, "-m", "diffserve.worker", "--scheduler", self.address, "--worker-id", spec.worker_id,
               "--parent-pid", str(os.getpid()), *spec.args]
        log.info("starting worker %s: %s", spec.worker_id, " ".join(cmd))
        self.procs[spec.worker_id] = subprocess.Popen(cmd, env={**os.environ, **spec.env})
        self._started_at[spec.worker_id] = time.monotonic()

    async def run(self) -> None:
        for spec in self.specs:
            self._start(spec)
        delays = {spec.worker_id: 1.0 for spec in self.specs}
        while not self._stopping:
            await asyncio.sleep(0.25)
            for spec in self.specs:
                proc = self.procs.get(spec.worker_id)
                if proc is None or proc.poll() is None or self._stopping:
                    continue
                reason = f"worker process {proc.pid} exited with code {proc.returncode}"
                if proc.returncode < 0:
                    reason += f" ({signal.Signals(-proc.returncode).name})"
                del self.procs[spec.worker_id]
                self.on_exit(spec.worker_id, reason)
                if proc.returncode == EXIT_CANNOT_LOAD:
                    log.error("%s: the worker cannot load its model; not restarting it", reason)
                    if self.on_fatal is not None:
                        self.on_fatal(f"worker {spec.worker_id} cannot load its model (see its log above)")
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
            self._start(spec)

    def pids(self) -> dict[str, int]:
        return {wid: p.pid for wid, p in self.procs.items()}

    async def stop(self, grace_s: float = 3.0, timeout_s: float = 10.0) -> None:
        """Waits for the workers (registered ones were told to shut down), then terminates those
        still running (e.g. still loading their model), and kills those that hang."""
        self._stopping = True
        loop = asyncio.get_running_loop()
        for proc in list(self.procs.values()):
            for action, wait_s in ((None, grace_s), (proc.terminate, timeout_s), (proc.kill, None)):
                if action is not None:
                    log.warning("worker %d still running; %s", proc.pid, action.__name__)
                    action()
                try:
                    await loop.run_in_executor(None, proc.wait, wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
