"""Stages that pipelines compose: prompt encoding, initial noise, a batched CFG denoising step,
VAE decoding to uint8 frames. Model-specific pipelines wire these to their components.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Sequence

import numpy as np
import torch

from diffserve.worker.pipelines.base import RequestState


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


ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def cfg_denoise_step(model: ModelFn, states: list[RequestState], dtype: torch.dtype, guidance_of=None) -> int:
    """One denoising step for several requests in one forward; returns the number of rows.

    Each request contributes a conditional row and, with CFG, an unconditional row at its own
    timestep. The guided prediction (scale `guidance_of(state)`, default its guidance_scale) and
    the sampler update are per request, so a request's result does not depend on what it was
    batched with. `model` may be row-parallel (worker/parallel.py): it sees all rows either way.
    """
    latents, timesteps, contexts = [], [], []
    for s in states:
        rows = 2 if s.do_cfg else 1
        latents += [s.latents] * rows
        timesteps += [s.timesteps[s.step]] * rows
        contexts += [s.cond, s.uncond] if s.do_cfg else [s.cond]
    pred = model(torch.cat(latents).to(dtype), torch.stack(timesteps), torch.cat(contexts))  # (rows, C, F, H, W)
    row = 0
    for s in states:
        if s.do_cfg:
            cond, uncond = pred[row : row + 1], pred[row + 1 : row + 2]
            scale = guidance_of(s) if guidance_of is not None else s.params.guidance_scale
            flow = uncond + scale * (cond - uncond)
            row += 2
        else:
            flow = pred[row : row + 1]
            row += 1
        s.latents = s.sampler.step(flow, s.timesteps[s.step], s.latents, return_dict=False)[0]
        s.step += 1
    return row


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(1, 3, F, H, W) in [-1, 1] → uint8 (F, H, W, 3), rounding as diffusers' PIL output does."""
    video = (video[0].float() / 2 + 0.5).clamp(0, 1)
    return (video.permute(1, 2, 3, 0) * 255).round().to(torch.uint8).cpu().numpy()
