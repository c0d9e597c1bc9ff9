"""Query/key RMSNorm fused with rotary position embedding (interleaved channel pairs).

    out = rotate(x * rsqrt(mean(x^2) + eps) * weight, cos, sin)        (float32 inside, x's dtype out)

x is (B, L, H, D). The RMS statistic is per head (FLUX, Qwen-Image, HunyuanVideo: RMSNorm(D)) or
across all heads of a token (Wan: RMSNorm(H * D) applied before splitting heads). The rotation
is `layers.apply_rotary`'s: channels (2i, 2i+1) turn by the angle whose cos / sin the tables hold
repeat-interleaved, (1 or B, L, 1, D) float32 (what diffusers' FLUX `apply_rotary_emb` and Wan's
rotary compute, written as real pairs). `apply_rotary` alone is the same kernel without the norm.

One Triton program per token handles all its heads, so x is read once and written once (contiguous
along the channels; pairs are split in registers).
"""

from __future__ import annotations

import torch

from diffserve.kernels.norm import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x_even, x_odd = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, L, H, D/2) each
    cos = cos[..., 0::2]  # both entries of a pair are equal: keep one, (..., D/2)
    sin = sin[..., 1::2]
    return torch.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], dim=-1).flatten(-2)


def apply_rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotation in the tables' dtype (float32), result cast back to x's dtype."""
    return _rotate(x, cos, sin).to(x.dtype)


def rms_norm_rope_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    across_heads: bool = False,
) -> torch.Tensor:
    """RMSNorm (per head, or over all heads of a token) then the rotation, all in float32."""
    xf = x.float()
    dims = (-2, -1) if across_heads else (-1,)
    y = xf * torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float().view(x.shape[-2:] if across_heads else x.shape[-1:])
    if cos is not None:
        y = _rotate(y, cos, sin)
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _rms_norm_rope_kernel(
        x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr,
        L, eps,
        sx_b, sx_l, sx_h, sc_b, sc_l, ss_b, ss_l,
        H: tl.constexpr, D: tl.constexpr, NORM: tl.constexpr, HAS_W: tl.constexpr, ACROSS_HEADS: tl.constexpr,
        ROPE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # A token's (heads, channels) tile is loaded and stored contiguously along the channels (the
        # loads vectorize); the channel pairs are split apart in registers. Loading even and odd
        # channels as two stride-2 gathers instead ran FLUX's q/k at ~ 1/16 of memory bandwidth.
        row = tl.program_id(0).to(tl.int64)  # token index in [0, B * L)
        b = row // L
        l = row % L
        h = tl.arange(0, BLOCK_H)[:, None]  # (BLOCK_H, 1) head
        d = tl.arange(0, BLOCK_D)[None, :]  # (1, BLOCK_D) channel
        d_ok = d < D
        mask = (h < H) & d_ok
        x = tl.load(x_ptr + b * sx_b + l * sx_l + h * sx_h + d, mask=mask, other=0.0).to(tl.float32)
        if NORM:
            squares = x * x  # (BLOCK_H, BLOCK_D)
            if ACROSS_HEADS:
                r = tl.rsqrt(tl.sum(tl.sum(squares, axis=1), axis=0) / (H * D) + eps)
            else:
                r = tl.rsqrt(tl.sum(squares, axis=1) / D + eps)[:, None]  # (BLOCK_H, 1)
            x = x * r
            if HAS_W:
                if ACROSS_HEADS:
                    x = x * tl.load(w_ptr + h * D + d, mask=mask, other=0.0).to(tl.float32)
                else:
                    x = x * tl.load(w_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
        if ROPE:
            cos = tl.load(cos_ptr + b * sc_b + l * sc_l + d, mask=d_ok, other=0.0).to(tl.float32)  # (1, BLOCK_D)
            sin = tl.load(sin_ptr + b * ss_b + l * ss_l + d, mask=d_ok, other=0.0).to(tl.float32)
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_H, BLOCK_D // 2, 2)))  # channels 2i, 2i + 1
            cos_even, _ = tl.split(tl.reshape(cos, (1, BLOCK_D // 2, 2)))  # the angle of pair i: cos[2i], sin[2i + 1]
            _, sin_odd = tl.split(tl.reshape(sin, (1, BLOCK_D // 2, 2)))
            rotated = tl.join(x_even * cos_even - x_odd * sin_odd, x_even * sin_odd + x_odd * cos_even)
            x = tl.reshape(rotated, (BLOCK_H, BLOCK_D))
        tl.store(out_ptr + row * (H * D) + h * D + d, x.to(out_ptr.dtype.element_ty), mask=mask)


def _table(t: torch.Tensor, b: int, l: int, d: int) -> torch.Tensor:
    t = t.expand(b, l, 1, d)
    return t if t.stride(-1) == 1 else t.contiguous()


def rms_norm_rope_triton(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    across_heads: bool,
    norm: bool = True,
) -> torch.Tensor:
    """The Triton path of `rms_norm_rope` (norm=False: of `apply_rotary`)."""
    b, l, h, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    rope = cos is not None
    if rope:
        cos, sin = _table(cos, b, l, d), _table(sin, b, l, d)
    out = torch.empty((b, l, h, d), dtype=x.dtype, device=x.device)
    block_h, block_d = triton.next_power_of_2(h), triton.next_power_of_2(d)
    _rms_norm_rope_kernel[(b * l,)](
        x, x if weight is None else weight, cos if rope else x, sin if rope else x, out,
        l, eps,
        x.stride(0), x.stride(1), x.stride(2),
        cos.stride(0) if rope else 0, cos.stride(1) if rope else 0,
        sin.stride(0) if rope else 0, sin.stride(1) if rope else 0,
        H=h, D=d, NORM=norm, HAS_W=weight is not None, ACROSS_HEADS=across_heads, ROPE=rope,
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4 if block_h * block_d <= 4096 else 8,
    )
    return out


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------


def _fits(x: torch.Tensor, cos: torch.Tensor | None) -> bool:
    """Shapes the kernel takes: (B, L, H, D) with D even, tables with one entry per token (no per-head angles)."""
    if x.ndim != 4 or x.shape[-1] % 2 or x.shape[-2] * x.shape[-1] > 16384:
        return False
    return cos is None or (cos.ndim == 4 and cos.shape[-2] == 1 and cos.shape[-1] == x.shape[-1])


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of x by the angles in the tables.

    x: (B, L, H, D); cos/sin: repeat-interleaved float32 tables broadcastable to x, e.g. (1, L, 1, D).
    The rotation runs in float32 and the result has x's dtype.
    """
    if use_triton(x, cos, sin) and _fits(x, cos) and cos.dtype == sin.dtype == torch.float32:
        return rms_norm_rope_triton(x, None, 0.0, cos, sin, across_heads=False, norm=False)
    return apply_rotary_reference(x, cos, sin)


def rms_norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    across_heads: bool = False,
) -> torch.Tensor:
    """RMSNorm of each head (or, across_heads, of each token's H * D channels), then RoPE if tables are given.

    x: (B, L, H, D); weight: (D,), or (H * D,) across heads, or None; cos/sin as `apply_rotary`.
    float32 inside, x's dtype out.
    """
    if weight is not None:
        expected = x.shape[-2] * x.shape[-1] if across_heads else x.shape[-1]
        assert weight.numel() == expected, f"RMSNorm weight has {weight.numel()} values, x {tuple(x.shape)} wants {expected}"
    if use_triton(x, weight, cos, sin) and _fits(x, cos):
        return rms_norm_rope_triton(x, weight, eps, cos, sin, across_heads)
    return rms_norm_rope_reference(x, weight, eps, cos, sin, across_heads)
