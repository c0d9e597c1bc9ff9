"""GenerationParams.cache and .loras on the OpenAI-style endpoints (images.py: /v1/images/generations and
/edits; video_objects.py: /v1/videos): the opt-ins of docs/acceleration.md beside OpenAI's own fields, in
their protobuf JSON form, cache a StepCache ({"policy": "first-block", "threshold": 0.1}) and loras a
LoraAdapter list ([{"name": "ink", "scale": 0.8}]); in a multipart form each is a JSON string.

A value that is not one is a 400 naming the field (cache, loras, loras[i]); the engine's own errors
(scheduler/validation.py) name cache.X and loras[i].X through ERROR_FIELDS.
"""

from __future__ import annotations

import json

from google.protobuf import json_format

from diffserve.v1 import generation_pb2 as pb

from diffserve.scheduler.http.errors import bad_request
from diffserve.scheduler.validation import MAX_LORAS

NAMES = ("cache", "loras")  # the request fields, also the form fields whose value is a JSON string

# The gRPC field paths in the engine's errors → the request's names (`param` of a 400).
ERROR_FIELDS: dict[str, str] = {
    "params.cache": "cache", **{f"params.cache.{knob}": f"cache.{knob}" for knob in pb.StepCache.DESCRIPTOR.fields_by_name},
    "params.loras": "loras",
    **{f"params.loras[{i}].{part}": f"loras[{i}].{part}" for i in range(MAX_LORAS) for part in ("name", "scale")},
}


def form_value(key: str, value: object) -> object:
    """A form field's value: cache's / loras' JSON string decoded (400 naming the field where it is
    not JSON); any other field's value as it is."""
    if key not in NAMES or not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        raise bad_request(f"{key}: must be JSON", key) from None


def set_cache_and_loras(params: pb.GenerationParams, cache: object, loras: object) -> None:
    """Sets params.cache from `cache` (a StepCache's JSON form) and appends `loras` (LoraAdapters' JSON
    forms) to params.loras; None leaves either unset. 400 naming the field for a value that is not one."""
    if cache is not None:
        _parse(cache, params.cache, "cache")
    if loras is not None:
        if not isinstance(loras, list):
            raise bad_request('loras: must be a list of {"name": N, "scale": S}', "loras")
        for i, lora in enumerate(loras):
            _parse(lora, params.loras.add(), f"loras[{i}]")


def _parse(value: object, message, name: str) -> None:
    """A protobuf message from its JSON form; 400 naming the field where it is not one."""
    if not isinstance(value, dict):
        raise bad_request(f"{name}: must be a JSON object", name)
    try:
        json_format.ParseDict(value, message)
    except json_format.ParseError as exc:
        raise bad_request(f"{name}: {exc}", name) from None
