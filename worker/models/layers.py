"""Building blocks shared by our diffusion-transformer implementations.

Wan lives on top of these today; FLUX, Qwen-Image and HunyuanVideo are meant to reuse them.
Module and parameter names follow diffusers' (`linear_1`, `net.0.proj`, ...) on
purpose: the diffusers safetensors checkpoints then load into our modules with
`load_state_dict(strict=True)` and no key renaming.

Shape legend used in the comments: B batch, L sequence (tokens), H heads,
D head dim (or channels where there are no heads), N any number of leading dims.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Timestep conditioning
# ---------------------------------------------------------------------------------------------


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, laid out [cos | sin].

    Same numbers as diffusers' `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`:
    frequency i is exp(-ln(max_period) * i / (dim // 2)) for i in [0, dim // 2).
    Works on any shape: timesteps (N...) -> (N..., dim), always float32.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / half)  # (half,)
    angles = timesteps.float()[..., None] * freqs  # (N..., half)
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (N..., 2 * half)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))  # odd dims get a zero last channel
    return emb


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: linear_1 -> SiLU -> linear_2 (diffusers' names)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t_freq: torch.Tensor) -> torch.Tensor:
        # (N..., in_dim) -> (N..., dim)
        return self.linear_2(self.act(self.linear_1(t_freq)))


class TextProjection(nn.Module):
    """Caption projection: linear_1 -> GELU(tanh) -> linear_2 (diffusers' PixArtAlphaTextProjection names)."""

    def __init__(self, in_dim: int, dim: int, out_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act_1 = nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(dim, out_dim or dim)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        # (B, L_text, in_dim) -> (B, L_text, out_dim)
        return self.linear_2(self.act_1(self.linear_1(text)))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN modulation. x (B, L, D); shift/scale broadcastable, e.g. (B, 1, D) or (B, L, D)."""
    return x * (1 + scale) + shift


# ---------------------------------------------------------------------------------------------
# Normalization and feed-forward
# ---------------------------------------------------------------------------------------------


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype; the result is cast back to it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class _LinearGELU(nn.Module):
    """Linear followed by GELU; lives at `net.0` of FeedForward (so its weight is `net.0.proj.weight`)."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nn.Module):
    """Two-layer GELU MLP with diffusers' FeedForward key layout: `net.0.proj` and `net.2`.

    approximate="tanh" is diffusers' activation_fn="gelu-approximate"; "none" is "gelu".
    """

    def __init__(self, dim: int, inner_dim: int, dim_out: int | None = None, approximate: str = "tanh"):
        super().__init__()
        # net.1 is a dropout slot in diffusers; Identity keeps the indices (and the keys) the same.
        self.net = nn.ModuleList(
            [_LinearGELU(dim, inner_dim, approximate), nn.Identity(), nn.Linear(inner_dim, dim_out or dim)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N..., dim) -> (N..., inner_dim) -> (N..., dim_out)
        for layer in self.net:
            x = layer(x)
        return x


# ---------------------------------------------------------------------------------------------
# Rotary position embedding (interleaved pairs)
# ---------------------------------------------------------------------------------------------


def rotary_tables(
    dim: int,
    max_len: int,
    theta: float = 10000.0,
    device: torch.device | str | None = None,
    freqs_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for 1-D RoPE over positions [0, max_len), each (max_len, dim) float32.

    Channel pairs (2i, 2i+1) rotate together at frequency theta^(-2i/dim), so every value is
    repeated twice along the last dim ("repeat-interleaved real form"). The angles are computed in
    `freqs_dtype` (float64 by default, as diffusers does for Wan) and only the results are float32.
    """
    assert dim % 2 == 0, f"rotary dim must be even, got {dim}"
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=freqs_dtype, device=device) / dim))  # (dim/2,)
    positions = torch.arange(max_len, device=device)  # (max_len,)
    angles = torch.outer(positions, inv_freq)  # (max_len, dim/2)
    cos = angles.cos().repeat_interleave(2, dim=1).float()  # (max_len, dim)
    sin = angles.sin().repeat_interleave(2, dim=1).float()  # (max_len, dim)
    return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of x by the angles in the tables.

    x: (B, L, H, D); cos/sin: repeat-interleaved tables broadcastable to x, e.g. (1, L, 1, D).
    The rotation is done in the tables' dtype (float32) and the result cast back to x's dtype.
    """
    x_even, x_odd = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, L, H, D/2) each
    cos = cos[..., 0::2]  # both entries of a pair are equal: keep one, (..., D/2)
    sin = sin[..., 1::2]
    out_even = x_even * cos - x_odd * sin
    out_odd = x_even * sin + x_odd * cos
    return torch.stack([out_even, out_odd], dim=-1).flatten(-2).to(x.dtype)  # (B, L, H, D)
