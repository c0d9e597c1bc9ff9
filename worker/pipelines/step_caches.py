"""Each request's step caches (issue 17): made from its resolved StepCache, one per transformer row
kind (expert, conditional or unconditional pass), as diffusers keeps one state per cache context and
per hooked transformer. The caches themselves and how rows use them: worker/models/step_cache.py.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch

from diffserve.worker.models.block_cache import FirstBlockCache
from diffserve.worker.models.mag_cache import MagCache, mag_ratios
from diffserve.worker.models.step_cache import RowCache
from diffserve.worker.models.taylorseer_cache import TaylorSeerCache
from diffserve.worker.pipelines.base import RequestState
from diffserve.worker.v1 import worker_pb2 as wpb

FIRST_BLOCK = ("first-block",)
ALL_POLICIES = ("first-block", "taylorseer", "mag")


def new_cache(request: wpb.Request) -> RowCache:
    """A fresh row cache for the request's policy; ValueError for an unknown policy or a knob the
    scheduler should have filled."""
    c = request.cache
    if c.policy == "first-block":
        return FirstBlockCache(c.threshold)
    if c.policy == "taylorseer":
        cooldown = c.cooldown_step if c.HasField("cooldown_step") else None
        return TaylorSeerCache(interval=c.interval, max_order=c.max_order, warmup_steps=c.warmup_steps, cooldown_step=cooldown)
    if c.policy == "mag":
        # Without ratios: calibration, every step runs and records them (bench/mag_calibrate.py; the
        # scheduler never sends it: validation requires ratios).
        ratios = mag_ratios(list(c.mag_ratios), request.num_inference_steps) if c.mag_ratios else None
        if ratios is not None and c.max_skip_steps < 1:
            raise ValueError("mag needs max_skip_steps >= 1")
        return MagCache(threshold=c.threshold, max_skip_steps=c.max_skip_steps, warmup_steps=c.warmup_steps, ratios=ratios)
    raise ValueError(f"unknown step-caching policy {c.policy!r}")


def row_cache(state: RequestState, expert: int, uncond: bool) -> RowCache:
    """The state's cache for one row kind, made on first use; None where the request is exact."""
    if not state.request.cache.policy:
        return None
    key = (expert, uncond)
    if key not in state.step_caches:
        state.step_caches[key] = new_cache(state.request)
    return state.step_caches[key]


def row_caches(group: Sequence[RequestState], uncond: Sequence[bool], expert: Callable[[RequestState], int] = lambda s: 0):
    """Per transformer row of the group (each state's conditional row, then its unconditional one),
    its cache; None when no row of the group step-caches (the plain forward runs)."""
    if not any(s.request.cache.policy for s in group):
        return None
    return [row_cache(s, expert(s), u) for s, has_uncond in zip(group, uncond) for u in ((False, True) if has_uncond else (False,))]


def per_layout(keys: Sequence[Hashable], run: Callable[[list[int]], torch.Tensor]) -> list[torch.Tensor]:
    """Rows of several layouts (requests that would pack) with step caches: cached rows do not pack,
    so one cached forward per layout (`run(rows)` -> (len(rows), ...)), rows back in their order."""
    out: list[torch.Tensor | None] = [None] * len(keys)
    layouts: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        layouts.setdefault(key, []).append(i)
    for rows in layouts.values():
        y = run(rows)
        for j, i in enumerate(rows):
            out[i] = y[j]
    return out


def adapter_keys(keys: Sequence[Hashable], caches, loras) -> list[Hashable]:
    """The forward each row joins when rows step-cache or run LoRA adapters (`per_layout`'s keys): its
    layout, and where rows step-cache as well as run adapters, its adapter set too — a cached forward
    runs its later blocks on some of its rows only, so every row of one forward has the same adapters."""
    if caches is None or loras is None:
        return list(keys)
    return [(key, tuple((id(a), s) for a, s in loras[i])) for i, key in enumerate(keys)]


def pick(values: Sequence | None, rows: Sequence[int]) -> list | None:
    """The entries of a per-row list for `rows` (None stays None)."""
    return None if values is None else [values[i] for i in rows]
