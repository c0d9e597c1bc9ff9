"""Batching policy: which command a worker group runs next.

Contract: given the jobs resident on one idle worker, return the next command's plan or None.
Non-denoising stages go first (they are short, and a newly encoded job joins the running batch
sooner; a decoded job frees its memory). Otherwise one denoising step for up to `max_batch`
jobs whose latents have the same shape, even at different step indices, oldest first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from diffserve.v1 import generation_pb2 as pb

from diffserve.scheduler.jobs import Job, Pending

STAGES = (pb.STAGE_ENCODE, pb.STAGE_PREPARE, pb.STAGE_DECODE)


@dataclass
class Plan:
    """One command: a stage for one job, or a denoising step for several."""

    stage: int
    jobs: list[Job]


def next_plan(jobs: Iterable[Job], max_batch: int) -> Plan | None:
    ready = sorted((j for j in jobs if j.pending is Pending.NONE and not j.done), key=lambda j: j.admitted_at)
    for job in ready:
        if job.next_stage in STAGES:
            return Plan(job.next_stage, [job])
    denoising = [j for j in ready if j.next_stage == pb.STAGE_DENOISE]
    if not denoising:
        return None
    key = denoising[0].shape_key
    return Plan(pb.STAGE_DENOISE, [j for j in denoising if j.shape_key == key][:max_batch])
