"""Pipelined steps' bookkeeping without a GPU: the fence lets the host run at most DEPTH steps ahead
(fake events record when they are waited on), and the step trace's idle arithmetic."""

from __future__ import annotations

from diffserve.worker.step_fence import DEPTH, StepFence
from diffserve.worker.step_trace import idle_summary


class FakeEvent:
    log: list

    def __init__(self):
        self.index = len(FakeEvent.created)
        FakeEvent.created.append(self)

    def record(self):
        FakeEvent.log.append(("record", self.index))

    def synchronize(self):
        FakeEvent.log.append(("wait", self.index))


def test_each_launch_waits_for_the_step_depth_commands_before():
    FakeEvent.created, FakeEvent.log = [], []
    fence = StepFence(None, depth=2, event_factory=FakeEvent)
    for step in range(5):
        fence.before_launch()
        FakeEvent.log.append(("launch", step))
        fence.launched()
    assert FakeEvent.log == [
        ("launch", 0), ("record", 0),
        ("launch", 1), ("record", 1),
        ("wait", 0), ("launch", 2), ("record", 2),  # step 2 is queued once step 0 has run: 2 in flight at most
        ("wait", 1), ("launch", 3), ("record", 3),
        ("wait", 2), ("launch", 4), ("record", 4),
    ]


def test_default_depth_and_no_fence_on_the_cpu():
    assert DEPTH == 2
    fence = StepFence("cpu")
    for _ in range(5):
        fence.before_launch()
        fence.launched()
    assert len(fence._launched) == 0


def test_idle_summary_merges_overlaps_and_counts_gaps():
    # busy 0-10, 5-12 (overlap), gap 0.05 ms, 12.05-20, gap 0.5 ms, 20.5-30 (microseconds ×1000)
    us = 1000.0
    intervals = [(0, 10 * us), (5 * us, 12 * us), (12.05 * us, 20 * us), (20.5 * us, 30 * us)]
    s = idle_summary(intervals, steps=3)
    assert abs(s["span_ms"] - 30) < 1e-9 and abs(s["idle_ms"] - 0.55) < 1e-9
    assert abs(s["largest_gap_ms"] - 0.5) < 1e-9 and s["gaps_over_0.1ms"] == 1
    assert abs(s["idle_per_step_ms"] - 0.55 / 3) < 1e-9
