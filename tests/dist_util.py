"""Runs a function on N CPU processes joined by gloo (torch.distributed), as a worker group's ranks do."""

from __future__ import annotations

import tempfile

import torch.multiprocessing as mp


def init_url() -> str:
    """A fresh rendezvous for one process group: a file store in a new folder (no port to race for)."""
    return f"file://{tempfile.mkdtemp(prefix='dist-')}/store"


def run_group(fn, world_size: int, *args) -> None:
    """Calls fn(rank, world_size, init_method, *args) in `world_size` spawned processes; a failure
    (assertion or exception) in any rank is raised here."""
    mp.spawn(fn, args=(world_size, init_url(), *args), nprocs=world_size, join=True)
