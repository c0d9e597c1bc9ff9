"""The LoRA adapters resident on a worker: loaded on first use, kept in an LRU bounded by bytes.

A request takes its adapters when it is admitted (`get`) and holds them until it is freed, so an
adapter that the LRU drops while a resident request still runs with it stays in memory until that
request ends (and is taken back, not read again, if asked for meanwhile): the budget bounds what
the cache keeps, and resident requests may hold more for as long as they run.
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence

from diffserve.worker.models.lora import LoraWeights

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 4 << 30  # a rank-64 adapter on every linear of Wan2.1 14B is ~0.6 GB in bf16


class AdapterCache:
    """Owns the resident adapters of one DiT; `read(name)` loads one (worker/lora_files.py)."""

    def __init__(self, names: Sequence[str], read: Callable[[str], LoraWeights], max_bytes: int = DEFAULT_MAX_BYTES):
        self.names = tuple(names)  # what the folder offered at start: the card's lora_adapters
        self.read = read
        self.max_bytes = max_bytes
        self.kept: OrderedDict[str, LoraWeights] = OrderedDict()  # least recently used first
        self.in_use: weakref.WeakValueDictionary[str, LoraWeights] = weakref.WeakValueDictionary()
        self.loads = 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.kept.values())

    def get(self, name: str) -> LoraWeights:
        """The adapter, loaded if no one holds it; raises ValueError naming it when it cannot be."""
        if name not in self.names:
            raise ValueError(f"no LoRA adapter {name!r} on this worker (its --lora-dir offers: {', '.join(self.names) or 'none'})")
        adapter = self.kept.pop(name, None) or self.in_use.get(name)
        if adapter is None:
            adapter = self.read(name)
            self.loads += 1
            log.info("LoRA adapter %s loaded: %d modules, %.1f MiB", name, len(adapter.modules), adapter.nbytes / 2**20)
        self.kept[name] = adapter
        self.in_use[name] = adapter
        while self.nbytes > self.max_bytes and len(self.kept) > 1:
            dropped, _ = self.kept.popitem(last=False)
            log.info("LoRA adapter %s dropped from the cache (budget %d bytes)", dropped, self.max_bytes)
        return adapter
