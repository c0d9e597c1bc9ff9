"""One denoising step for every family: rows in, one transformer forward per group, guidance
combined per request, each request's own sampler advanced.

A family supplies `rows(group, uncond)` (its transformer's arguments for a group of states: each
state's conditional row, then its unconditional row where it has one) and a `Guide`:

- `Cfg()`: classifier-free guidance, `uncond + s * (cond - uncond)` with s from the request's
  `cfg_scales` (per expert, highest noise first); a request with no scales has no unconditional row.
- `Cfg(norm_rescale=True)`: the same, then each token rescaled to the conditional prediction's norm
  (Qwen-Image's true CFG).
- `Unguided()`: one row per request (embedded guidance or none: FLUX, HunyuanVideo, FastWan).

Guidance and the sampler update are per request, so a request's result does not depend on what
it is batched with.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

from diffserve.worker.pipelines.base import RequestState
from diffserve.worker.v1 import worker_pb2 as wpb


@dataclass(frozen=True)
class Cfg:
    """Classifier-free guidance; `norm_rescale` keeps each token's norm of the conditional prediction."""

    norm_rescale: bool = False

    def unconditional(self, request: wpb.Request) -> bool:
        return len(request.cfg_scales) > 0

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        guided = uncond + scale * (cond - uncond)
        if self.norm_rescale:
            guided = guided * (cond.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))
        return guided


@dataclass(frozen=True)
class Unguided:
    """One conditional row per request; any guidance is an input of the transformer."""

    def unconditional(self, request: wpb.Request) -> bool:
        return False

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        raise AssertionError("an unguided step has no unconditional row")


Guide = Cfg | Unguided


def cfg_scale(request: wpb.Request, expert: int = 0) -> float:
    """The request's CFG scale for an expert (0: the highest-noise one); a single scale serves all."""
    scales = request.cfg_scales
    return scales[min(expert, len(scales) - 1)]


def per_row(group: Sequence[RequestState], uncond: Sequence[bool], value: Callable[[RequestState], object]) -> list:
    """`value(state)` once per transformer row: once per state, twice where it has an unconditional row."""
    return [v for s, u in zip(group, uncond) for v in [value(s)] * (1 + u)]


def contexts(group: Sequence[RequestState], uncond: Sequence[bool]) -> list[torch.Tensor]:
    """The text rows, in row order: each state's prompt, then its negative prompt where it has one."""
    return [c for s, u in zip(group, uncond) for c in ([s.cond, s.uncond] if u else [s.cond])]


def pad_texts(texts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """(1, S_i, D) rows of different lengths -> (R, S_max, D) right-padded with zeros, and each S_i."""
    lengths = [t.shape[1] for t in texts]
    longest = max(lengths)
    return torch.cat([torch.nn.functional.pad(t, (0, 0, 0, longest - t.shape[1])) for t in texts]), lengths


Rows = Callable[[list[RequestState], list[bool]], tuple]


@torch.no_grad()
def run_step(
    states: Sequence[RequestState],
    *,
    guide: Guide,
    rows: Rows,
    forward: Callable[..., torch.Tensor],
    key: Callable[[RequestState], Hashable] = lambda s: 0,
    expert: Callable[[RequestState], int] = lambda s: 0,
    prediction: Callable[[torch.Tensor, RequestState], torch.Tensor] = lambda out, s: out,
) -> int:
    """Advances every state by one step; returns the number of transformer rows run.

    States with equal `key(state)` (expert, latent layout) share one `forward(*rows(group, uncond))`,
    which returns the rows stacked, or a list of rows (packed requests of different shapes).
    `prediction(out, state)` turns a state's (1, ...) output row into what the sampler takes (a crop,
    a dtype); `expert(state)` picks the request's CFG scale.
    """
    groups: dict[Hashable, list[RequestState]] = {}
    for s in states:
        groups.setdefault(key(s), []).append(s)
    total = 0
    for group in groups.values():
        uncond = [guide.unconditional(s.request) for s in group]
        pred = forward(*rows(group, uncond))  # (rows, ...), or a list of (...) rows

        def out(i: int) -> torch.Tensor:  # row i as (1, ...)
            return pred[i : i + 1] if torch.is_tensor(pred) else pred[i][None]

        row = 0
        for s, u in zip(group, uncond):
            flow = prediction(out(row), s)
            if u:
                flow = guide.combine(flow, prediction(out(row + 1), s), cfg_scale(s.request, expert(s)))
            row += 1 + u
            s.latents = s.sampler.step(flow, s.timesteps[s.step], s.latents, return_dict=False)[0]
            s.step += 1
        total += row
    return total
