"""Timing helpers for bench/: CUDA events after warm-up, median of repeats."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch


def time_ms(fn, warmup: int = 2, repeat: int = 5, cuda: bool = True) -> float:
    """Median time of fn() in ms: CUDA events on the current stream, or (cuda=False, CPU runs of
    the --tiny checks) wall time."""
    for _ in range(warmup):
        fn()
    if not cuda:
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def count_ops(fn) -> int:
    """aten ops one fn() call dispatches, views left out: on a GPU about one kernel launch each (an `empty` counts too)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    metadata = {torch.ops.aten._unsafe_view.default}  # a view by another name (what reshape returns after a copy)

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += not func.is_view and func not in metadata
            return func(*args, **(kwargs or {}))

    with Count() as count:
        fn()
    return count.ops


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm())


def card() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    return torch.cuda.get_device_name().replace("NVIDIA ", "").replace(" ", "-")


def results_name(suffix: str = "") -> str:
    """`<date>-<card>[-suffix].json`, the name results are written under."""
    return f"{time.strftime('%Y-%m-%d')}-{card()}{'-' + suffix if suffix else ''}.json"


def write_json(name: str, rows: list[dict], out: str | None = None) -> Path:
    folder = Path(out or os.environ.get("OUT", "bench/results"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(rows, indent=1))
    return folder / name


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(f"{r.get(c, '')}") for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(f"{r.get(c, '')}".ljust(w) for c, w in zip(columns, widths)))
