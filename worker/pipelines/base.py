"""What every pipeline offers the worker runtime, and the per-request state it keeps resident."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from diffserve.v1 import generation_pb2 as pb
from diffserve.worker.parallel.layout import Capabilities  # noqa: F401  (pipelines declare theirs)
from diffserve.worker.v1 import worker_pb2 as wpb


@dataclass(eq=False)
class RequestState:
    """One admitted request's tensors on the device, kept between commands. Families that keep more
    per request subclass it with typed fields (WanState, FluxState, ...)."""

    request_id: str
    request: wpb.Request  # the resolved request: the only input pipelines compute with
    cond: Any = None  # text conditioning rows, (1, L, D)
    uncond: Any = None  # negative conditioning; None without an unconditional row
    latents: Any = None  # float32, the family's latent layout
    sampler: Any = None
    timesteps: Any = None
    timesteps_host: Any = None  # the same on the CPU: decisions on a timestep never wait for the device
    step: int = 0  # denoising steps done
    step_caches: dict = field(default_factory=dict)  # (expert, unconditional) -> its step cache (pipelines/step_caches.py)
    loras: tuple = ()  # the request's LoRA adapters: (LoraWeights, scale) each, held while it is resident

    def start_sampling(self, sampler) -> None:
        """Takes a fresh sampler (timesteps set) and restarts the step count."""
        self.sampler = sampler
        self.timesteps = sampler.timesteps
        self.timesteps_host = sampler.timesteps.cpu()
        self.step = 0


class Pipeline(Protocol):
    """A model served by a worker, split into the stages the scheduler drives one command at a time.

    `forward(*args)` is the pipeline's single transformer call (all rows of one step group); the
    arguments at positions `forward_batched` have one entry per row, the others are shared. The
    runtime wraps it once with the cfg row split (parallel/cfg.py), so a pipeline never splits rows
    itself; denoise_step must call `self.forward`.
    """

    card: pb.Model
    capabilities: Capabilities
    forward_batched: tuple[int, ...]

    def admit(self, request_id: str, request: wpb.Request) -> RequestState: ...

    def encode(self, state: RequestState) -> None: ...

    # Optional: `encode_batch(states)` encodes several requests in one call (an ENCODE command may
    # carry several, scheduler/policy.py); without it the runtime calls `encode` for each.

    def prepare(self, state: RequestState) -> None: ...

    def forward(self, *args): ...

    def denoise_step(self, states: list[RequestState]) -> int:
        """Advances every state by one step, in one transformer forward where shapes allow;
        returns the number of transformer rows run."""

    def decode(self, state: RequestState) -> np.ndarray:
        """uint8 frames, (F, H, W, 3)."""
