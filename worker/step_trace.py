"""Benchmark instruments of the step path (off unless their environment variable is set).

DIFFSERVE_STEP_TRACE=FILE: the torch profiler records the device's kernels over denoising commands
SKIP+1 … SKIP+COUNT of this worker (DIFFSERVE_STEP_TRACE_WINDOW="SKIP:COUNT", default 20:25) and
writes a JSON summary to FILE: the device's busy intervals merged, the idle time between them per
step (first kernel of the window to the last), the largest gap and the gaps over 0.1 ms. This is the
"GPU idle between consecutive steps" of pipelined steps (bench/NOTES.md), measured through the
real service: command, Result, the scheduler's answer and the next launch all happen inside it.

DIFFSERVE_SYNC_DEBUG=warn|error: torch.cuda.set_sync_debug_mode around each step's launch, so any
host synchronisation left in the step path is reported (warn: logged with its stack) or fails the
step (error).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile

import torch

log = logging.getLogger(__name__)

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def idle_summary(intervals: list[tuple[float, float]], steps: int) -> dict:
    """Busy intervals (start_us, end_us) of the device → the gaps between their union's pieces."""
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    gaps = [b[0] - a[1] for a, b in zip(merged, merged[1:])]
    span = merged[-1][1] - merged[0][0] if merged else 0.0
    idle = sum(gaps)
    return {
        "steps": steps,
        "span_ms": span / 1e3,
        "busy_ms": (span - idle) / 1e3,
        "idle_ms": idle / 1e3,
        "idle_per_step_ms": idle / 1e3 / max(steps, 1),
        "largest_gap_ms": max(gaps, default=0.0) / 1e3,
        "gaps_over_0.1ms": sum(g > 100 for g in gaps),
        "gaps_over_0.1ms_total_ms": sum(g for g in gaps if g > 100) / 1e3,
    }


class StepTrace:
    def __init__(self, path: str, skip: int, count: int):
        self.path, self.skip, self.count = path, skip, count
        self.seen = 0
        self._profiler = None

    @classmethod
    def from_env(cls, device) -> StepTrace | None:
        path = os.environ.get("DIFFSERVE_STEP_TRACE", "")
        if not path or device is None or torch.device(device).type != "cuda":
            return None
        skip, count = (int(x) for x in os.environ.get("DIFFSERVE_STEP_TRACE_WINDOW", "20:25").split(":"))
        return cls(path, skip, count)

    def before_step(self) -> None:
        self.seen += 1
        if self.seen == self.skip + 1:
            from torch.profiler import ProfilerActivity, profile

            self._profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self._profiler.__enter__()

    def after_step(self) -> None:
        if self._profiler is None or self.seen < self.skip + self.count:
            return
        torch.cuda.synchronize()  # the window's last step has run
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        with tempfile.TemporaryDirectory() as tmp:
            trace = os.path.join(tmp, "trace.json")
            profiler.export_chrome_trace(trace)
            with open(trace) as f:
                events = json.load(f).get("traceEvents", [])
        intervals = [(e["ts"], e["ts"] + e.get("dur", 0)) for e in events if e.get("cat") in DEVICE_CATEGORIES and "ts" in e]
        summary = idle_summary(intervals, self.count)
        summary["device_events"] = len(intervals)
        with open(self.path, "w") as f:
            json.dump(summary, f, indent=1)
        log.info("step trace: %s", summary)


class SyncDebug:
    """torch.cuda.set_sync_debug_mode(mode) while a step launches (DIFFSERVE_SYNC_DEBUG)."""

    def __init__(self, mode: str):
        self.mode = mode

    @classmethod
    def from_env(cls, device) -> SyncDebug | None:
        mode = os.environ.get("DIFFSERVE_SYNC_DEBUG", "")
        if not mode or device is None or torch.device(device).type != "cuda":
            return None
        return cls(mode)

    def __enter__(self):
        torch.cuda.set_sync_debug_mode(self.mode)

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(0)
