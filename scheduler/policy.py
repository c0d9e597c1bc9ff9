"""Batching policy: which command a worker group runs next, with a fair share between shapes.

Contract: `FairShare.next_plan(worker_id, jobs, max_batch)` returns the next command's plan for
the jobs resident on one idle worker, or None (`stages=False` / `steps=False`: only the other
kind, for a worker whose lane for that kind is busy); `charge(worker_id, plan, elapsed_s)` books the
worker time a finished command took; `forget(worker_id)` drops a lost worker's accounts. The
step loop (steps.py) owns one FairShare and measures `elapsed_s` itself (dispatch → Result), so a
worker cannot claim a cheaper step than it took. `next_plan(jobs, max_batch)` alone is the same
choice with fresh accounts (no history: the oldest job's shape).

1. Stages first (ENCODE, PREPARE, DECODE), highest priority then oldest: they are short, a newly
   encoded job joins the denoising sooner, a decoded job frees its memory. The first job's stage
   takes along the other jobs waiting at the same stage when it is ENCODE or PREPARE (up to
   `max_batch`, in the same order): a burst of arrivals is encoded in one text-encoder call, not
   one per job. A DECODE runs one job.
2. Otherwise one denoising step for one *shape group*: the ready jobs whose latents have the same
   shape share the step (batching, even at different step indices), up to `max_batch` of them,
   highest priority then oldest first.
3. Which group: start-time fair queueing over the shape groups resident on the worker (the
   virtual-time scheme of Linux's CFS). Each group has a virtual time; a step that took `elapsed`
   seconds adds `elapsed / weight` to its group's, the weight being the sum of `weight(priority)`
   over the jobs in that step (`2 ** (priority / 10)`: equal priorities give every job an equal
   share of the worker, jobs sharing a step share its time, and +10 priority doubles a job's
   share). Next runs the group whose step would *finish* first in virtual time: its virtual time
   plus its last step's time over its weight (weighted fair queueing; a group not measured yet
   counts 0), so a cheap group runs its steps in the time one expensive step takes; ties go to the
   group served least recently (a new group first), then to the oldest job. A group that appears
   (its first job reaches DENOISE) starts at the least virtual time of the groups already there,
   so it has no credit from before it arrived and takes none from the others; a group with no
   denoising job left is forgotten.

4. Mixed-shape packing (`Packing`, where the worker's model packs and `serve --pack-tokens N` is set):
   after the group is chosen, jobs of the other groups join its step, in the same finish order, while
   the step's latent tokens (each job's `tokens`, counted once however many CFG rows it has) stay
   within N and its jobs within `max_batch`. Small shapes are launch-bound, so several of them in one
   forward cost about what one does; large ones are compute-bound and gain nothing (so the budget).
   A packed step's time is charged to each shape group in proportion to its tokens.

Bound: a ready group g waits for the command in flight, and then, between two of its steps, each
other group h runs at most `t_g * W_h / W_g + t_h` of worker time (t: a step's time, W: the
group's weight): with equal weights, about one step of g plus one step of its own, and a cheap
group runs `t_h / t_g` steps for each step of an expensive one h. A job's wait is therefore set by
step times and the number of resident shapes (at most the worker's max_resident), not by the
length of another job: a 2-step 32×32 job submitted while a 300-step 256×256×9 job runs waits for
the long step in flight and then runs its stages and steps back to back (tests/service/
test_fairness.py measures it). Resident jobs never starve: each ready group gets at least
`W_g / ΣW` of the worker's time.
"""

from __future__ import annotations

import functools

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from diffserve.scheduler.jobs import Job
from diffserve.scheduler.lifecycle import Phase

STAGES = (Phase.ENCODE, Phase.PREPARE, Phase.DECODE)
# Stages one command runs for several jobs (the worker encodes their prompts in one call); a decode
# stays one job a command (a video's decode is long, and a batch of them would hold the worker).
BATCHED_STAGES = (Phase.ENCODE, Phase.PREPARE)

Shape = tuple[int, int, int]


@dataclass
class Plan:
    """One command: a stage for one job (several at once for BATCHED_STAGES), or a denoising step for several."""

    phase: Phase
    jobs: list[Job]

    @property
    def stage(self) -> int:
        """The public diffserve.v1.Stage the command runs."""
        return self.phase.stage


@functools.lru_cache(maxsize=256)
def weight(priority: int) -> float:
    """A job's share of its worker relative to a priority-0 job: doubles every 10 points."""
    return 2.0 ** (priority / 10)


def _order(job: Job) -> tuple[int, float]:
    return (-job.priority, job.admitted_at)


@dataclass(frozen=True)
class Packing:
    """Mixed-shape packing for one worker: `tokens(job)` its latent tokens, at most `budget` per step."""

    tokens: Callable[[Job], int]
    budget: int


@dataclass
class Accounts:
    """One worker's shape groups: virtual time and when each was last served."""

    vtime: dict[Shape, float] = field(default_factory=dict)
    served: dict[Shape, int] = field(default_factory=dict)  # charge count at its last step; -1 never
    last_s: dict[Shape, float] = field(default_factory=dict)  # its last step's time (0: not measured)
    charges: int = 0

    def sync(self, shapes: set[Shape]) -> None:
        """Forgets groups with no denoising job; a new group starts at the least virtual time."""
        for gone in [s for s in self.vtime if s not in shapes]:
            del self.vtime[gone], self.served[gone], self.last_s[gone]
        new = [s for s in shapes if s not in self.vtime]
        if new:
            start = min(self.vtime.values(), default=0.0)
            for shape in new:
                self.vtime[shape] = start
                self.served[shape] = -1
                self.last_s[shape] = 0.0

    def charge(self, plan: Plan, elapsed_s: float, tokens: Callable[[Job], int] | None = None) -> None:
        """Books a step's time to its shape group (to each, by its share of `tokens`, in a packed step)."""
        if plan.phase is not Phase.DENOISE or not plan.jobs:
            return
        elapsed_s = max(0.0, elapsed_s)
        by_shape: dict[Shape, list[Job]] = {}
        for job in plan.jobs:
            by_shape.setdefault(job.shape_key, []).append(job)
        if len(by_shape) == 1 or tokens is None:
            shares = {shape: 1.0 / len(by_shape) for shape in by_shape}
        else:
            counts = {shape: sum(tokens(j) for j in jobs) for shape, jobs in by_shape.items()}
            total = sum(counts.values()) or 1
            shares = {shape: n / total for shape, n in counts.items()}
        for shape, jobs in by_shape.items():
            if shape not in self.vtime:  # its jobs left meanwhile (cancelled, lost)
                continue
            spent = elapsed_s * shares[shape]
            self.vtime[shape] += spent / sum(weight(j.priority) for j in jobs)
            self.last_s[shape] = spent
            self.served[shape] = self.charges
        self.charges += 1


def next_plan(jobs: Iterable[Job], max_batch: int, accounts: Accounts | None = None, packing: Packing | None = None,
              *, stages: bool = True, steps: bool = True) -> Plan | None:
    """The next command's plan; `stages` / `steps` False leave that kind out (a worker's lane for
    it is busy: workers with concurrent stages, steps.py)."""
    stage: Job | None = None
    staged: dict[Phase, list[Job]] = {}  # BATCHED_STAGES: their waiting jobs
    shapes: set[Shape] = set()
    groups: dict[Shape, list[Job]] = {}
    for job in jobs:  # one pass; each job's shape read once (protobuf fields are not free)
        phase = job.phase
        if phase is Phase.DENOISE:
            shape = job.shape_key
            shapes.add(shape)
            if not job.in_flight:
                groups.setdefault(shape, []).append(job)
        elif stages and phase in STAGES and not job.in_flight:
            if stage is None or _order(job) < _order(stage):
                stage = job
            if phase in BATCHED_STAGES:
                staged.setdefault(phase, []).append(job)
    if stage is not None:
        if stage.phase not in BATCHED_STAGES:
            return Plan(stage.phase, [stage])
        return Plan(stage.phase, sorted(staged[stage.phase], key=_order)[:max(1, max_batch)])
    accounts = accounts if accounts is not None else Accounts()
    accounts.sync(shapes)
    if not groups or not steps:
        return None
    for shape, group in groups.items():
        if len(group) > 1:
            group.sort(key=_order)
        del group[max_batch:]

    def finish(shape: Shape) -> tuple[float, int, float]:
        batch = groups[shape]
        estimate = accounts.last_s[shape] / sum(weight(j.priority) for j in batch)
        return (accounts.vtime[shape] + estimate, accounts.served[shape], min(j.admitted_at for j in batch))

    if len(groups) == 1:
        return Plan(Phase.DENOISE, next(iter(groups.values())))
    order = sorted(groups, key=finish)
    chosen = groups[order[0]]
    if packing is not None and packing.budget > 0:
        chosen = list(chosen)
        total = sum(packing.tokens(j) for j in chosen)
        for shape in order[1:]:
            for job in groups[shape]:
                n = packing.tokens(job)
                if len(chosen) >= max_batch or total + n > packing.budget:
                    break
                chosen.append(job)
                total += n
    return Plan(Phase.DENOISE, chosen)


class FairShare:
    """The policy with its per-worker accounts (see the module docstring)."""

    def __init__(self) -> None:
        self._accounts: dict[str, Accounts] = {}

    def next_plan(self, worker_id: str, jobs: Iterable[Job], max_batch: int, packing: Packing | None = None,
                  *, stages: bool = True, steps: bool = True) -> Plan | None:
        return next_plan(jobs, max_batch, self._accounts.setdefault(worker_id, Accounts()), packing, stages=stages, steps=steps)

    def charge(self, worker_id: str, plan: Plan, elapsed_s: float, tokens: Callable[[Job], int] | None = None) -> None:
        accounts = self._accounts.get(worker_id)
        if accounts is not None:
            accounts.charge(plan, elapsed_s, tokens)

    def forget(self, worker_id: str) -> None:
        self._accounts.pop(worker_id, None)
