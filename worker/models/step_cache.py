"""Step caching inside one batched forward (issue 17): every row (a request's conditional or
unconditional pass) carries its own cache and decides alone, as diffusers' hook would for that
request run alone. Rows that reuse their cache leave the batch for the computation they skip; the
others run on together. A row without a cache (None) is exact.

Where each policy cuts the forward, and when it decides:

- TaylorSeer (taylorseer_cache.py): the whole forward. Decided from the row's step index before
  the forward; a predicted row leaves the batch before the patch embedding (`forward_rows`).
- MagCache (mag_cache.py): the block stack. Decided from the row's step index and magnitude ratios
  before the forward; a skipping row's stack output is its input plus its cached residual.
- First-Block Cache (block_cache.py): the blocks after the first. Decided after the first block
  from its residual (a host sync per row); a skipping row adds its cached tail residual.

A model gives its block stack to `cached_blocks` as two functions over a *stream*, a tuple of
row-major tensors with the image tokens first ((x,) for Wan, (image, text) for FLUX and Qwen-Image):
`first(stream, rows)` runs block 0 and returns the stream; `rest(stream, rows)` runs the other
blocks and returns the image tokens. `rows` (indices into the forward's batch, None: all) lets them
pick their per-row side inputs (`take`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from diffserve.worker.models.block_cache import FirstBlockCache
from diffserve.worker.models.mag_cache import MagCache
from diffserve.worker.models.taylorseer_cache import TaylorSeerCache

RowCache = FirstBlockCache | TaylorSeerCache | MagCache | None
Rows = list[int] | None  # indices into a forward's batch; None: every row
Stream = tuple[torch.Tensor, ...]


def take(t: torch.Tensor | None, rows: Rows) -> torch.Tensor | None:
    """The rows `rows` of a row-major tensor (None stays None; rows None: all of it)."""
    if t is None or rows is None:
        return t
    return t.index_select(0, torch.tensor(rows, device=t.device))


def whole_outputs_only(caches: Sequence[RowCache]) -> bool:
    """True where every row is exact or TaylorSeer: each row then runs the whole forward or none of
    it, so the rows that run can take the model's plain forward (and its CUDA graph)."""
    return all(c is None or isinstance(c, TaylorSeerCache) for c in caches)


def forward_rows(caches: Sequence[RowCache], run: Callable[[Rows], torch.Tensor]) -> torch.Tensor:
    """The forward's output for every row: a TaylorSeer row whose step predicts takes its prediction
    and does not run; `run(rows)` computes the others ((len(rows), ...), rows None: all)."""
    predict = [isinstance(c, TaylorSeerCache) and not c.should_compute() for c in caches]
    keep = [i for i, p in enumerate(predict) if not p]
    out: list[torch.Tensor | None] = [None] * len(caches)
    if keep:
        y = run(None if len(keep) == len(caches) else keep)
        for j, i in enumerate(keep):
            if isinstance(caches[i], TaylorSeerCache):
                caches[i].update(y[j : j + 1])
            out[i] = y[j : j + 1]
        if len(keep) == len(caches):
            return y
    for i, p in enumerate(predict):
        if p:
            out[i] = caches[i].predict()
    return torch.cat(out)


def cached_blocks(
    stream: Stream,
    caches: Sequence[RowCache],
    first: Callable[[Stream, Rows], Stream],
    rest: Callable[[Stream, Rows], torch.Tensor],
) -> torch.Tensor:
    """The block stack's image tokens (B, L, D) for every row of `stream`, each row under its cache
    (MagCache and First-Block Cache; other rows run every block)."""
    x = stream[0]
    n = x.shape[0]
    live = [i for i, c in enumerate(caches) if not isinstance(c, MagCache) or c.should_compute()]
    out = x.clone() if len(live) < n else None
    if live:
        live_rows = None if len(live) == n else live
        inputs = tuple(take(t, live_rows) for t in stream)
        head = first(inputs, live_rows)
        residual = head[0] - inputs[0]
        compute = [not isinstance(caches[i], FirstBlockCache) or caches[i].should_compute(residual[j : j + 1])
                   for j, i in enumerate(live)]
        go = [j for j, c in enumerate(compute) if c]  # positions in `live` that run the other blocks
        if len(go) == len(live):
            tail = rest(head, live_rows)
        else:
            tail = head[0].clone()
            if go:
                y = rest(tuple(take(t, go) for t in head), [live[j] for j in go])
                tail.index_copy_(0, torch.tensor(go, device=x.device), y)
        for j, i in enumerate(live):
            cache = caches[i]
            if isinstance(cache, FirstBlockCache):
                if compute[j]:
                    cache.computed_step(residual[j : j + 1], tail[j : j + 1] - head[0][j : j + 1])
                else:
                    tail[j : j + 1] = cache.reuse(head[0][j : j + 1])
            elif isinstance(cache, MagCache):
                cache.computed_step(tail[j : j + 1] - inputs[0][j : j + 1])
        if out is None:
            return tail
        out.index_copy_(0, torch.tensor(live, device=x.device), tail)
    for i, cache in enumerate(caches):
        if i not in live:
            out[i : i + 1] = cache.reuse(x[i : i + 1])
    return out
