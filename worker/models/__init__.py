"""Our DiTs (one module per family) and the layers they share. No parallel code lives here:
plans in worker/parallel/plans/ are applied from outside."""

from __future__ import annotations

import torch.nn as nn


def dits(pipeline) -> list[nn.Module]:
    """The pipeline's own transformer modules (those defined under diffserve.worker.models)."""
    found = []
    for value in vars(pipeline).values():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            is_dit = isinstance(item, nn.Module) and type(item).__module__.startswith("diffserve.worker.models")
            if is_dit and all(item is not f for f in found):  # one module may sit under two names
                found.append(item)
    return found
