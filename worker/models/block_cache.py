"""First-Block Cache, per request (issue 17): a step may skip every transformer block but the first
and reuse the residual the skipped blocks added at the last step that ran them.

The rule is diffusers' FirstBlockCache hook (diffusers/hooks/first_block_cache.py), applied to one
row (one request's conditional or unconditional pass, per expert) instead of a whole batch:

- the first block runs; its residual r = out_1 - in;
- if there is no residual from a computed step yet, or mean|r - r_prev| / mean|r_prev| > threshold,
  the remaining blocks run, r_prev = r and the tail residual t = out_last - out_1 are kept (for
  FLUX and Qwen-Image: of the image tokens, which are all the output head reads);
- otherwise the row's output is out_1 + t (r_prev stays the one from the last computed step).

The decision needs the ratio on the host (a sync per cached row and step, as in diffusers), so a
cached request gives up the step pipelining that exact requests get.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class Recorded:
    """A row cache's record: `history`, per step, True where the step ran the computation it may skip."""

    history: list[bool]

    @property
    def computed(self) -> int:
        return sum(self.history)

    @property
    def skipped(self) -> int:
        return len(self.history) - self.computed


@dataclass
class FirstBlockCache(Recorded):
    """One row's cache (a request's conditional or unconditional pass, per expert)."""

    threshold: float
    head_residual: torch.Tensor | None = None
    tail_residual: torch.Tensor | None = None
    history: list[bool] = field(default_factory=list)  # per step: True where every block ran

    def should_compute(self, residual: torch.Tensor) -> bool:
        """Whether the step runs the other blocks, from the first block's residual (1, L, D)."""
        compute = True
        if self.head_residual is not None and self.tail_residual is not None:
            previous = self.head_residual
            ratio = ((residual - previous).abs().mean() / previous.abs().mean()).item()
            compute = ratio > self.threshold
        self.history.append(compute)
        return compute

    def computed_step(self, residual: torch.Tensor, tail: torch.Tensor) -> None:
        # Copies: rows of the batch's tensors would keep the whole batch alive.
        self.head_residual, self.tail_residual = residual.clone(), tail.clone()

    def reuse(self, first: torch.Tensor) -> torch.Tensor:
        """The skipped step's output from the first block's (1, L, D)."""
        return self.tail_residual + first
