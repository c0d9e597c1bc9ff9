"""Batching policy: which command a worker group runs next.

Contract: given the jobs resident on one idle worker, return the next command's plan or None.
Non-denoising stages go first (they are short, and a newly encoded job joins the running batch
sooner; a decoded job frees its memory). Otherwise one denoising step for up to `max_batch`
jobs whose latents have the same shape, even at different step indices, oldest first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from diffserve.scheduler.jobs import Job
from diffserve.scheduler.lifecycle import Phase

STAGES = (Phase.ENCODE, Phase.PREPARE, Phase.DECODE)


@dataclass
class Plan:
    """One command: a stage for one job, or a denoising step for several."""

    phase: Phase
    jobs: list[Job]

    @property
    def stage(self) -> int:
        """The public diffserve.v1.Stage the command runs."""
        return self.phase.stage


def next_plan(jobs: Iterable[Job], max_batch: int) -> Plan | None:
    ready = sorted((j for j in jobs if j.phase.on_worker and not j.in_flight), key=lambda j: j.admitted_at)
    for job in ready:
        if job.phase in STAGES:
            return Plan(job.phase, [job])
    denoising = [j for j in ready if j.phase is Phase.DENOISE]
    if not denoising:
        return None
    key = denoising[0].shape_key
    return Plan(Phase.DENOISE, [j for j in denoising if j.shape_key == key][:max_batch])
