"""The worker's model card for its Hello (worker.v1.ModelCard): what it serves, in the internal
protocol's own types.

Pipelines still describe themselves with the public diffserve.v1.Model (`pipeline.card`); this
module mirrors it field for field and adds the number of denoising experts. Once pipelines build
a worker.v1.ModelCard themselves, it goes away.
"""

from __future__ import annotations

from diffserve.v1 import generation_pb2 as pb
from diffserve.worker.v1 import worker_pb2 as wpb


def model_card(pipeline) -> wpb.ModelCard:
    card: pb.Model = pipeline.card
    return wpb.ModelCard(
        name=card.name,
        family=card.family,
        task=card.task,
        defaults=_mirror(card.defaults, wpb.ModelDefaults),
        limits=_mirror(card.limits, wpb.ModelLimits),
        guidance_kind=wpb.GuidanceKind.Value(pb.GuidanceKind.Name(card.guidance_kind)),
        num_experts=card.num_experts or num_experts(pipeline),
        packs_mixed_shapes=bool(getattr(pipeline, "packs", False)),  # read now: it depends on the parallel layout
        cache_policies=list(getattr(pipeline, "cache_policies", ())),
        quantizations=list(getattr(pipeline, "quantizations", ())),  # set by the worker's --quantization / --attention-backend
        lora_adapters=list(getattr(pipeline, "lora_adapters", ())),
    )


def num_experts(pipeline) -> int:
    """Wan pipelines list their transformers by noise level in `experts` (None where the
    checkpoint has no transformer_2); every other pipeline has one."""
    experts = getattr(pipeline, "experts", None) or [pipeline]
    return sum(e is not None for e in experts)


def _mirror(message, target_type):
    return target_type(**{f.name: getattr(message, f.name) for f in message.DESCRIPTOR.fields})
