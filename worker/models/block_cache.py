"""First-Block Cache, per request (issue 17): a step may skip every transformer block but the first
and reuse the residual the skipped blocks added at the last step that ran them.

The rule is diffusers' FirstBlockCache hook (diffusers/hooks/first_block_cache.py), applied to one
row (one request's conditional or unconditional pass) instead of a whole batch:

- the first block runs; its residual r = out_1 - in;
- if there is no residual from a computed step yet, or mean|r - r_prev| / mean|r_prev| > threshold,
  the remaining blocks run, r_prev = r and the tail residual t = out_last - out_1 are kept;
- otherwise the row's output is out_1 + t (r_prev stays the one from the last computed step).

The decision needs the ratio on the host (a sync per cached row and step, as in diffusers), so a
cached request gives up the step pipelining that exact requests get.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

POLICIES = ("first-block",)


@dataclass
class FirstBlockCache:
    """One row's cache (a request's conditional or unconditional pass, per expert)."""

    threshold: float
    head_residual: torch.Tensor | None = None
    tail_residual: torch.Tensor | None = None
    computed: int = field(default=0)  # steps that ran every block
    skipped: int = field(default=0)

    def should_compute(self, residual: torch.Tensor) -> bool:
        if self.head_residual is None or self.tail_residual is None:
            return True
        previous = self.head_residual
        ratio = ((residual - previous).abs().mean() / previous.abs().mean()).item()
        return ratio > self.threshold

    def computed_step(self, residual: torch.Tensor, tail: torch.Tensor) -> None:
        self.head_residual, self.tail_residual = residual, tail
        self.computed += 1
