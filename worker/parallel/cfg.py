"""Row parallelism over the cfg axis: the transformer rows of a step (conditional and
unconditional rows of CFG requests, or the requests of a batch) split across the cfg ranks and
gathered once per step."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from diffserve.worker.parallel.state import ParallelState


def split_rows(state: ParallelState, model, batched: tuple[int, ...] = (0, 1, 2)):
    """Wraps model(*args) so each cfg rank runs an equal contiguous share of the rows and all
    ranks get every row's output (one all-gather per step). `batched` are the positions of the
    arguments that have one row per batch row (tensors, lists or None); the others are shared. With one
    CFG request the conditional row runs on cfg rank 0 and the unconditional row on cfg rank 1."""
    if state.dims.cfg == 1:
        return model

    def run(*args):
        rows, n = args[batched[0]].shape[0], state.dims.cfg
        share = math.ceil(rows / n)
        pad = share * n - rows
        lo = state.cfg_rank * share
        args = list(args)
        for i in batched:
            a = args[i]
            if a is None:
                continue
            if isinstance(a, list):  # one entry per row (a row's LoRA adapters): the same split
                args[i] = (a + a[-1:] * pad)[lo : lo + share]
                continue
            if pad:  # repeat the last row so every rank runs the same count
                a = torch.cat([a, a[-1:].expand(pad, *a.shape[1:])])
            args[i] = a[lo : lo + share]
        out = model(*args).contiguous()
        gathered = [torch.empty_like(out) for _ in range(n)]
        dist.all_gather(gathered, out, group=state.cfg_group)
        return torch.cat(gathered)[:rows]

    return run
