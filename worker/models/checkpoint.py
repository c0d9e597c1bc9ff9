"""Loading a DiT from a diffusers `transformer/` folder, the one way every model does it.

The module is built on the meta device and the checkpoint tensors are assigned in place
(`load_state_dict(strict=True, assign=True)`), so a 14B model's weights are allocated once,
directly on the target device. Floating tensors become `dtype`, except parameters whose dotted
name has a part in `keep_fp32` (the modules diffusers keeps in float32 for that model).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn


def read_config(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def read_safetensors(folder: str | Path, device: torch.device | str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) from diffusion_pytorch_model.safetensors or its sharded index."""
    folder = Path(folder)
    single = folder / "diffusion_pytorch_model.safetensors"
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if single.exists():
        files = [single]
    elif index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / shard for shard in sorted(set(weight_map.values()))]
    else:
        raise FileNotFoundError(f"no diffusion_pytorch_model.safetensors[.index.json] in {folder}")
    device = str(torch.device(device))
    for file in files:
        with safe_open(str(file), framework="pt", device=device) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_module(build: Callable[[], nn.Module], folder: str | Path, dtype: torch.dtype, device: torch.device | str,
                keep_fp32: Iterable[str] = (), ignore: Iterable[str] = ()) -> nn.Module:
    """build() on meta, then the folder's tensors assigned strictly. `ignore`: checkpoint tensors
    with a name part in it are skipped (e.g. weights of a branch we do not run)."""
    keep_fp32, ignore = set(keep_fp32), set(ignore)
    with torch.device("meta"):
        model = build()
    state_dict = {}
    for name, tensor in read_safetensors(folder, device):
        parts = name.split(".")
        if ignore.intersection(parts):
            continue
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32 if keep_fp32.intersection(parts) else dtype)
        state_dict[name] = tensor
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval().requires_grad_(False)
