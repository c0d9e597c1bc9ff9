"""GET /v1/models: the served models in OpenAI's list shape, with diffserve's own fields beside.

    {"object": "list", "data": [{"id": "Wan2.1-T2V-1.3B-Diffusers", "object": "model", "created": 0,
      "owned_by": "diffserve", "task": "text-to-video", "family": "wan", "serving": true,
      "defaults": {...}, "limits": {...}}]}
"""

from __future__ import annotations

from collections.abc import Iterable

from fastapi import APIRouter, Depends, Request
from google.protobuf import json_format

from diffserve.v1 import generation_pb2 as pb

from diffserve.scheduler.auth import Principal
from diffserve.scheduler.http.auth import caller

router = APIRouter()


def served_card(models: Iterable[pb.Model], name: str | None) -> pb.Model | None:
    """The card a request's model selects (the only one when it names none); None when there is no
    such model or the name is ambiguous (the engine then refuses the request, naming the served models)."""
    cards = list(models)
    if not name:
        return cards[0] if len(cards) == 1 else None
    return next((card for card in cards if card.name == name), None)


def model_dict(model: pb.Model) -> dict:
    return {
        "id": model.name, "object": "model", "created": 0, "owned_by": "diffserve",
        "family": model.family, "task": model.task, "serving": model.state == pb.SERVING_STATE_SERVING,
        "defaults": json_format.MessageToDict(model.defaults, preserving_proto_field_name=True),
        "limits": json_format.MessageToDict(model.limits, preserving_proto_field_name=True),
    }


@router.get("/v1/models")
async def list_models(request: Request, principal: Principal = Depends(caller)) -> dict:
    return {"object": "list", "data": [model_dict(m) for m in request.app.state.door.engine.list_models()]}
