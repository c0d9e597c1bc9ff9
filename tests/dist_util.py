"""Runs a function on N CPU processes joined by gloo (torch.distributed), as a worker group's ranks do."""

from __future__ import annotations

import socket

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(fn, world_size: int, *args) -> None:
    """Calls fn(rank, world_size, init_method, *args) in `world_size` spawned processes; a failure
    (assertion or exception) in any rank is raised here."""
    mp.spawn(fn, args=(world_size, f"tcp://127.0.0.1:{free_port()}", *args), nprocs=world_size, join=True)
