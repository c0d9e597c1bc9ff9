"""Reference outputs from diffusers' own pipelines, for parity tests."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch


@lru_cache(maxsize=2)
def wan_pipeline(path: str):
    from diffusers import WanPipeline

    return WanPipeline.from_pretrained(path, torch_dtype=torch.float32)


def wan_reference(path: Path, *, prompt: str, negative_prompt: str = "", height: int, width: int, num_frames: int,
                  steps: int, guidance: float, seed: int, guidance_2: float | None = None) -> np.ndarray:
    """uint8 (F, H, W, 3) from diffusers.WanPipeline with a CPU generator seeded with `seed`."""
    pipe = wan_pipeline(str(path))
    out = pipe(
        prompt=prompt, negative_prompt=negative_prompt, height=height, width=width, num_frames=num_frames,
        num_inference_steps=steps, guidance_scale=guidance, guidance_scale_2=guidance_2, generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
    ).frames[0]
    return (out * 255).round().astype(np.uint8)


def max_level_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
