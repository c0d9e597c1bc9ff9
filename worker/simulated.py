"""A simulated worker: speaks the real worker protocol, computes nothing, imports no torch.

    python -m diffserve.worker.simulated --scheduler tcp://127.0.0.1:PORT \\
        (--key-file K --scheduler-key S | --insecure-worker-plaintext) \\
        [--model-name sim] [--step-ms 5] [--stage-ms 1] [--groups N] [--max-batch-size 4] [--max-resident 8]

One process hosts N worker groups: N DEALER sockets, each with its own routing id (and worker
id), served by one loop on one thread (epoll over the sockets' descriptors), so 64 groups need one
process. Each group says Hello with a small fake model card (`sim_card`), heartbeats, and answers RunStage
(ENCODE / PREPARE / DECODE) after --stage-ms and DenoiseStep after --step-ms, without blocking
the other groups. It keeps per-request state as the real runtime does (runtime.py): a request
must be admitted, prepared before its steps, denoised step by step in order; finished_ids,
Free, Reregister (FreeAll, then Hello again) and Shutdown are honoured. DECODE returns uint8
frames of exactly (num_frames, height, width, 3), a deterministic function of the request
(`sim_frames`: seed, prompt, sizes, steps, guidance) and of the steps it ran, so two runs of one
request give the same bytes.

For benchmarks (bench/scheduler_capacity.py), --stats-file PATH: on SIGUSR1 (and at exit) the
process writes what it saw since the previous SIGUSR1 as JSON, including the gap between each
Result sent and the next compute command received on the same group, an upper bound of the
scheduler's dispatch latency (it includes both ZeroMQ hops).

Used by tests that need many workers or precise timing without a model, and by the capacity
bench; not a model (it is never listed as one by `diffserve serve`).
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import logging
import math
import os
import platform
import selectors
import signal
import socket
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import zmq
from google.rpc import code_pb2, status_pb2

from diffserve.v1 import generation_pb2 as pb
from diffserve.worker.v1 import worker_pb2 as wpb
from diffserve.worker.v1.launch import EXIT_CANNOT_LOAD, add_worker_auth_flags

log = logging.getLogger("diffserve.worker.simulated")

# Plain ints: pyzmq's IntFlag constants build a new enum member on every `|` / `&`.
_NOBLOCK, _EVENTS, _POLLIN = int(zmq.NOBLOCK), int(zmq.EVENTS), int(zmq.POLLIN)

HELLO_RETRY_S = 3.0  # as worker/connection.py
FLUSH_LINGER_MS = 2000
HOUSEKEEPING_S = 0.05  # hellos, heartbeats, parent check, signals
COMPUTE = ("run_stage", "denoise_step")

# The simulated model's card: small sizes (a DECODE result stays small), many steps allowed
# (a benchmark keeps a group busy with few, long jobs), no guidance.
SIM_SIZE_MULTIPLE = 8
SIM_MAX_SIZE = 256
SIM_FRAME_STEP = 4
SIM_MAX_FRAMES = 17
SIM_MAX_STEPS = 100_000


def sim_card(name: str) -> wpb.ModelCard:
    return wpb.ModelCard(
        name=name,
        family="simulated",
        task="text-to-video",
        defaults=wpb.ModelDefaults(height=32, width=32, num_frames=1, num_inference_steps=4, guidance_scale=1.0, fps=16,
                                   negative_prompt="", sampler="simulated", flow_shift=1.0),
        limits=wpb.ModelLimits(size_multiple=SIM_SIZE_MULTIPLE, max_height=SIM_MAX_SIZE, max_width=SIM_MAX_SIZE,
                               max_pixels=SIM_MAX_SIZE * SIM_MAX_SIZE, frame_step=SIM_FRAME_STEP, max_num_frames=SIM_MAX_FRAMES,
                               max_num_inference_steps=SIM_MAX_STEPS, prompt_required=True, image_required=False, max_images=0),
        guidance_kind=wpb.GUIDANCE_KIND_NONE,
        num_experts=1,
    )


def sim_frames(request: wpb.Request, steps_done: int) -> bytes:
    """The DECODE output of a request: (num_frames, height, width, 3) uint8 bytes, a pure function
    of the request's fields and of the denoising steps run (SHAKE-256 of them)."""
    key = hashlib.sha256()
    for part in (request.prompt, request.negative_prompt, request.seed, request.height, request.width, request.num_frames,
                 request.num_inference_steps, steps_done, list(request.cfg_scales), request.embedded_guidance):
        key.update(repr(part).encode() + b"\0")
    for image in request.images:
        key.update(hashlib.sha256(image).digest())
    size = max(0, request.num_frames) * max(0, request.height) * max(0, request.width) * 3
    return hashlib.shake_256(key.digest()).digest(size)


@dataclass
class SimState:
    request: wpb.Request
    prepared: bool = False
    step: int = 0


class _Refused(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.status = status_pb2.Status(code=code, message=message)


@dataclass
class Stats:
    """What the process saw since the last reset (SIGUSR1)."""

    since: float = field(default_factory=time.monotonic)
    cpu_since: float = field(default_factory=time.process_time)
    step_commands: int = 0
    step_entries: int = 0
    stage_commands: int = 0
    gaps_s: list[float] = field(default_factory=list)  # Result sent -> next compute command received, per group

    def summary(self, groups: int) -> dict:
        gaps = sorted(self.gaps_s)

        def pct(p: float) -> float | None:
            return round(gaps[min(len(gaps) - 1, int(p / 100 * len(gaps)))] * 1e3, 4) if gaps else None

        return {
            "groups": groups,
            "window_s": round(time.monotonic() - self.since, 4),
            "worker_cpu_s": round(time.process_time() - self.cpu_since, 4),
            "step_commands": self.step_commands,
            "step_entries": self.step_entries,
            "stage_commands": self.stage_commands,
            "gap_ms": {"n": len(gaps), "p50": pct(50), "p90": pct(90), "p99": pct(99), "max": round(gaps[-1] * 1e3, 4) if gaps else None,
                       "mean": round(sum(gaps) / len(gaps) * 1e3, 4) if gaps else None},
        }


class Group:
    """One simulated worker group (its rank 0): a DEALER socket, resident states, a FIFO of
    commands of which the head compute command runs until its due time."""

    def __init__(self, sim: Simulator, worker_id: str):
        self.sim = sim
        self.id = worker_id
        sock = sim.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, worker_id.encode())
        sock.setsockopt(zmq.LINGER, FLUSH_LINGER_MS)
        if sim.curve is not None:
            sock.setsockopt(zmq.CURVE_SERVERKEY, sim.curve.server)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, sim.curve.public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, sim.curve.secret)
        sock.connect(sim.args.scheduler)
        self.sock = sock
        self.states: dict[str, SimState] = {}
        self.admit_errors: dict[str, status_pb2.Status] = {}
        self.pending: deque[wpb.Command] = deque()
        self.running: wpb.Command | None = None  # the head compute command, due at self.due
        self.started = 0.0
        self.due = 0.0
        self.welcomed = False
        self.ever_welcomed = False
        self.last_hello = -math.inf
        self.last_beat = 0.0
        self.interval = 1.0
        self.sequence = 0
        self.counters = pb.WorkerStatus()
        self.result_sent_at: float | None = None  # for the dispatch gap
        self.closed = False

    # ---- housekeeping ----

    def tick(self, now: float) -> None:
        if not self.welcomed and now - self.last_hello > HELLO_RETRY_S:
            self._send(wpb.WorkerMessage(hello=self.sim.hello))
            self.last_hello = now
        elif self.welcomed and now - self.last_beat > self.interval:
            self.sequence += 1
            status = pb.WorkerStatus()
            status.CopyFrom(self.counters)
            status.resident_jobs = len(self.states) + len(self.admit_errors)
            self._send(wpb.WorkerMessage(heartbeat=wpb.Heartbeat(sequence=self.sequence, status=status)))
            self.last_beat = now

    def _send(self, message: wpb.WorkerMessage, frames: list = ()) -> None:
        try:
            if frames:
                self.sock.send_multipart([message.SerializeToString(), *frames], zmq.NOBLOCK, copy=False)
            else:
                self.sock.send(message.SerializeToString(), _NOBLOCK)
        except zmq.Again:  # not connected (yet): a Hello or a beat is retried, a Result is the scheduler's loss
            pass
        self.sim.recheck.add(self)  # a send may consume the descriptor's signal: look for input again

    # ---- commands ----

    def receive(self, now: float) -> None:
        """Every message waiting on the socket."""
        sock = self.sock
        # ZMQ_EVENTS rather than recv until zmq.Again: an exception costs more than the message
        while not self.closed and sock.getsockopt(_EVENTS) & _POLLIN:
            command = wpb.Command.FromString(sock.recv(_NOBLOCK))
            kind = command.WhichOneof("body")
            if kind == "welcome":
                self.welcomed = self.ever_welcomed = True
                self.interval = command.welcome.heartbeat_interval_s or self.interval
                self.last_beat = now
                log.info("group %s registered with the scheduler at %s", self.id, self.sim.args.scheduler)
                self.sim.check_ready()
                continue
            if kind == "reregister":  # as connection.py: drop everything, say Hello again
                log.warning("the scheduler does not know group %s: freeing all requests, registering again", self.id)
                self.welcomed = False
                self.last_hello = -math.inf
                self.pending.append(wpb.Command(free_all=wpb.FreeAll()))
                self.tick(now)
                continue
            if kind in COMPUTE and self.result_sent_at is not None:
                self.sim.stats.gaps_s.append(time.monotonic() - self.result_sent_at)
                self.result_sent_at = None
            self.pending.append(command)
        self.advance(now)

    def advance(self, now: float) -> None:
        """Runs the queue from its head: instant commands at once, the next compute command until due."""
        while not self.closed:
            if self.running is not None:
                if now < self.due:
                    return
                self._finish(self.running, now)
                self.running = None
            if not self.pending:
                return
            command = self.pending.popleft()
            kind = command.WhichOneof("body")
            if kind == "shutdown":
                log.info("group %s: shutdown requested", self.id)
                self.close()
                return
            self._free(command.finished_ids)
            if kind == "admit":
                self._admit(command.admit)
            elif kind == "free":
                self._free(command.free.request_ids)
            elif kind == "free_all":
                self._free(list(self.states) + list(self.admit_errors))
            elif kind in COMPUTE:
                delay = self.sim.step_s if kind == "denoise_step" else self.sim.stage_s
                self.running, self.started, self.due = command, now, now + delay
                if delay > 0:
                    self.sim.schedule(self)
            # anything else (welcome / reregister are handled on receipt): ignored, as the runtime does

    def _admit(self, admit: wpb.Admit) -> None:
        self.states[admit.request_id] = SimState(request=admit.request)

    def _free(self, request_ids) -> None:
        for rid in request_ids:
            self.states.pop(rid, None)
            self.admit_errors.pop(rid, None)

    def _state(self, request_id: str) -> SimState:
        state = self.states.get(request_id)
        if state is None:
            raise _Refused(code_pb2.NOT_FOUND, f"request {request_id} is not resident on this worker")
        return state

    def _finish(self, command: wpb.Command, now: float) -> None:
        frames: list = []
        stats = self.sim.stats
        message = wpb.WorkerMessage()
        out = message.result
        out.command_id = command.id
        if command.WhichOneof("body") == "denoise_step":
            ran = 0
            for entry in command.denoise_step.entries:
                result = out.requests.add(request_id=entry.request_id)
                state = self.states.get(entry.request_id)
                if state is not None and state.prepared and entry.step_index == state.step:
                    state.step += 1
                    ran += 1
                    continue
                try:
                    state = self._state(entry.request_id)
                    raise _Refused(code_pb2.FAILED_PRECONDITION, f"asked for step {entry.step_index}, request is at step {state.step}")
                except _Refused as exc:
                    result.status.CopyFrom(exc.status)
            if ran:
                self.counters.step_commands += 1
                self.counters.batched_step_commands += int(ran > 1)
                self.counters.denoise_rows += ran
            stats.step_commands += 1
            stats.step_entries += len(command.denoise_step.entries)
        else:
            stage = command.run_stage
            for rid in stage.request_ids:
                result = wpb.RequestResult(request_id=rid)
                try:
                    state = self._state(rid)
                    if stage.stage == wpb.WORKER_STAGE_ENCODE:
                        pass
                    elif stage.stage == wpb.WORKER_STAGE_PREPARE:
                        state.prepared, state.step = True, 0
                    elif stage.stage == wpb.WORKER_STAGE_DECODE:
                        if not state.prepared:
                            raise _Refused(code_pb2.FAILED_PRECONDITION, f"request {rid} was never prepared")
                        r = state.request
                        result.frames.CopyFrom(wpb.Tensor(dtype="uint8", shape=[r.num_frames, r.height, r.width, 3], frame=len(frames)))
                        frames.append(sim_frames(r, state.step))
                    else:
                        raise _Refused(code_pb2.INVALID_ARGUMENT, f"unknown stage {stage.stage}")
                except _Refused as exc:
                    result.status.CopyFrom(exc.status)
                out.requests.append(result)
            stats.stage_commands += 1
        out.elapsed_ms = (now - self.started) * 1e3
        self._send(message, frames)
        self.result_sent_at = time.monotonic()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sim.selector.unregister(self.sock.FD)
            self.sim.live -= 1
            self.sock.close(linger=FLUSH_LINGER_MS)


class Simulator:
    """N groups on one thread: epoll over their sockets' descriptors and a heap of due compute
    commands. A ZeroMQ descriptor signals a change of the socket's state, not readability: a
    signalled socket is read until empty, and so is every socket that sent (a send may take the
    signal)."""

    def __init__(self, args: argparse.Namespace, curve):
        self.args = args
        self.curve = curve
        self.step_s = max(0.0, args.step_ms) / 1e3
        self.stage_s = max(0.0, args.stage_ms) / 1e3
        self.hello = wpb.Hello(
            protocol_version=wpb.PROTOCOL_VERSION_3,
            description=f"{platform.node()} pid {os.getpid()} simulated (step {args.step_ms:g} ms, stage {args.stage_ms:g} ms)",
            card=sim_card(args.model_name),
            max_batch_size=args.max_batch_size,
            max_resident=args.max_resident,
            world_size=1,
        )
        self.ctx = zmq.Context()
        self.selector = selectors.EpollSelector() if hasattr(selectors, "EpollSelector") else selectors.DefaultSelector()
        self.recheck: set[Group] = set()
        self.stats = Stats()
        self._due: list[tuple[float, int, Group]] = []
        self._seq = 0
        self._ready_written = False
        self.stop_reason = ""
        self.dump_requested = False
        base = args.worker_id or f"sim-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        ids = [base] if args.groups == 1 and args.worker_id else [f"{base}-{i}" for i in range(args.groups)]
        self.groups = [Group(self, wid) for wid in ids]
        self.live = len(self.groups)
        for g in self.groups:
            self.selector.register(g.sock.FD, selectors.EVENT_READ, g)

    def schedule(self, group: Group) -> None:
        self._seq += 1
        heapq.heappush(self._due, (group.due, self._seq, group))

    def check_ready(self) -> None:
        if self.args.ready_file and not self._ready_written and all(g.ever_welcomed for g in self.groups):
            _write_atomic(self.args.ready_file, " ".join(g.id for g in self.groups))
            self._ready_written = True

    def write_stats(self) -> None:
        if self.args.stats_file:
            _write_atomic(self.args.stats_file, json.dumps(self.stats.summary(len(self.groups))))
        self.stats = Stats()

    def run(self) -> int:
        next_house = 0.0
        while not self.stop_reason and self.live:
            now = time.monotonic()
            if now >= next_house:
                for g in self.groups:
                    if not g.closed:
                        g.tick(now)
                if self.args.parent_pid and os.getppid() != self.args.parent_pid:
                    log.error("parent process %d is gone; shutting down", self.args.parent_pid)
                    break
                if self.dump_requested:
                    self.dump_requested = False
                    self.write_stats()
                next_house = now + HOUSEKEEPING_S
            while self._due and self._due[0][0] <= now:
                _, _, group = heapq.heappop(self._due)
                group.advance(now)
            while self.recheck:
                group = self.recheck.pop()
                if not group.closed:
                    group.receive(now)
            wait = next_house - now
            if self._due:
                wait = min(wait, self._due[0][0] - now)
            ready = self.selector.select(max(0.0, wait))
            now = time.monotonic()
            for key, _ in ready:
                group = key.data
                if not group.closed:
                    group.receive(now)
        if self.stop_reason:
            log.info("stopping: %s", self.stop_reason)
        self.write_stats()
        for g in self.groups:
            g.close()
        self.selector.close()
        self.ctx.term()
        return 0


def _write_atomic(path: str, text: str) -> None:
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        f.write(text)
    os.replace(partial, path)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=os.environ.get("DIFFSERVE_PROG") or "python -m diffserve.worker.simulated",
                                description="A simulated worker (no model, no torch) for tests and benchmarks.")
    p.add_argument("--scheduler", required=True, help="ZeroMQ address of the scheduler, e.g. tcp://127.0.0.1:5555")
    p.add_argument("--model-name", default="sim", help="model name in the card (default sim)")
    p.add_argument("--step-ms", type=float, default=5.0, help="time a DenoiseStep takes (default 5 ms)")
    p.add_argument("--stage-ms", type=float, default=1.0, help="time an ENCODE / PREPARE / DECODE takes (default 1 ms)")
    p.add_argument("--groups", type=int, default=1, help="worker groups this process hosts, each its own socket and worker id")
    p.add_argument("--max-batch-size", type=int, default=4, help="most requests per DenoiseStep (Hello)")
    p.add_argument("--max-resident", type=int, default=8, help="most resident requests per group (Hello)")
    p.add_argument("--worker-id", default="", help="worker id (with --groups N > 1: the prefix of ID-0 .. ID-N-1; default sim-host-pid-random)")
    p.add_argument("--parent-pid", type=int, default=0, help="exit when this process is gone")
    p.add_argument("--ready-file", default="", help="written (ids, space-separated) once every group was welcomed")
    p.add_argument("--stats-file", default="", help="JSON counters and dispatch gaps, written on SIGUSR1 (then reset) and at exit")
    p.add_argument("--log-level", default="INFO")
    add_worker_auth_flags(p)
    args = p.parse_args(argv)
    if args.groups < 1:
        p.error("--groups must be >= 1")
    if args.max_batch_size < 1 or args.max_resident < 1:
        p.error("--max-batch-size and --max-resident must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s simworker %(levelname)s %(name)s: %(message)s")
    from diffserve.worker.connection import worker_curve_keys  # zmq and protos only

    try:
        curve = worker_curve_keys(args)
    except ValueError as exc:
        log.error("%s", exc)
        return EXIT_CANNOT_LOAD
    sim = Simulator(args, curve)

    def stop(signum, frame):
        sim.stop_reason = signal.Signals(signum).name

    def dump(signum, frame):
        sim.dump_requested = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGUSR1, dump)
    return sim.run()


if __name__ == "__main__":
    sys.exit(main())
