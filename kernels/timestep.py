"""Sinusoidal timestep embedding, laid out [cos | sin] (diffusers' `Timesteps(dim, flip_sin_to_cos=True,
downscale_freq_shift=0)`).

Frequency i is exp(-ln(max_period) * i / (dim // 2)) for i in [0, dim // 2), computed with the same
float32 operations in the same order as the reference (correctly rounded division, CUDA's expf,
sinf and cosf on the GPU), so both give the same numbers. One Triton program per timestep
replaces the reference's chain of small kernels; with per-token timesteps (Wan2.2 TI2V) that is
(B, L) rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from diffserve.kernels.norm import use_triton

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:
    triton = None


def timestep_embedding_reference(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """timesteps (N...) -> (N..., dim) float32; odd dims get a zero last channel."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / half)  # (half,)
    angles = timesteps.float()[..., None] * freqs  # (N..., half)
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (N..., 2 * half)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


if triton is not None:
    # The CPU interpreter runs tl.math only; on the GPU libdevice gives CUDA's expf / cosf / sinf
    # (what torch uses) rather than the fast approximations.
    _INTERPRET = tl.constexpr(bool(triton.knobs.runtime.interpret))

    @triton.jit
    def _exp_cos_sin(exponent, t):
        if _INTERPRET:
            angles = t * tl.exp(exponent)
            return tl.cos(angles), tl.sin(angles)
        else:
            angles = t * libdevice.exp(exponent)
            return libdevice.cos(angles), libdevice.sin(angles)

    @triton.jit
    def _timestep_kernel(t_ptr, out_ptr, neg_log_period, HALF: tl.constexpr, DIM: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        i = tl.arange(0, BLOCK)
        mask = i < HALF
        t = tl.load(t_ptr + row).to(tl.float32)
        exponent = tl.div_rn(i.to(tl.float32) * neg_log_period, tl.full([BLOCK], HALF, tl.float32))
        cos, sin = _exp_cos_sin(exponent, t)
        base = out_ptr + row * DIM
        tl.store(base + i, cos, mask=mask)
        tl.store(base + HALF + i, sin, mask=mask)
        if DIM > 2 * HALF:  # odd dim: zero last channel
            tl.store(base + (DIM - 1), 0.0)


def timestep_embedding_triton(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """The Triton path of `timestep_embedding`."""
    t = timesteps.reshape(-1)
    out = torch.empty((t.numel(), dim), dtype=torch.float32, device=t.device)
    half = dim // 2
    _timestep_kernel[(t.numel(),)](
        t, out, -math.log(max_period), HALF=half, DIM=dim, BLOCK=triton.next_power_of_2(max(half, 1)), num_warps=1
    )
    return out.view(*timesteps.shape, dim)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: (N...) -> (N..., dim), always float32."""
    if use_triton(timesteps) and dim >= 2 and timesteps.dtype != torch.bool:
        return timestep_embedding_triton(timesteps, dim, max_period)
    return timestep_embedding_reference(timesteps, dim, max_period)
