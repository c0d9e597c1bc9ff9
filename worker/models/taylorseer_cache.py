"""TaylorSeer, per request (issue 17): on most steps the model's output is not computed but
predicted from a Taylor expansion of the outputs of the last steps that ran the model.

The rule is diffusers' TaylorSeer hook (diffusers/hooks/taylorseer_cache.py) in its lite mode
(`use_lite_mode=True`: every block skipped, `proj_out`'s output predicted), applied to one row (one
request's conditional or unconditional pass, per expert) instead of a whole batch. Its default mode
hooks modules named like `...attn`, which Wan's (`attn1`, `attn2`) are not: on Wan it changes nothing.
The output head after `proj_out` is a reshape, so predicting the model's output is predicting
`proj_out`'s, element for element.

- each call is step s = 0, 1, ... of the row; it runs the model when s < warmup_steps, when
  (s - warmup_steps - 1) % interval == 0, or when s >= cooldown_step;
- a step that runs stores the output as factor 0 and the divided differences
  f_{j+1} = (f_j(new) - f_j(old)) / (s - s_last) up to `max_order` (as far as older factors exist);
- a step that predicts returns sum_j f_j * (s - s_last)^j / j!.

The decision depends on the step index only, so it is made before the forward: a predicted row
leaves the batch entirely, and no host synchronisation is needed. Factors are kept in the model's
dtype (diffusers' `taylor_factors_dtype` defaults to bfloat16, the dtype the worker runs in on a GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from diffserve.worker.models.block_cache import Recorded


@dataclass
class TaylorSeerCache(Recorded):
    """One row's TaylorSeer state: its step counter and the Taylor factors of its output."""

    interval: int
    max_order: int
    warmup_steps: int
    cooldown_step: int | None = None  # steps from this one on always run the model; None: none
    step: int = -1  # the current call's step index (diffusers counts calls per cache context)
    last_update: int | None = None
    factors: list[torch.Tensor] = field(default_factory=list)  # f_0 (the output), f_1, ...
    history: list[bool] = field(default_factory=list)  # per step: True where the model ran

    def __post_init__(self) -> None:
        if self.interval < 1 or self.max_order < 1 or self.warmup_steps < 0:
            raise ValueError(f"TaylorSeer needs interval >= 1, max_order >= 1, warmup_steps >= 0 "
                             f"(got {self.interval}, {self.max_order}, {self.warmup_steps})")

    def should_compute(self) -> bool:
        """Advances to the next step and says whether it runs the model (else: `predict`)."""
        self.step += 1
        s = self.step
        compute = (
            s < self.warmup_steps
            or (s - self.warmup_steps - 1) % self.interval == 0
            or (self.cooldown_step is not None and s >= self.cooldown_step)
            or self.last_update is None  # nothing to predict from (diffusers would raise)
        )
        self.history.append(compute)
        return compute

    def update(self, output: torch.Tensor) -> None:
        """The step ran the model: `output` (1, ...) becomes factor 0, differences the higher ones."""
        new = [output.clone()]  # a copy: a row of the batch's output would keep the whole batch alive
        if self.last_update is not None:
            delta = self.step - self.last_update
            for j in range(min(self.max_order, len(self.factors))):
                if self.factors[j].shape != new[j].shape:
                    break
                new.append((new[j] - self.factors[j].to(output.dtype)) / delta)
        self.factors, self.last_update = new, self.step

    def predict(self) -> torch.Tensor:
        """The step's output (1, ...) from the factors of the last step that ran."""
        offset = self.step - self.last_update
        out = torch.zeros_like(self.factors[0])
        for order, factor in enumerate(self.factors):
            out = out + factor * (offset**order / math.factorial(order))
        return out
