"""Starts and watches the worker processes that `diffserve serve` runs on this machine.

A worker that exits is reported to the engine at once (its jobs fail within a poll interval,
faster than the heartbeat timeout) and, unless disabled, started again with a growing delay.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from diffserve.worker.v1.launch import EXIT_CANNOT_LOAD

log = logging.getLogger(__name__)


@dataclass
class LocalWorkerSpec:
    worker_id: str
    args: list[str]  # extra command-line arguments for `python -m diffserve.worker`
    env: dict[str, str] = field(default_factory=dict)
    world_size: int = 1  # processes in the worker group; rank 0 registers as worker_id


class LocalWorkers:
    """Owns the local worker subprocesses."""

    def __init__(self, scheduler_address: str, specs: list[LocalWorkerSpec], on_exit, restart: bool = True, on_fatal=None,
                 auth_args: list[str] = ()):
        self.address = scheduler_address
        self.auth_args = list(auth_args)  # the key files' paths (never a secret in argv), or the plain-TCP flag
        self.specs = specs
        self.on_exit = on_exit  # on_exit(worker_id, reason)
        self.restart = restart
        self.on_fatal = on_fatal  # on_fatal(reason): a worker cannot start at all (bad model path...)
        self._started_at: dict[str, float] = {}
        self.procs: dict[str, list[subprocess.Popen]] = {}  # worker id -> its group's processes, rank order
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
            group.append(subprocess.Popen(rank_cmd, env={**os.environ, **spec.env}))
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
                            other.kill()
                            other.wait()
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

    def pids(self) -> dict[str, list[int]]:
        return {wid: [p.pid for p in group] for wid, group in self.procs.items()}

    async def stop(self, grace_s: float = 3.0, timeout_s: float = 10.0) -> None:
        """Waits for the workers (registered ones were told to shut down), then terminates those
        still running (e.g. still loading their model), and kills those that hang."""
        self._stopping = True
        loop = asyncio.get_running_loop()
        for proc in [p for group in list(self.procs.values()) for p in group]:
            for action, wait_s in ((None, grace_s), (proc.terminate, timeout_s), (proc.kill, None)):
                if action is not None:
                    log.warning("worker %d still running; %s", proc.pid, action.__name__)
                    action()
                try:
                    await loop.run_in_executor(None, proc.wait, wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
