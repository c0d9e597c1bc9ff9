"""Which pipeline serves a checkpoint, chosen by model_index.json's `_class_name`.

One line per served pipeline class: "module:Class" under diffserve.worker.pipelines, imported
only when a checkpoint needs it. Every class takes (root, name, device, dtype); a class serving
several layouts (Wan) reads the variant from model_index.json itself.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from diffserve.worker.loading import CheckpointError, read_model_index

PIPELINES = {
    "WanPipeline": "wan:WanPipeline",  # Wan2.1 / Wan2.2 T2V, Wan2.2 TI2V (text or text + image)
    "HunyuanVideoPipeline": "hunyuan_video:HunyuanVideoT2VPipeline",
    "QwenImagePipeline": "qwen_image:QwenImagePipeline",
    "QwenImageEditPipeline": "qwen_image:QwenImageEditPipeline",
    "FluxPipeline": "flux:FluxPipeline",
    "WanDMDPipeline": "wan:WanPipeline",  # FastVideo's FastWan (DMD)
    "WanImageToVideoPipeline": "wan:WanPipeline",
}


def load_pipeline(root: Path, name: str, device: torch.device, dtype: torch.dtype):
    index = read_model_index(root)
    class_name = index.get("_class_name", "")
    target = PIPELINES.get(class_name)
    if target is None:
        raise CheckpointError(f"{root}: pipeline class {class_name!r} is not served; supported: {sorted(PIPELINES)}")
    module_name, _, cls_name = target.partition(":")
    cls = getattr(importlib.import_module(f"diffserve.worker.pipelines.{module_name}"), cls_name)
    return cls(root, name, device, dtype)
