"""Stages that pipelines compose: prompt encoding, initial noise, VAE output to uint8 frames
(the denoising step is denoise.py). Model-specific pipelines wire these to their components.
"""

from __future__ import annotations

import html
import re
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


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
    """Tokenizes to a fixed length and encodes; positions past each prompt's length are zeroed.

    The encoder runs on the prompts' tokens only (padding cut to the longest prompt, rounded up to
    TRIM_TO tokens): T5 masks padded keys out of every softmax and its position bias is relative,
    so the real tokens' states do not depend on how much padding follows; the output is padded back
    to `max_length` with zeros, as the reference pipelines pad it. A prompt encoded once is kept
    (the last `cache_prompts` prompts, by their cleaned text): the negative prompt most requests
    share is encoded once per worker, not once per request."""

    TRIM_TO = 64

    def __init__(self, tokenizer, text_encoder, max_length: int, device: torch.device, dtype: torch.dtype,
                 cache_prompts: int = 64):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_length = max_length
        self.device = device
        self.dtype = dtype
        self.cache_prompts = cache_prompts
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()  # cleaned prompt -> (length, D)

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        """(len(prompts), max_length, D)."""
        return torch.cat(self.rows(prompts))

    @torch.no_grad()
    def rows(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """One (1, max_length, D) tensor per prompt, each its own memory (a request keeps its rows
        without holding the others'); the prompts not kept are encoded in one call."""
        texts = [clean_prompt(p) for p in prompts]
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        encoded = dict(zip(missing, self._encode(missing))) if missing else {}
        rows = []
        for text in texts:
            row = encoded.get(text)
            if row is None:
                row = self._cache[text]
                self._cache.move_to_end(text)
            rows.append(row)
        for text, row in encoded.items():
            self._remember(text, row)
        return [F.pad(row, (0, 0, 0, self.max_length - row.shape[0]))[None] for row in rows]

    def _encode(self, texts: list[str]) -> list[torch.Tensor]:
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        lengths = tokens.attention_mask.gt(0).sum(dim=1).tolist()
        width = min(self.max_length, -(-max(lengths) // self.TRIM_TO) * self.TRIM_TO)
        ids = tokens.input_ids[:, :width].to(self.device)
        mask = tokens.attention_mask[:, :width].to(self.device)
        hidden = self.text_encoder(ids, mask).last_hidden_state  # (B, width, D)
        return [hidden[i, :n].to(self.dtype, copy=True) for i, n in enumerate(lengths)]  # kept alone, not as views of the batch

    def _remember(self, text: str, row: torch.Tensor) -> None:
        if self.cache_prompts <= 0:
            return
        self._cache[text] = row
        self._cache.move_to_end(text)
        while len(self._cache) > self.cache_prompts:
            self._cache.popitem(last=False)


def initial_noise(shape: Sequence[int], seed: int, device: torch.device) -> torch.Tensor:
    """The seed contract: float32 normal noise from torch.Generator("cpu").manual_seed(seed),
    drawn on the CPU exactly as diffusers' pipelines do with a CPU generator."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device)


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(1, 3, F, H, W) in [-1, 1] → uint8 (F, H, W, 3), rounding as diffusers' PIL output does."""
    video = (video[0].float() / 2 + 0.5).clamp(0, 1)
    return (video.permute(1, 2, 3, 0) * 255).round().to(torch.uint8).cpu().numpy()
