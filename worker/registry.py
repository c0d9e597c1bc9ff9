"""Which pipeline serves a checkpoint, chosen by model_index.json's `_class_name`.

One line per served pipeline class: "module:Class" under diffserve.worker.pipelines, imported
only when a checkpoint needs it. Every class takes (root, name, device, dtype).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from diffserve.worker.loading import CheckpointError, read_model_index

# Checkpoints whose _class_name alone does not say which pipeline serves them:
# (class name, model_index.json key that must be true) -> target.
REFINED = {
    ("WanPipeline", "expand_timesteps"): "wan_i2v:WanI2VPipeline",  # Wan2.2 TI2V-5B: text or text + image
}

PIPELINES = {
    "WanPipeline": "wan_t2v:WanT2VPipeline",
    "HunyuanVideoPipeline": "hunyuan_video:HunyuanVideoT2VPipeline",
    "QwenImagePipeline": "qwen_image:QwenImagePipeline",
    "QwenImageEditPipeline": "qwen_image:QwenImageEditPipeline",
    "FluxPipeline": "flux:FluxPipeline",
    "WanDMDPipeline": "fastwan:FastWanPipeline",
    "WanImageToVideoPipeline": "wan_i2v:WanI2VPipeline",
}


def load_pipeline(root: Path, name: str, device: torch.device, dtype: torch.dtype):
    index = read_model_index(root)
    class_name = index.get("_class_name", "")
    target = next((t for (cls, key), t in REFINED.items() if cls == class_name and index.get(key)), None)
    target = target or PIPELINES.get(class_name)
    if target is None:
        raise CheckpointError(f"{root}: pipeline class {class_name!r} is not served; supported: {sorted(PIPELINES)}")
    module_name, _, cls_name = target.partition(":")
    cls = getattr(importlib.import_module(f"diffserve.worker.pipelines.{module_name}"), cls_name)
    return cls(root, name, device, dtype)
