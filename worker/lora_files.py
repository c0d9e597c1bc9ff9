"""LoRA adapter files (docs/acceleration.md, "LoRA"): the names a worker's --lora-dir offers, and
one file read into LoraWeights, checked against the DiT it will run in.

A name is the stem of a `.safetensors` file directly in the folder: letters, digits, `_`, `-` and
`.` (not first, never `..`), at most 128 characters, so a name can never reach outside the folder.

The format is what diffusers' `pipe.load_lora_weights(folder, weight_name=NAME.safetensors)`
accepts for the model's pipeline, read the same way:
- the family's own conversion first (`convert`: for Wan, WanLoraLoaderMixin.lora_state_dict, which
  turns the original Wan `diffusion_model.*` and musubi `lora_unet_*` layouts into diffusers');
- then keys under `transformer.` in PEFT's names, `<module>.lora_A.weight` (r, in),
  `<module>.lora_B.weight` (out, r) and optionally `<module>.lora_B.bias` (out,); kohya-style
  `lora_down` / `lora_up` names are renamed as diffusers renames them;
- the scaling alpha / r of each module from the file's `lora_adapter_metadata` header (diffusers'
  LoraConfig fields: r, lora_alpha, rank_pattern, alpha_pattern, use_rslora), or 1 without one
  (diffusers' convention: alpha = r).
Refused with ValueError naming the adapter (the request then fails with INVALID_ARGUMENT): a
missing file, one that is not safetensors, keys outside the transformer or of another kind (DoRA,
LoKr), a module the DiT has no linear for, shapes that do not fit the module, non-finite values,
and a file larger than the LoRA memory budget.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from diffserve.worker.models.lora import LoraModule, LoraWeights

SUFFIX = ".safetensors"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
PREFIX = "transformer."
KEY = re.compile(r"(?P<module>.+)\.lora_(?P<part>A\.weight|B\.weight|B\.bias)")

Convert = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def valid_name(name: str) -> bool:
    return bool(NAME.fullmatch(name)) and ".." not in name


def list_adapters(folder: Path) -> list[str]:
    """The adapter names in `folder`: stems of its regular .safetensors files that are valid names."""
    return sorted(p.name[: -len(SUFFIX)] for p in folder.iterdir()
                  if p.name.endswith(SUFFIX) and p.is_file() and valid_name(p.name[: -len(SUFFIX)]))


class AdapterFile:
    """Reads one adapter file for the DiT whose LoRA-capable linears are `targets`."""

    def __init__(self, folder: Path, targets: dict[str, nn.Linear], convert: Convert | None, max_bytes: int):
        self.folder, self.targets, self.convert, self.max_bytes = folder, targets, convert, max_bytes

    def read(self, name: str) -> LoraWeights:
        def refuse(why: str) -> ValueError:
            return ValueError(f"LoRA adapter {name!r}: {why}")

        if not valid_name(name):
            raise refuse("not a valid adapter name (letters, digits, '_', '-', '.'; no '/' or '..')")
        path = self.folder / f"{name}{SUFFIX}"
        if not path.is_file():
            raise refuse(f"no file {path.name} in the LoRA folder")
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                header = f.metadata() or {}
                size = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()) * self._element_size()
                if size > self.max_bytes:
                    raise refuse(f"{size} bytes resident, more than the LoRA memory budget ({self.max_bytes} bytes, --lora-cache-bytes)")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as exc:
            raise refuse(f"not a readable safetensors file ({exc})") from None
        try:
            config = json.loads(header[METADATA_KEY]) if METADATA_KEY in header else None
        except json.JSONDecodeError:
            raise refuse(f"its {METADATA_KEY} header is not JSON") from None
        return LoraWeights(name, self._modules(tensors, config, refuse))

    def _element_size(self) -> int:
        return max(linear.weight.element_size() for linear in self.targets.values())

    def _modules(self, tensors: dict[str, torch.Tensor], config: dict | None, refuse) -> dict[str, LoraModule]:
        if self.convert is not None:
            try:
                tensors = self.convert(dict(tensors))
            except Exception as exc:  # diffusers' converters raise whatever their layout check hits
                raise refuse(f"its keys are in no LoRA layout diffusers reads ({type(exc).__name__}: {exc})") from None
        outside = [k for k in tensors if not k.startswith(PREFIX)]
        if outside or not tensors:
            raise refuse(f"keys outside the transformer ({', '.join(sorted(outside)[:3])}{', ...' if len(outside) > 3 else ''}): "
                         f"only {PREFIX}* keys are read" if outside else "no tensors")
        state = {k.removeprefix(PREFIX): v for k, v in tensors.items()}
        if "lora_A" not in next(iter(state)):  # diffusers' test: kohya / old diffusers names -> PEFT names
            from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

            state = convert_unet_state_dict_to_peft(state)
        if any(w in k for k in state for w in ("lora_magnitude_vector", "dora_scale", ".lokr_")) or (config or {}).get(f"{PREFIX}use_dora"):
            raise refuse("DoRA and LoKr adapters are not supported, only plain LoRA")
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            match = KEY.fullmatch(key)
            if match is None:
                raise refuse(f"unexpected key {PREFIX}{key} (a LoRA file holds <module>.lora_A.weight, lora_B.weight and lora_B.bias)")
            parts.setdefault(match["module"], {})[match["part"]] = value
        unknown = sorted(m for m in parts if m not in self.targets)
        if unknown:
            more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
            raise refuse(f"targets modules this model has no linear layer for: {', '.join(unknown[:3])}{more}")
        scaling = Scaling(config, refuse)
        return {module: self._module(module, p, scaling, refuse) for module, p in sorted(parts.items())}

    def _module(self, module: str, parts: dict[str, torch.Tensor], scaling: Scaling, refuse) -> LoraModule:
        linear = self.targets[module]
        down, up, bias = parts.get("A.weight"), parts.get("B.weight"), parts.get("B.bias")
        if down is None or up is None:
            raise refuse(f"{module} has lora_{'A' if down is None else 'B'}.weight missing")
        rank = down.shape[0] if down.ndim == 2 else 0
        shard = getattr(linear, "tp_shard", None)  # a tensor-parallel share of the layer (worker/parallel/tensor.py)
        in_features, out_features = (linear.in_features, linear.out_features) if shard is None else shard.unsplit(linear)
        expected = {"lora_A.weight": ((rank, in_features), down), "lora_B.weight": ((out_features, rank), up)}
        if bias is not None:
            expected["lora_B.bias"] = ((out_features,), bias)
        for part, (shape, tensor) in expected.items():
            if rank < 1 or tuple(tensor.shape) != shape:
                raise refuse(f"{module}.{part} has shape {tuple(tensor.shape)}; the module ({in_features} -> "
                             f"{out_features}) needs {shape if rank else '(rank, in_features)'}")
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise refuse(f"{module}.{part} must hold finite floating-point values")
        if shard is not None:
            down, up, bias = shard.cut_lora(down, up, bias)
        weight = linear.weight

        def place(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=weight.device, dtype=weight.dtype).contiguous()

        return LoraModule(place(down), place(up), place(bias), scaling.of(module, rank))


class Scaling:
    """alpha / r per module from diffusers' adapter metadata (PEFT's LoraConfig rules), 1 without."""

    def __init__(self, metadata: dict | None, refuse):
        config = {k.removeprefix(PREFIX): v for k, v in (metadata or {}).items() if k.startswith(PREFIX)}
        self.config, self.refuse = config or None, refuse

    def of(self, module: str, rank: int) -> float:
        c = self.config
        if c is None:
            return 1.0
        try:
            r = _pattern(c.get("rank_pattern") or {}, module, c.get("r", 8))
            alpha = _pattern(c.get("alpha_pattern") or {}, module, c.get("lora_alpha", 8))
            r, alpha = int(r), float(alpha)
        except (TypeError, ValueError, re.error) as exc:
            raise self.refuse(f"its {METADATA_KEY} header is not a LoRA config ({exc})") from None
        if r != rank:
            raise self.refuse(f"{module}: the header says rank {r}, the weights have rank {rank}")
        return alpha / (math.sqrt(r) if c.get("use_rslora") else r)


def _pattern(patterns: dict, module: str, default):
    """PEFT's get_pattern_key: the first pattern matching the module name's end (at a dot)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default
