"""Full-size DiTs with synthetic weights, built directly on the device (no checkpoint on disk).

Every parameter is drawn from a generator seeded by its dotted name, so a weight has the same
value in diffusers' model and in ours, in bf16 and in float32, and in a copy with fewer blocks
(block k of a 30-layer copy equals block k of the 60-layer model). Only one model needs to be
resident at a time: a side is built, run and freed, then the next one is built from the same seeds.

    reference = diffusers_model("WanTransformer3DModel", config, torch.bfloat16, "cuda")
    ours = our_model(WanTransformer, "WanTransformer3DModel", config, torch.bfloat16, "cuda")
"""

from __future__ import annotations

import contextlib
import gc
import json
import tempfile
import zlib
from pathlib import Path

import torch
from torch import nn

from diffserve.worker.models import checkpoint


def synthetic(name: str, shape: torch.Size, device: torch.device | str, seed: int = 0) -> torch.Tensor:
    """The float32 value of parameter `name`: matrices N(0, 1/fan_in) (activations keep their scale
    through a layer), 1-D weights (norm scales) 1 + N(0, 0.1^2), biases N(0, 0.02^2)."""
    g = torch.Generator(device).manual_seed((zlib.crc32(name.encode()) + seed) % 2**63)
    x = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
    if len(shape) >= 2:
        return x.mul_((x.numel() // shape[0]) ** -0.5)
    if name.endswith("weight"):
        return x.mul_(0.1).add_(1.0)
    return x.mul_(0.02)


def _meta_diffusers(class_name: str, config: dict) -> nn.Module:
    """diffusers' model with its parameters on meta; buffers and plain tensors (RoPE tables) are
    computed as usual, on the CPU, as diffusers' own from_pretrained does."""
    import diffusers
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return getattr(diffusers, class_name)(**config)


def parameter_shapes(class_name: str, config: dict) -> dict[str, torch.Size]:
    """Name -> shape of every tensor in the model's state dict (all parameters for these DiTs)."""
    return {name: t.shape for name, t in _meta_diffusers(class_name, config).state_dict().items()}


def diffusers_model(class_name: str, config: dict, dtype: torch.dtype, device: torch.device | str, seed: int = 0) -> nn.Module:
    """diffusers' model in `dtype` on `device` with synthetic weights; modules in the class's
    `_keep_in_fp32_modules` stay float32 (what from_pretrained(torch_dtype=dtype) does)."""
    model = _meta_diffusers(class_name, config)
    keep = set(type(model)._keep_in_fp32_modules or []) if dtype != torch.float32 else set()
    state_dict = {}
    for name, tensor in model.state_dict().items():
        assert tensor.is_meta, f"{name}: a persistent buffer; synthetic weights cover parameters only"
        state_dict[name] = synthetic(name, tensor.shape, device, seed).to(torch.float32 if keep.intersection(name.split(".")) else dtype)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(device).eval().requires_grad_(False)  # .to moves the buffers (RoPE tables)


@contextlib.contextmanager
def _checkpoint_in_memory(shapes: dict[str, torch.Size], seed: int):
    """Makes worker/models/checkpoint.py read synthetic tensors instead of safetensors files, so our
    classes load through their own from_pretrained (dtype casts, float32 modules, buffer resets)."""
    original = checkpoint.read_safetensors

    def read(folder, device):
        for name, shape in shapes.items():
            yield name, synthetic(name, shape, device, seed)

    checkpoint.read_safetensors = read
    try:
        yield
    finally:
        checkpoint.read_safetensors = original


def our_model(cls: type, class_name: str, config: dict, dtype: torch.dtype, device: torch.device | str, seed: int = 0) -> nn.Module:
    """Our DiT `cls` through cls.from_pretrained, with the weights diffusers_model(class_name, ...) gets."""
    shapes = parameter_shapes(class_name, config)
    with tempfile.TemporaryDirectory() as folder, _checkpoint_in_memory(shapes, seed):
        (Path(folder) / "config.json").write_text(json.dumps({"_class_name": class_name, **config}))
        return cls.from_pretrained(folder, dtype, device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
