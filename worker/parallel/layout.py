"""The layout planner: which cfg × ulysses × ring × tp layout a pipeline runs on N ranks, and why
a requested layout cannot run (checked at start, before any rank loads weights onto its group)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from diffserve.worker.parallel.plans import has_sequence_path
from diffserve.worker.parallel.state import ParallelDims


@dataclass(frozen=True)
class Capabilities:
    """What a pipeline can do inside a worker group; the layout planner and the runtime read it,
    and a layout that needs what a pipeline lacks is refused at start."""

    uses_cfg: bool  # requests may add an unconditional row (guidance > 1)
    cfg_parallel: bool  # a step's rows may be split over the cfg axis
    decodes_on_every_rank: bool = False  # every rank takes part in decode (split VAE); else rank 0 alone


def plan_for(pipeline, models: list, num_gpus: int, **degrees) -> tuple[ParallelDims, list[str]]:
    """plan_layout for a loaded pipeline: its capabilities, and CFG-parallel first by default only
    when its default guidance makes unconditional rows."""
    caps: Capabilities = pipeline.capabilities
    return plan_layout(num_gpus, models, cfg_capable=caps.cfg_parallel,
                       uses_cfg=caps.uses_cfg and pipeline.card.defaults.guidance_scale > 1, **degrees)


def plan_layout(num_gpus: int, models: list, *, cfg_capable: bool, uses_cfg: bool, enable_cfg_parallel: bool = False,
                ulysses: int = 0, ring: int = 0, tp: int = 0) -> tuple[ParallelDims, list[str]]:
    """The layout for DiTs `models` on `num_gpus` ranks, and why it cannot run (empty when it can).
    With only num_gpus given, CFG-parallel comes first when the pipeline does CFG."""
    explicit = enable_cfg_parallel or ulysses or ring or tp
    heads = [m.config.num_attention_heads for m in models]
    dims = ParallelDims.auto(num_gpus, enable_cfg_parallel or (not explicit and cfg_capable and uses_cfg),
                             ulysses, ring, tp, heads=math.gcd(*heads) if heads else None)
    problems = dims.problems(num_gpus)
    for h in sorted(set(heads)):
        problems += dims.head_problems(h)
    if (dims.cfg > 1 or enable_cfg_parallel) and not cfg_capable:
        problems.append("this model's pipeline has no CFG-parallel path; drop --enable-cfg-parallel")
    elif enable_cfg_parallel and dims.cfg == 1:  # asked for, but no room for two cfg halves
        problems.append(f"--enable-cfg-parallel needs --num-gpus {num_gpus} to divide by 2 × tp {dims.tp}")
    if (dims.ulysses > 1 or dims.ring > 1) and not all(has_sequence_path(m) for m in models):
        problems.append("this model's transformer has no sequence-parallel path; use --ulysses-degree 1 --ring-degree 1")
    if dims.tp > 1:
        from diffserve.worker.parallel.tensor import dit_problems

        problems += dit_problems(models, dims.tp)
    return dims, problems
