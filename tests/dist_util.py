"""Runs a function on N CPU processes joined by gloo (torch.distributed), as a worker group's ranks do."""

from __future__ import annotations

import tempfile

import torch.multiprocessing as mp


def _rank(rank: int, fn, *args) -> None:
    """One rank: fn, then its process group destroyed before the process exits (a gloo group left
    to interpreter shutdown can abort the process, "terminate called without an active exception",
    when its threads outlive the objects they use)."""
    import torch.distributed as dist

    try:
        fn(rank, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_group(fn, world_size: int, *args) -> None:
    """Calls fn(rank, world_size, init_method, *args) in `world_size` spawned processes, which meet
    at a file store in a new folder (no port to race for), removed afterwards; a failure (assertion
    or exception) in any rank is raised here."""
    with tempfile.TemporaryDirectory(prefix="dist-") as folder:
        mp.spawn(_rank, args=(fn, world_size, f"file://{folder}/store", *args), nprocs=world_size, join=True)
