"""The stage lane: RunStage commands (encode, prepare, decode) beside the denoising steps.

A job's stages used to run between the steps of the batch on the same worker, so every arrival's
text encoding and every finished job's VAE decode (seconds for a long video) stalled everyone's next
step. With `--concurrent-stages` a one-GPU worker runs them on a thread of its own, on a CUDA stream
of its own, and says so in its Hello (`concurrent_stages`): the scheduler then keeps one stage
command and one denoising step in flight at once (scheduler/steps.py). Multi-GPU groups keep them
serial: their stages run collectives (parallel VAE, TP text encoders) that must stay in one order on
every rank. Off by default (docs/decisions.md): a job whose stages run beside the steps joins the
batch later than one whose stages preempt them.

Streams: a stage first waits (on the device, not the host) for the work already queued on the step
stream, since a decode reads latents the steps wrote; at its end the host waits for the stage's
stream, so its Result means its tensors are ready. Tensors a stage leaves in the request's state were
allocated on the stage stream but are then used (and freed) by the steps: `record_stream` tells the
caching allocator, so their memory is not handed out again while step kernels may still read it.
On the CPU there are no streams; the thread alone overlaps stages with steps.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import torch
from google.rpc import code_pb2, status_pb2

from diffserve.worker.v1 import worker_pb2 as wpb

log = logging.getLogger(__name__)


def tensors_of(value, depth: int = 2):
    """The tensors held by a request's state: its fields, and one level into lists, dicts and the
    objects it holds (the sampler's timesteps)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth <= 0 or value is None or isinstance(value, (str, bytes, int, float, bool)):
        return
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_of(item, depth - 1)
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_of(item, depth - 1)
    elif hasattr(value, "__dict__") and not isinstance(value, torch.nn.Module):
        for item in vars(value).values():
            yield from tensors_of(item, depth - 1)


def _indexed(device: torch.device) -> torch.device:
    """`cuda` as `cuda:N` (the current device): the lane's thread sets its device by index."""
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


class StageLane:
    """Runs `run(RunStage)` for each submitted command on its own thread; `reply(command_id,
    elapsed_ms, results, frames)` sends each Result."""

    def __init__(self, run: Callable, reply: Callable, state_of: Callable, device):
        self._run, self._reply, self._state_of = run, reply, state_of
        cuda = device is not None and torch.device(device).type == "cuda"
        self._device = _indexed(torch.device(device)) if cuda else None
        self._stream = torch.cuda.Stream(self._device) if cuda else None
        self._steps = torch.cuda.current_stream(self._device) if cuda else None  # the compute loop's (made on its thread)
        self._queue: queue.Queue[wpb.Command | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="stage-lane", daemon=True)
        self._thread.start()

    def submit(self, command: wpb.Command) -> None:
        self._queue.put(command)

    def close(self) -> None:
        """Lets the running stage finish, then ends the thread."""
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        if self._device is not None:
            torch.cuda.set_device(self._device)
        while (command := self._queue.get()) is not None:
            started = time.perf_counter()
            try:
                results, frames = self._stage(command)
            except Exception as exc:  # run_stage answers its own errors; this is the lane's own failure
                log.exception("the stage lane failed on command %d", command.id)
                status = status_pb2.Status(code=code_pb2.INTERNAL, message=f"stage lane: {type(exc).__name__}: {exc}")
                results, frames = [wpb.RequestResult(request_id=rid, status=status) for rid in command.run_stage.request_ids], []
            self._reply(command.id, (time.perf_counter() - started) * 1e3, results, frames)

    def _stage(self, command: wpb.Command) -> tuple[list, list]:
        if self._stream is None:
            return self._run(command.run_stage)
        steps = self._steps
        self._stream.wait_stream(steps)  # a decode reads what the queued steps write
        with torch.cuda.stream(self._stream):
            results, frames = self._run(command.run_stage)
        self._stream.synchronize()
        for rid in command.run_stage.request_ids:
            state = self._state_of(rid)
            for tensor in tensors_of(state):
                if tensor.is_cuda:
                    tensor.record_stream(steps)
        return results, frames
