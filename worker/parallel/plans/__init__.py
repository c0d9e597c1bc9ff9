"""Each DiT family's parallel plan, one file per family, applied from outside the model once after loading.

`plans/<family>.py` is found by the model's module name (diffserve.worker.models.<family> ->
diffserve.worker.parallel.plans.<family>), so adding a family's parallel support touches its plan
file only. A plan file defines

- `PLAN = Plan(tp=..., sequence=...)`: the declarative tensor-parallel plan ({module name pattern:
  Heads / MLP / ParallelBlock}, applied by worker/parallel/tensor.py) and the sequence-parallel
  installer (shards the tokens before the first block, gathers them after the last or the output
  projection, and swaps the attention seams for Ulysses / Ring), either None when the family has
  no such path;
- `parallelize(model, state)`: applies it (usually `PLAN.apply(model, state)`).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable

from torch import nn

from diffserve.worker.parallel.state import ParallelState


@dataclass(frozen=True)
class Plan:
    tp: dict = field(default_factory=dict)  # tensor.TPPlan; empty: no tensor-parallel path
    sequence: Callable | None = None  # (model, SequenceParallel) -> None; None: no sequence-parallel path

    def apply(self, model: nn.Module, state: ParallelState) -> nn.Module:
        """Tensor parallelism first (heads split), then sequence parallelism over the local heads."""
        if state.dims.tp > 1:
            from diffserve.worker.parallel.tensor import apply_tp

            apply_tp(model, self.tp, state)
        if state.sequence is not None:
            from diffserve.worker.parallel.sequence import SequenceParallel

            if self.sequence is None:
                raise ValueError(f"{type(model).__name__} has no sequence-parallel path")
            self.sequence(model, SequenceParallel.of(state.sequence))
        return model


def plan_module(model: nn.Module) -> ModuleType | None:
    """plans/<family>.py for a model defined in diffserve.worker.models.<family>, or None."""
    family = type(model).__module__.rpartition(".")[2]
    name = f"{__name__}.{family}"
    if importlib.util.find_spec(name) is None:
        return None
    return importlib.import_module(name)


def find_plan(model: nn.Module) -> Plan | None:
    module = plan_module(model)
    return getattr(module, "PLAN", None) if module is not None else None


def has_sequence_path(model: nn.Module) -> bool:
    plan = find_plan(model)
    return plan is not None and plan.sequence is not None


def parallelize(model: nn.Module, state: ParallelState) -> nn.Module:
    """Applies the model's family plan for `state`'s layout, in place (nothing on a single rank)."""
    if state.dims.tp == 1 and state.sequence is None:
        return model
    module = plan_module(model)
    if module is None:
        raise ValueError(f"{type(model).__name__} has no parallel plan (worker/parallel/plans/)")
    return module.parallelize(model, state)


def parallelize_pipeline(pipeline, state: ParallelState) -> str:
    """Applies every DiT's plan and splits the supported text encoders over tp; returns a summary to log."""
    import torch

    from diffserve.worker.parallel.tensor import shard_text_encoder, text_encoders
    from diffserve.worker.models import dits

    models = dits(pipeline)
    for model in models:
        parallelize(model, state)
    parts = [f"{state.dims} over {state.world_size} ranks: {len(models)} DiT(s)"]
    if state.dims.tp > 1:
        for encoder in text_encoders(pipeline):
            counts = shard_text_encoder(encoder, state)
            parts.append(f"{type(encoder).__name__} ({counts['attention']} attention, {counts['mlp']} MLP split, "
                         f"{counts['whole']} whole)")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # give the freed full weights back
    return ", ".join(parts)
