"""Latent layouts shared by the families: the latent shape of a request, 2x2 packing into tokens
(FLUX, Qwen-Image) and the resolution-dependent sampler shift `mu`."""

from __future__ import annotations

import torch


def latent_shape(channels: int, height: int, width: int, frames: int = 1, *, spatial: int, temporal: int = 1,
                 multiple: int = 1) -> tuple[int, int, int, int, int]:
    """(1, C, F', H', W') of a request: F' = (F - 1) / temporal + 1, H' = H / spatial rounded down
    to `multiple` latent pixels (2 for 2x2-packed families)."""
    return (
        1,
        channels,
        (frames - 1) // temporal + 1,
        multiple * (height // (spatial * multiple)),
        multiple * (width // (spatial * multiple)),
    )


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W), or (B, C, 1, H, W) / (B, 1, C, H, W) with one frame, -> (B, H/2 * W/2, 4C):
    each 2x2 patch becomes one token, channels ordered (c, dy, dx)."""
    b, h, w = latents.shape[0], latents.shape[-2], latents.shape[-1]
    c = latents.numel() // (b * h * w)
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, H/2, W/2, C, 2, 2)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H/2 * W/2, 4C) -> (B, C, H, W); the inverse of pack for latent size (h, w)."""
    b, _, c4 = tokens.shape
    x = tokens.reshape(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, H/2, 2, W/2, 2)
    return x.reshape(b, c4 // 4, h, w)


def calculate_shift(seq_len: int, config: dict) -> float:
    """mu of the dynamic (resolution-dependent) timestep shift from a sampler config: linear in the
    number of image tokens, base_shift at base_image_seq_len and max_shift at max_image_seq_len."""
    base_len, max_len = int(config.get("base_image_seq_len", 256)), int(config.get("max_image_seq_len", 4096))
    base_shift, max_shift = float(config.get("base_shift", 0.5)), float(config.get("max_shift", 1.15))
    slope = (max_shift - base_shift) / (max_len - base_len)
    return seq_len * slope + (base_shift - slope * base_len)
