"""MagCache, per request (issue 17): a step skips every transformer block, taking its input plus
the residual the blocks added at the last step that ran them, while the error that skipping
accumulates, estimated from the model's magnitude ratios, stays small.

The rule is diffusers' MagCache hooks (diffusers/hooks/mag_cache.py), applied to one row (one
request's conditional or unconditional pass, per expert) instead of a whole batch:

- step s < warmup_steps (diffusers: int(retention_ratio * num_inference_steps + 0.5)) runs;
- after it, ratio *= mag_ratios[s] (1.0 past their end), skips += 1, error += |1 - ratio|; the step
  skips if a residual exists, error <= threshold and skips <= max_skip_steps; otherwise it runs and
  ratio, skips and error restart at 1, 0, 0;
- a step that runs keeps the residual r = out_last_block - in_first_block; one that skips outputs
  in_first_block + r.

The magnitude ratios are the model's (and sampler's): mean over tokens of |r_s| / |r_{s-1}|, which
`calibrate` mode records while every step runs (diffusers' calibration), nearest-interpolated to
the request's step count. The accumulation runs on float32 CPU scalars as diffusers' does (its
ratios are a float32 tensor), so the decisions are the same bit for bit and need no device sync.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffserve.worker.models.block_cache import Recorded


def nearest_interp(ratios: torch.Tensor, length: int) -> torch.Tensor:
    """`ratios` resampled to `length` entries by nearest neighbour (diffusers' mag_cache.nearest_interp)."""
    if length == 1:
        return ratios[-1:]
    scale = (len(ratios) - 1) / (length - 1)
    grid = torch.arange(length, dtype=torch.float32)
    return ratios[torch.round(grid * scale).long()]


def mag_ratios(values: list[float], num_steps: int) -> torch.Tensor:
    """The per-step ratios a request gives, as diffusers' MagCacheConfig keeps them (float32, one per step)."""
    ratios = torch.tensor(values, dtype=torch.float32)
    return ratios if len(ratios) == num_steps else nearest_interp(ratios, num_steps)


@dataclass
class MagCache(Recorded):
    """One row's MagCache state. `ratios` None: calibration (every step runs; `calibration` records
    the ratios)."""

    threshold: float
    max_skip_steps: int
    warmup_steps: int
    ratios: torch.Tensor | None  # float32 (num_steps,), on the CPU
    residual: torch.Tensor | None = None  # (1, L, D) from the last step that ran the blocks
    step: int = 0
    accumulated_ratio: float | torch.Tensor = 1.0
    accumulated_err: float | torch.Tensor = 0.0
    accumulated_steps: int = 0
    calibration: list[float] = field(default_factory=list)
    history: list[bool] = field(default_factory=list)  # per step: True where the blocks ran

    def should_compute(self) -> bool:
        """Decides this step (before the forward; `computed_step` or `reuse` ends it)."""
        compute = True
        if self.ratios is not None and self.step >= self.warmup_steps:
            scale = self.ratios[self.step] if self.step < len(self.ratios) else 1.0
            self.accumulated_ratio = self.accumulated_ratio * scale
            self.accumulated_steps += 1
            self.accumulated_err = self.accumulated_err + abs(1.0 - self.accumulated_ratio)
            if (self.residual is not None and bool(self.accumulated_err <= self.threshold)
                    and self.accumulated_steps <= self.max_skip_steps):
                compute = False
            else:
                self.accumulated_ratio, self.accumulated_steps, self.accumulated_err = 1.0, 0, 0.0
        self.history.append(compute)
        return compute

    def computed_step(self, residual: torch.Tensor) -> None:
        """The blocks ran: `residual` (1, L, D) = last block's output - first block's input."""
        if self.ratios is None:
            self.calibration.append(1.0 if self.residual is None else self._ratio(residual))
        self.residual = residual.clone()  # a copy: a row of the batch would keep the whole batch alive
        self.step += 1

    def reuse(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks skipped: the row's output from its first block's input `x` (1, L, D)."""
        self.step += 1
        return x + self.residual

    def _ratio(self, residual: torch.Tensor) -> float:
        current = torch.linalg.norm(residual.float(), dim=-1)
        previous = torch.linalg.norm(self.residual.float(), dim=-1)
        return (current / (previous + 1e-8)).mean().item()
