"""Pipelined steps: how far the host may run ahead of the GPU.

The step path has no host synchronisation (samplers keep their coefficients on the host, timestep
decisions read a host copy), so a denoising command returns as soon as its kernels are queued and
its Result goes out while the GPU still runs it. The scheduler answers with the next command, which
the worker therefore holds before the current step finishes on the GPU (vLLM v1's async
scheduling, with the scheduler's own round trip hidden behind the step).

Left alone, the host would run ahead by any number of steps: progress would be reported for steps
the GPU has not run, and a cancel would act many steps late. `StepFence` bounds it: before a step
is launched, the step launched `DEPTH` commands earlier must have finished on the GPU. With DEPTH
2 the GPU has the next step queued behind the running one (no idle between steps, even for the
launch of the first kernel), and what the scheduler sees is at most two steps ahead of the GPU:
cancellation, deadlines and batch changes act at a step boundary, at most two steps of GPU work
later than without pipelining (docs/architecture.md). On the CPU every op is synchronous: no fence.
"""

from __future__ import annotations

from collections import deque

import torch

DEPTH = 2  # denoising steps queued on the device at most (the running one included)


class StepFence:
    def __init__(self, device, depth: int = DEPTH, event_factory=None):
        self.depth = depth
        on_cuda = device is not None and torch.device(device).type == "cuda"
        self._event = event_factory or (torch.cuda.Event if on_cuda else None)
        self._launched: deque = deque()

    def before_launch(self) -> None:
        """Waits until fewer than `depth` steps are queued on the device."""
        while len(self._launched) >= self.depth:
            self._launched.popleft().synchronize()

    def launched(self) -> None:
        """Marks the end of a step's work on the current stream."""
        if self._event is not None:
            event = self._event()
            event.record()
            self._launched.append(event)
