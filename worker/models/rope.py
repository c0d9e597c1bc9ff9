"""Rotary position embedding tables: one implementation for every family.

RoPE here is the interleaved-pairs form: channel pairs (2i, 2i+1) rotate together at frequency
theta^(-2i/d), so each angle's cos / sin appears twice along the last dim (`apply_rotary` takes
them so). A multi-axis RoPE splits the head dim into per-axis parts (frame, row, column), each a 1-D
RoPE of that axis' position. What differs between families is only

- the precision the angles are computed in (`dtype`: float64 for Wan and FLUX as diffusers does
  where the device allows it, float32 for Qwen-Image and HunyuanVideo), the tables always float32;
- the positions (0.. per axis, Qwen-Image's centred rows / columns, FLUX's position ids per token);
- the layout: per token from ids (`axes_tables`), or over a (frames, rows, columns) token grid in
  (f, h, w) order (`grid_tables`).

Shape legend: N positions, L tokens, Dh head dim (the sum of the axes' dims).
"""

from __future__ import annotations

import torch

Tables = tuple[torch.Tensor, torch.Tensor]  # cos, sin


def axis_angles(positions: torch.Tensor, dim: int, theta: float, dtype: torch.dtype) -> torch.Tensor:
    """Angles of a 1-D RoPE: positions (N,) -> (N, dim/2) in `dtype`, position × theta^(-2i/dim)."""
    assert dim % 2 == 0, f"rotary dim must be even, got {dim}"
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=dtype, device=positions.device) / dim))  # (dim/2,)
    return torch.outer(positions.to(dtype), inv_freq)


def axis_tables(positions: torch.Tensor, dim: int, theta: float = 10000.0, dtype: torch.dtype = torch.float64) -> Tables:
    """cos, sin (N, dim) float32 of a 1-D RoPE at `positions` (N,), angles computed in `dtype`."""
    angles = axis_angles(positions, dim, theta, dtype)
    return angles.cos().repeat_interleave(2, dim=-1).float(), angles.sin().repeat_interleave(2, dim=-1).float()


def axes_tables(positions: list[torch.Tensor], axes_dims: tuple[int, ...], theta: float = 10000.0,
                dtype: torch.dtype = torch.float64) -> Tables:
    """Multi-axis RoPE per token: positions[a] (N,) is every token's position on axis a; the head
    dim is split into `axes_dims`. Returns cos, sin (N, Dh) float32."""
    parts = [axis_tables(p, d, theta, dtype) for p, d in zip(positions, axes_dims)]
    return torch.cat([c for c, _ in parts], dim=-1), torch.cat([s for _, s in parts], dim=-1)


def grid_tables(axes: list[Tables], grid: tuple[int, int, int]) -> Tables:
    """Multi-axis RoPE over a (F, H, W) token grid, tokens in (f, h, w) order: axes[a] are the
    (at least grid[a], d_a) tables of axis a (only the first grid[a] rows are read).
    Returns cos, sin (L, Dh) float32, L = F·H·W."""
    f, h, w = grid

    def lay_out(tables: list[torch.Tensor]) -> torch.Tensor:
        t_part, h_part, w_part = tables
        full = torch.cat(
            [
                t_part[:f].view(f, 1, 1, -1).expand(f, h, w, -1),
                h_part[:h].view(1, h, 1, -1).expand(f, h, w, -1),
                w_part[:w].view(1, 1, w, -1).expand(f, h, w, -1),
            ],
            dim=-1,
        )  # (F, H, W, Dh)
        return full.reshape(f * h * w, -1)

    return lay_out([c for c, _ in axes]), lay_out([s for _, s in axes])


def rotary_tables(dim: int, max_len: int, theta: float = 10000.0, device: torch.device | str | None = None,
                  freqs_dtype: torch.dtype = torch.float64) -> Tables:
    """cos, sin (max_len, dim) float32 of a 1-D RoPE over positions [0, max_len)."""
    return axis_tables(torch.arange(max_len, device=device), dim, theta, freqs_dtype)
