"""Finding a diffusers-layout checkpoint and loading its components.

A model is a folder with model_index.json (local path, or a hub id resolved through
huggingface_hub where the network allows). Encoders, tokenizers and VAEs load with the
transformers / diffusers classes named in model_index.json; DiTs are ours (worker/models/).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """The model path is missing, incomplete or of a kind we do not serve."""


def resolve_model_path(path_or_id: str) -> Path:
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CheckpointError(f"{path} has no model_index.json: expected a diffusers-layout pipeline folder")
        return path.resolve()
    if path.exists() or path_or_id.count("/") != 1:
        raise CheckpointError(f"model path {path_or_id!r} is not a folder (nor a hub id like 'org/name')")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path_or_id))
    except Exception as exc:
        raise CheckpointError(f"{path_or_id!r} is not a local folder and could not be fetched from the hub: {exc}") from exc


def read_model_index(root: Path) -> dict:
    return json.loads((root / "model_index.json").read_text())


CARD_DEFAULTS_FILE = "diffserve.json"
CARD_DEFAULT_FIELDS = ("height", "width", "num_frames", "num_inference_steps", "guidance_scale", "fps")


def card_defaults(root: Path) -> dict:
    """The model's own defaults for its card, from `diffserve.json` beside model_index.json:
    {"defaults": {"height": 64, "num_frames": 1, ...}} (any of CARD_DEFAULT_FIELDS), for checkpoints
    whose sizes the family's published defaults do not fit (the built-in demo model). {} when absent."""
    path = Path(root) / CARD_DEFAULTS_FILE
    if not path.is_file():
        return {}
    defaults = json.loads(path.read_text()).get("defaults", {})
    unknown = set(defaults) - set(CARD_DEFAULT_FIELDS)
    if unknown:
        raise ValueError(f"{path}: unknown defaults {sorted(unknown)} (known: {', '.join(CARD_DEFAULT_FIELDS)})")
    return defaults


def component_class(index: dict, name: str) -> tuple[str, str]:
    entry = index.get(name)
    if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
        raise CheckpointError(f"model_index.json has no component {name!r}")
    return entry[0], entry[1]


def load_tokenizer(root: Path, name: str = "tokenizer"):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(root / name)


def load_component(root: Path, index: dict, name: str, dtype: torch.dtype, device: torch.device):
    """Loads the transformers or diffusers model that model_index.json names for `name`."""
    import importlib

    library, cls_name = component_class(index, name)
    if library not in ("transformers", "diffusers"):
        raise CheckpointError(f"component {name} is {library}.{cls_name}; expected a transformers or diffusers class")
    cls = getattr(importlib.import_module(library), cls_name, None)
    if cls is None:
        raise CheckpointError(f"component {name}: {library} has no class {cls_name} (upgrade {library}?)")
    return cls.from_pretrained(root / name, torch_dtype=dtype).to(device).eval()


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; one of {sorted(dtypes)}")
    return dtypes[name]
