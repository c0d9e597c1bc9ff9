"""The policy: stages first, then one step for same-shape jobs (batched, capped), the shape chosen
by a fair share of worker time weighted by priority; and the queue's order (priority, aging,
submission time) in admission."""

from __future__ import annotations

import asyncio
import random

import pytest

from diffserve.scheduler.admission import Admission
from diffserve.scheduler.auth import PriorityRule
from diffserve.scheduler.errors import RequestError
from diffserve.scheduler.jobs import Job, JobTable
from diffserve.scheduler.lifecycle import Event, Phase
from diffserve.scheduler.policy import Accounts, FairShare, Packing, next_plan
from diffserve.scheduler.priorities import JobQueue
from diffserve.scheduler.registry import WorkerRegistry
from diffserve.v1 import generation_pb2 as pb
from diffserve.worker.v1 import worker_pb2 as wpb


pytestmark = pytest.mark.usefixtures("event_loop_for_jobs")  # tests/conftest.py


def job(age: float, phase: Phase = Phase.DENOISE, height: int = 32, step: int = 0, steps: int = 10, priority: int = 0) -> Job:
    j = Job(params=pb.GenerationParams(prompt="x", height=height, width=32, num_frames=1, num_inference_steps=steps), priority=priority)
    j.phase, j.admitted_at, j.step = phase, age, step
    return j


def test_stage_before_denoise():
    a, b = job(1), job(2, phase=Phase.ENCODE)
    plan = next_plan([a, b], 4)
    assert plan.stage == pb.STAGE_ENCODE and plan.jobs == [b]


def test_stages_by_priority_then_age():
    a, b, c = job(1, phase=Phase.ENCODE), job(2, phase=Phase.DECODE, priority=5), job(3, phase=Phase.PREPARE)
    assert next_plan([a, b, c], 4).jobs == [b]


def test_encodes_and_prepares_go_together_decodes_one_at_a_time():
    """The first stage's job takes the others waiting at the same ENCODE or PREPARE along (up to the
    batch size, by priority then age); a DECODE runs alone."""
    enc = [job(age, phase=Phase.ENCODE) for age in (5, 3, 4)]
    late = job(6, phase=Phase.ENCODE, priority=9)
    dec, prep = job(1, phase=Phase.DECODE), job(2, phase=Phase.PREPARE)
    assert next_plan([*enc, dec, prep], 4).jobs == [dec]
    assert next_plan([*enc, prep], 4).jobs == [prep]
    plan = next_plan([*enc, late], 3)
    assert plan.stage == pb.STAGE_ENCODE and plan.jobs == [late, enc[1], enc[2]]
    enc[1].in_flight = True
    assert next_plan(enc, 4).jobs == [enc[2], enc[0]]
    twice = [job(1, phase=Phase.DECODE), job(2, phase=Phase.DECODE)]
    assert next_plan(twice, 4).jobs == [twice[0]]


def test_same_shape_batched_across_steps_oldest_first():
    a, b, c, d = job(1, step=5), job(2, height=64), job(3, step=1), job(4)
    plan = next_plan([d, c, b, a], 2)
    assert plan.stage == pb.STAGE_DENOISE and plan.jobs == [a, c]


def test_in_flight_and_done_jobs_skipped():
    a, b = job(1), job(2)
    a.in_flight = True
    b.phase = Phase.CANCELLED
    assert next_plan([a, b], 4) is None


# ---- mixed-shape packing ----

def tokens(j: Job) -> int:
    return (j.params.height // 16) * (j.params.width // 16)  # 32x32 -> 4, 64x32 -> 8, 256x32 -> 32


def test_packing_adds_other_shapes_within_the_token_budget_and_the_batch():
    a, b, c, d = job(1), job(2, height=64), job(3, height=64), job(4, height=256)
    # Without packing: one shape per step. With it: the chosen group, then others while they fit.
    assert next_plan([a, b, c, d], 4).jobs == [a]
    assert next_plan([a, b, c, d], 4, packing=Packing(tokens, 20)).jobs == [a, b, c]  # 4 + 8 + 8; the 256 (32) does not fit
    assert next_plan([a, b, c, d], 2, packing=Packing(tokens, 100)).jobs == [a, b]  # max_batch still bounds it
    assert next_plan([a, b, c, d], 4, packing=Packing(tokens, 0)).jobs == [a]  # budget 0: off
    big = job(0, height=256)
    assert next_plan([big, a], 4, packing=Packing(tokens, 20)).jobs == [big]  # the chosen group alone may exceed it


def test_a_packed_step_is_charged_to_each_shape_by_its_tokens():
    a, b = job(1), job(2, height=64)
    accounts = Accounts()
    plan = next_plan([a, b], 4, accounts, Packing(tokens, 100))
    assert plan.jobs == [a, b]
    accounts.charge(plan, 1.2, tokens)  # tokens 4 and 8: a third and two thirds
    assert accounts.vtime[a.shape_key] == pytest.approx(0.4) and accounts.vtime[b.shape_key] == pytest.approx(0.8)
    assert accounts.last_s[a.shape_key] == pytest.approx(0.4) and accounts.served[a.shape_key] == accounts.served[b.shape_key] == 0


# ---- the fair share, on a simulated worker ----

STEP_S = {32: 0.02, 64: 0.1, 256: 1.0}  # a denoising step's time by height
STAGE_S = 0.01


def simulate(jobs: list[Job], arrivals: list[tuple[float, Job]] = (), max_batch: int = 4, until: float = 1e9):
    """Runs the policy on one simulated worker from time 0: each command takes its step time,
    charged to the policy as steps.py does. Returns ({job: finish time}, [(start, plan)])."""
    share = FairShare()
    resident, pending = list(jobs), sorted(arrivals, key=lambda a: a[0])
    clock, done, log = 0.0, {}, []
    while clock < until:
        while pending and pending[0][0] <= clock:
            resident.append(pending.pop(0)[1])
        plan = share.next_plan("w", resident, max_batch)
        if plan is None:
            if not pending:
                break
            clock = pending[0][0]
            continue
        log.append((clock, plan))
        took = STEP_S[plan.jobs[0].params.height] if plan.phase is Phase.DENOISE else STAGE_S
        clock += took
        share.charge("w", plan, took)
        for j in plan.jobs:
            if plan.phase is Phase.DENOISE:
                j.step += 1
                if j.step == j.total_steps:
                    j.phase = Phase.DECODE
            elif plan.phase is Phase.DECODE:
                j.phase = Phase.SUCCEEDED
                done[j] = clock
                resident.remove(j)
            else:
                j.phase = Phase.PREPARE if plan.phase is Phase.ENCODE else Phase.DENOISE
    return done, log


def test_a_short_job_does_not_wait_for_a_long_one():
    # The measured case: a 2-step 32x32 job arrives while a 300-step 256x256 job runs.
    long = job(0, height=256, steps=300)
    short = job(5.5, phase=Phase.ENCODE, steps=2)
    done, _ = simulate([long], [(5.5, short)])
    alone = 3 * STAGE_S + 2 * STEP_S[32]
    # It waits for the long step in flight when it arrived (0.5 s) at most, not for 295 steps.
    assert done[short] - 5.5 - alone <= STEP_S[256] + 1e-9
    assert done[long] == pytest.approx(300 * STEP_S[256] + alone + STAGE_S)  # the long job lost only that time


def test_the_oldest_shape_no_longer_runs_to_the_end():
    # Before: the oldest job's shape ran every step first. Now the two shapes interleave.
    a, b = job(1, height=256, steps=20), job(2, height=64, steps=20)
    _, log = simulate([a, b])
    heights = [p.jobs[0].params.height for _, p in log if p.phase is Phase.DENOISE]
    assert heights[:3] == [256, 64, 64] and heights.index(64) == 1
    assert 256 in heights[heights.index(64):]  # the long shape comes back before the short one ends
    # Worker time splits evenly while both run: 10 short steps (1 s) per long step (1 s).
    first_short_done = next(i for i, h in enumerate(heights) if heights[: i + 1].count(64) == 20)
    long_steps = heights[: first_short_done + 1].count(256)
    assert 2 <= long_steps <= 4


def test_a_new_group_has_no_credit_from_before_it_arrived(monkeypatch):
    a = job(0, height=64, steps=200)
    b = job(5.0, height=32, steps=200)  # 5 s later, with the same step time as a
    monkeypatch.setitem(STEP_S, 32, STEP_S[64])
    _, log = simulate([a], [(5.0, b)], until=7.0)
    after = [p.jobs[0] for t, p in log if t >= 5.0]
    # They alternate from its arrival on: b does not run for a's 5 s of history.
    assert abs(sum(j is a for j in after) - sum(j is b for j in after)) <= 1
    assert all(x is not y for x, y in zip(after, after[1:]))


def test_priority_weights_the_share(monkeypatch):
    lo, hi = job(0, height=64, steps=1000), job(0, height=256, steps=1000, priority=10)  # +10: twice the share
    monkeypatch.setitem(STEP_S, 256, STEP_S[64])
    _, log = simulate([lo, hi], until=30.0)
    steps = [p.jobs[0] for _, p in log if p.phase is Phase.DENOISE]
    assert sum(j is hi for j in steps) / sum(j is lo for j in steps) == pytest.approx(2.0, rel=0.05)


def test_no_resident_job_starves(monkeypatch):
    # A far higher priority (weight 2**5) and two other shapes: every group keeps progressing.
    top, mid, low = job(0, height=256, steps=10_000, priority=50), job(1, height=64, steps=10_000), job(2, height=32, steps=10_000, priority=-20)
    monkeypatch.setitem(STEP_S, 256, 0.1)  # top: 0.1 s steps, mid 0.1 s, low 0.02 s
    _, log = simulate([top, mid, low], until=60.0)
    ran = [p.jobs[0] for _, p in log]
    for j in (top, mid, low):
        gaps = [b - a for a, b in zip([i for i, x in enumerate(ran) if x is j], [i for i, x in enumerate(ran) if x is j][1:])]
        assert j.step > 10 and max(gaps) < 200, (j.priority, j.step, max(gaps))
    # Worker time in proportion to the weights 2**5 : 1 : 2**-2 (cheap low steps are more steps).
    seconds = [j.step * STEP_S[j.params.height] for j in (top, mid, low)]
    assert seconds[0] / seconds[1] == pytest.approx(32, rel=0.15) and seconds[1] / seconds[2] == pytest.approx(4, rel=0.15)


def test_batching_is_kept_under_the_fair_share():
    same = [job(i, height=64, steps=4) for i in range(5)]
    other = job(10, height=256, steps=2)
    _, log = simulate([*same, other], max_batch=4)
    sizes = [len(p.jobs) for _, p in log if p.phase is Phase.DENOISE and p.jobs[0].params.height == 64]
    assert max(sizes) == 4 and sum(sizes) == 5 * 4
    first = next(p for _, p in log if p.phase is Phase.DENOISE)
    assert first.jobs == same[:4]  # oldest first within the group


def test_higher_priority_first_within_a_batch():
    a, b, c = job(1), job(2, priority=3), job(3)
    assert next_plan([a, b, c], 2).jobs == [b, a]


def test_a_lost_worker_is_forgotten():
    share = FairShare()
    a = job(1)
    plan = share.next_plan("w", [a], 4)
    share.charge("w", plan, 1.0)
    share.forget("w")
    share.charge("w", plan, 1.0)  # a late charge for a forgotten worker is ignored
    assert share.next_plan("w", [a], 4).jobs == [a]


# ---- the queue's order ----


def queued(seconds: float, priority: int = 0) -> Job:
    j = Job(params=pb.GenerationParams(prompt="x"), priority=priority)
    j.created.seconds, j.created.nanos = int(seconds), int(round((seconds % 1) * 1e9))
    return j


def test_queue_higher_priority_first_ties_by_submission():
    q = JobQueue(aging_s=30)
    a, b, c, d = queued(100), queued(101, priority=2), queued(102), queued(103, priority=2)
    for j in (a, b, c, d):
        q.add(j)
    assert list(q) == [b, d, a, c]
    assert [q.index(j) for j in (b, d, a, c)] == [0, 1, 2, 3]


def test_queue_aging_lets_a_waiting_job_overtake_later_priorities():
    q = JobQueue(aging_s=30)
    old = queued(1000)  # priority 0, waited 95 s when the others arrive
    later = [queued(1095, priority=3), queued(1095, priority=4)]
    for j in (old, *later):
        q.add(j)
    # 95 s of waiting is worth 3.17 points: ahead of priority 3 submitted then, behind priority 4.
    assert list(q) == [later[1], old, later[0]]
    strict = JobQueue(aging_s=0)
    for j in (old, *later):
        strict.add(j)
    assert list(strict) == [later[1], later[0], old]


def test_queue_order_matches_a_full_sort_and_stays_cheap():
    rng = random.Random(7)
    q = JobQueue(aging_s=30)
    jobs = [queued(1000 + rng.random() * 600, priority=rng.randint(-100, 100)) for _ in range(5000)]
    for j in jobs:
        q.add(j)
    now = 1700.0

    def effective(j):  # what the queue promises: priority + waited / aging, then submission time
        t = j.created.seconds + j.created.nanos * 1e-9
        return (-(j.priority + (now - t) / 30), t)

    assert [j.id for j in q] == [j.id for j in sorted(jobs, key=effective)]
    for j in jobs[::500]:
        assert list(q)[q.index(j)] is j
        q.remove(j)
        assert j not in q
    assert len(q) == 5000 - 10


class FakeLink:
    def __init__(self):
        self.sent = []
        self._id = 0

    def next_command_id(self):
        self._id += 1
        return self._id

    async def send(self, worker_id, command):
        self.sent.append((worker_id, command))
        return True


CARD = wpb.ModelCard(
    name="m",
    defaults=wpb.ModelDefaults(height=32, width=32, num_frames=1, num_inference_steps=2, guidance_scale=5.0, fps=16),
    limits=wpb.ModelLimits(size_multiple=16, max_height=256, max_width=256, max_pixels=256 * 256, frame_step=4,
                           max_num_frames=9, max_num_inference_steps=1000, prompt_required=True),
    guidance_kind=wpb.GUIDANCE_KIND_CFG, num_experts=1,
)


def admission(rule: PriorityRule | None = None, max_resident: int = 0) -> tuple[Admission, WorkerRegistry]:
    registry = WorkerRegistry()
    registry.register("w1", wpb.Hello(protocol_version=wpb.PROTOCOL_VERSION_3, card=CARD, max_batch_size=1, max_resident=max_resident, world_size=1))
    return Admission(JobTable(), registry, FakeLink(), max_queue=100, retry_after_s=1, priorities=rule), registry


PARAMS = pb.GenerationParams(prompt="x", output_format=pb.OUTPUT_FORMAT_NPY)


def test_admission_orders_by_priority_and_announces_positions():
    adm, registry = admission(PriorityRule({"alice": 5}))
    a, _ = adm.submit(PARAMS)  # anonymous: default 0
    b, _ = adm.submit(PARAMS, principal="alice")  # default 5: ahead of a
    c, _ = adm.submit(PARAMS, principal="alice", priority=1)  # may lower its own
    assert (a.priority, b.priority, c.priority) == (0, 5, 1)
    assert [adm.position(j) for j in (b, c, a)] == [1, 2, 3]
    assert [e.queued.position for e in a.events if e.WhichOneof("event") == "queued"] == [1, 2, 3]
    assert adm.jobs.get(b.id).to_proto(adm.position(b)).priority == 5
    # place() admits in queue order
    registry.get("w1").hello.max_resident = 1
    asyncio.get_event_loop().run_until_complete(adm.place())
    assert b.phase is Phase.ENCODE and a.phase is c.phase is Phase.QUEUED
    assert [adm.position(j) for j in (c, a)] == [1, 2]


def test_admission_refuses_bad_priorities_naming_the_field():
    adm, _ = admission(PriorityRule({"alice": 5}))
    for principal, priority in (("alice", 6), ("anonymous", 1), ("admin", 101), ("alice", -101)):
        with pytest.raises(RequestError) as info:
            adm.submit(PARAMS, principal=principal, priority=priority)
        assert "priority" in info.value.status.message, info.value.status.message
    assert adm.submit(PARAMS, principal="admin", priority=100)[0].priority == 100  # admin: any in range
    assert len(adm) == 1


def test_a_requeued_job_keeps_its_place_by_submission_time():
    adm, registry = admission(max_resident=1)
    first, _ = adm.submit(PARAMS)
    asyncio.get_event_loop().run_until_complete(adm.place())
    later = [adm.submit(PARAMS)[0] for _ in range(2)]
    assert first.phase is Phase.ENCODE
    first.advance(Event.REQUEUE, reason="lost")
    adm.requeue(first)
    assert [adm.position(j) for j in (first, *later)] == [1, 2, 3]


def test_serve_priority_flags():
    import argparse

    from diffserve.scheduler.app import add_serve_flags, priority_rule

    parser = argparse.ArgumentParser()
    add_serve_flags(parser)
    args = parser.parse_args(["--principal-priority", "alice=5", "--principal-priority", " bob = -2"])
    rule, problem = priority_rule(args)
    assert problem == "" and rule.defaults == {"alice": 5, "bob": -2} and args.priority_aging == 30.0
    assert (rule.default("alice"), rule.default("carol")) == (5, 0)
    for bad, words in ((["--principal-priority", "alice"], "NAME=N"), (["--principal-priority", "alice=x"], "integer"),
                       (["--principal-priority", "al ice=1"], "NAME=N"), (["--principal-priority", "alice=101"], "-100 to 100"),
                       (["--principal-priority", "a=1", "--principal-priority", "a=2"], "twice"),
                       (["--priority-aging", "-1"], ">= 0"), (["--priority-aging", "nan"], ">= 0")):
        rule, problem = priority_rule(parser.parse_args(bad))
        assert rule is None and words in problem, (bad, problem)
