"""The built-in demo model (issue 16): procedural data, the evaluator that reads pictures back, the
training recipe, and — once trained weights are committed under demo/model/ — the model that
`diffserve generate` uses when given neither --model-path nor --server."""

from __future__ import annotations

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"  # a diffusers pipeline folder, shipped as package data


def builtin_model() -> Path | None:
    """The built-in model's folder, or None where this install has none."""
    return MODEL_DIR if (MODEL_DIR / "model_index.json").is_file() else None
