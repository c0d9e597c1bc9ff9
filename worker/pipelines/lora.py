"""What a pipeline needs to serve LoRA adapters per request (docs/acceleration.md, "LoRA"): the DiT's
LoRA-capable linears (models/lora.py), the resident adapters (lora_cache.py) and a request's
adapters resolved at admission.

A pipeline that offers LoRA derives from `OffersLora`, has `enable_lora(folder, max_bytes)` (the
worker calls it for --lora-dir) that sets `self.lora`, keeps `request_loras(request)` in its
request state (`RequestState.loras`) and passes each row's adapters to its forward, which runs them
eagerly inside `lora_rows(...)`.
"""

from __future__ import annotations

import contextlib
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

    def resolve(self, request: wpb.Request, *, partial: bool = False) -> RowAdapters:
        """The request's adapters with their scales, loaded; ValueError naming a bad one. `partial`:
        only those this folder has (a two-expert model's folders each hold some)."""
        seen = set()
        for lora in request.loras:
            if lora.name in seen:
                raise ValueError(f"LoRA adapter {lora.name!r} named twice")
            seen.add(lora.name)
        return tuple((self.cache.get(lora.name), lora.scale) for lora in request.loras
                     if not partial or lora.name in self.names)


class OffersLora:
    """The LoRA side of a one-DiT pipeline: off until `enable_lora` sets `lora`."""

    lora: ServedLora | None = None  # per-request LoRA adapters (enable_lora); None: off

    @property
    def lora_adapters(self) -> tuple[str, ...]:
        """The adapter names its card lists (`Model.lora_adapters`)."""
        return () if self.lora is None else self.lora.names

    def request_loras(self, request: wpb.Request) -> RowAdapters:
        """A request's adapters, loaded at admission (ValueError naming a bad one or any where off)."""
        return no_lora(request) if self.lora is None else self.lora.resolve(request)

    def lora_rows(self, loras: Sequence[RowAdapters] | None, served: ServedLora | None = None):
        """The context a forward runs each row's adapters in (None: no row has any), on `served`'s
        DiT (default: `lora`'s)."""
        return contextlib.nullcontext() if loras is None else (served or self.lora).layers.rows(loras)


def no_lora(request: wpb.Request) -> RowAdapters:
    """For pipelines without LoRA: a request that names adapters is refused."""
    if request.loras:
        raise ValueError(f"this worker serves no LoRA adapters (asked for {request.loras[0].name!r}; start it with --lora-dir)")
    return ()
