"""What a pipeline needs to serve LoRA adapters per request (docs/acceleration.md, "LoRA"): the DiT's
LoRA-capable linears (models/lora.py), the resident adapters (lora_cache.py) and a request's
adapters resolved at admission.

A pipeline that offers LoRA has `enable_lora(folder, max_bytes)` (the worker calls it for
--lora-dir), keeps `ServedLora.resolve(request)` in its request state and passes each row's
adapters to its forward, which runs them eagerly inside `layers.rows(...)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch.nn as nn

from diffserve.worker.lora_cache import AdapterCache
from diffserve.worker.lora_files import AdapterFile, Convert, list_adapters
from diffserve.worker.models.lora import LoraLayers, RowAdapters, linear_names
from diffserve.worker.v1 import worker_pb2 as wpb


class ServedLora:
    """Owns one DiT's LoRA layers and its adapter cache."""

    def __init__(self, model: nn.Module, folder: Path, max_bytes: int, convert: Convert | None, exclude: Sequence[str] = ()):
        if not folder.is_dir():
            raise ValueError(f"--lora-dir {folder}: not a folder")
        self.layers = LoraLayers.install(model, linear_names(model, exclude))
        self.layers.kept_bytes = max_bytes  # stacks of earlier adapter mixes (models/lora.py): the adapters' budget again
        files = AdapterFile(folder, self.layers.targets, convert, max_bytes)
        self.cache = AdapterCache(list_adapters(folder), files.read, max_bytes)

    @property
    def names(self) -> tuple[str, ...]:
        return self.cache.names

    def resolve(self, request: wpb.Request) -> RowAdapters:
        """The request's adapters with their scales, loaded; ValueError naming a bad one."""
        seen = set()
        for lora in request.loras:
            if lora.name in seen:
                raise ValueError(f"LoRA adapter {lora.name!r} named twice")
            seen.add(lora.name)
        return tuple((self.cache.get(lora.name), lora.scale) for lora in request.loras)


def no_lora(request: wpb.Request) -> RowAdapters:
    """For pipelines without LoRA: a request that names adapters is refused."""
    if request.loras:
        raise ValueError(f"this worker serves no LoRA adapters (asked for {request.loras[0].name!r}; start it with --lora-dir)")
    return ()
