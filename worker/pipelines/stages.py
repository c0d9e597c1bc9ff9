"""Stages that pipelines compose: prompt encoding, initial noise, VAE output to uint8 frames
(the denoising step is denoise.py). Model-specific pipelines wire these to their components.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence

import numpy as np
import torch


def clean_prompt(text: str) -> str:
    """ftfy fix-up, HTML unescape and whitespace folding, as the reference pipelines do."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class T5PromptEncoder:
    """Tokenizes to a fixed length and encodes; positions past each prompt's length are zeroed."""

    def __init__(self, tokenizer, text_encoder, max_length: int, device: torch.device, dtype: torch.dtype):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_length = max_length
        self.device = device
        self.dtype = dtype

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids = tokens.input_ids.to(self.device)
        mask = tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(ids, mask).last_hidden_state  # (B, L, D)
        lengths = mask.gt(0).sum(dim=1)
        keep = torch.arange(self.max_length, device=self.device)[None, :] < lengths[:, None]  # (B, L)
        return (hidden * keep[..., None]).to(self.dtype)


def initial_noise(shape: Sequence[int], seed: int, device: torch.device) -> torch.Tensor:
    """The seed contract: float32 normal noise from torch.Generator("cpu").manual_seed(seed),
    drawn on the CPU exactly as diffusers' pipelines do with a CPU generator."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device)


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(1, 3, F, H, W) in [-1, 1] → uint8 (F, H, W, 3), rounding as diffusers' PIL output does."""
    video = (video[0].float() / 2 + 0.5).clamp(0, 1)
    return (video.permute(1, 2, 3, 0) * 255).round().to(torch.uint8).cpu().numpy()
