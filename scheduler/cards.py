"""Model cards: what a worker says it serves (worker.v1.ModelCard, in its Hello) as the public
diffserve.v1.Model that ListModels shows and validation reads.

The worker's card mirrors the public card's fields one for one (same names, same meanings) so
the internal protocol does not embed public types; `public_model` is the one place that maps
one onto the other.
"""

from __future__ import annotations

from diffserve.v1 import generation_pb2 as pb
from diffserve.worker.v1 import worker_pb2 as wpb


def public_model(card: wpb.ModelCard) -> pb.Model:
    """The public card of a worker's model (no serving state or workers: the engine adds those)."""
    return pb.Model(
        name=card.name,
        family=card.family,
        task=card.task,
        defaults=_mirror(card.defaults, pb.ModelDefaults),
        limits=_mirror(card.limits, pb.ModelLimits),
        guidance_kind=pb.GuidanceKind.Value(wpb.GuidanceKind.Name(card.guidance_kind)),
        num_experts=max(1, card.num_experts),
        packs_mixed_shapes=card.packs_mixed_shapes,
        cache_policies=list(card.cache_policies),
        quantizations=list(card.quantizations),
        lora_adapters=list(card.lora_adapters),
    )


def _mirror(message, target_type):
    """Copies a message into the same-named fields of its public twin (a field the twin lacks
    raises ValueError: tests/test_cards_unit.py keeps the twins in step)."""
    return target_type(**{f.name: getattr(message, f.name) for f in message.DESCRIPTOR.fields})
