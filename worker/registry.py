"""Which pipeline serves a checkpoint, chosen by model_index.json's `_class_name`."""

from __future__ import annotations

from pathlib import Path

import torch

from .loading import CheckpointError, read_model_index


def _wan_t2v(root: Path, name: str, device: torch.device, dtype: torch.dtype):
    from .pipelines.wan_t2v import WanT2VPipeline

    return WanT2VPipeline(root, name, device, dtype)


PIPELINES = {
    "WanPipeline": _wan_t2v,
}


def load_pipeline(root: Path, name: str, device: torch.device, dtype: torch.dtype):
    class_name = read_model_index(root).get("_class_name", "")
    factory = PIPELINES.get(class_name)
    if factory is None:
        raise CheckpointError(f"{root}: pipeline class {class_name!r} is not served; supported: {sorted(PIPELINES)}")
    return factory(root, name, device, dtype)
