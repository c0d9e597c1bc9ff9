"""Building blocks shared by our diffusion-transformer implementations.

Wan lives on top of these today; FLUX, Qwen-Image and HunyuanVideo are meant to reuse them.
Module and parameter names follow diffusers' (`linear_1`, `net.0.proj`, ...) on
purpose: the diffusers safetensors checkpoints then load into our modules with
`load_state_dict(strict=True)` and no key renaming.

The memory-bound pieces (norms with their AdaLN modulation, gated residuals, q/k norm with RoPE,
GELU, the timestep embedding) run through diffserve.kernels' fused ops: Triton kernels on CUDA,
their torch references (the math written out) on CPU and under torch.compile.

Shape legend used in the comments: B batch, L sequence (tokens), H heads,
D head dim (or channels where there are no heads), N any number of leading dims.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffserve.kernels.activation import gelu_tanh, linear_gelu_tanh  # noqa: F401  (gelu_tanh for the models)
from diffserve.kernels.norm import layer_norm, rms_norm
from diffserve.kernels.residual import gated_residual  # noqa: F401  (x + y * gate for the models)
from diffserve.kernels.rope import apply_rotary, rms_norm_rope  # noqa: F401  (apply_rotary for the models)
from diffserve.kernels.timestep import timestep_embedding  # noqa: F401  (for the models)

# ---------------------------------------------------------------------------------------------
# Timestep conditioning
# ---------------------------------------------------------------------------------------------


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


class PooledProjection(nn.Module):
    """Pooled text embedding -> model width: linear_1 -> SiLU -> linear_2 (diffusers'
    PixArtAlphaTextProjection with act_fn="silu"; TextProjection is the GELU one). FLUX, HunyuanVideo."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act_1 = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        # (B, P) -> (B, D)
        return self.linear_2(self.act_1(self.linear_1(pooled)))


class TimeGuidanceTextEmbedding(nn.Module):
    """temb (B, D) = MLP(sin(timestep)) [+ MLP(sin(guidance))] + MLP(pooled text): the vector every
    AdaLN reads (diffusers' CombinedTimestep(Guidance)TextProjEmbeddings / HunyuanVideoConditionEmbedding).
    Keys: timestep_embedder, guidance_embedder (guidance-distilled checkpoints only), text_embedder.
    Sinusoids 256 wide. FLUX, HunyuanVideo (and its token refiner, without guidance)."""

    FREQ_DIM = 256

    def __init__(self, dim: int, pooled_dim: int, with_guidance: bool):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(self.FREQ_DIM, dim)
        self.guidance_embedder = TimestepEmbedding(self.FREQ_DIM, dim) if with_guidance else None
        self.text_embedder = PooledProjection(pooled_dim, dim)

    def forward(self, timestep: torch.Tensor, pooled: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        # timestep, guidance: (B,) on the 0..1000 scale the sinusoids expect; pooled (B, P) -> temb (B, D)
        temb = self.timestep_embedder(timestep_embedding(timestep, self.FREQ_DIM).to(pooled.dtype))
        if self.guidance_embedder is not None:
            if guidance is None:
                raise ValueError("this checkpoint is guidance-distilled: pass a guidance scale per sample")
            temb = temb + self.guidance_embedder(timestep_embedding(guidance, self.FREQ_DIM).to(pooled.dtype))
        return temb + self.text_embedder(pooled)


class AdaLNZero(nn.Module):
    """SiLU(temb) -> linear -> `chunks` modulation vectors, plus a parameter-free LayerNorm (eps 1e-6)
    that the block applies them with (`norm_modulate(x, shift, scale, self.norm)`).

    `chunks` = 6 for diffusers' AdaLayerNormZero (double-stream blocks), 3 for AdaLayerNormZeroSingle,
    2 for AdaLayerNormContinuous (FLUX's output head, whose chunks are (scale, shift) in that order).
    Keys: `linear` (the norm has none). FLUX, HunyuanVideo.
    """

    def __init__(self, dim: int, chunks: int):
        super().__init__()
        self.linear = nn.Linear(dim, chunks * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.chunks = chunks

    def modulations(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # (B, D) -> `chunks` tensors of (B, 1, D), broadcast over tokens, in diffusers' order
        return self.linear(F.silu(temb)).unsqueeze(1).chunk(self.chunks, dim=-1)


def spread(values: torch.Tensor, counts) -> torch.Tensor:
    """(R, 1, ...) per-request values -> (1, sum counts, ...): request i's value on its counts[i]
    tokens (requests packed into one sequence, mixed-shape batching)."""
    return torch.cat([values[i].expand(n, *values.shape[2:]) for i, n in enumerate(counts)])[None]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN modulation. x (B, L, D); shift/scale broadcastable, e.g. (B, 1, D) or (B, L, D).
    After a norm, `norm_modulate` does both in one pass."""
    return x * (1 + scale) + shift


def norm_modulate(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    norm: nn.LayerNorm | nn.RMSNorm | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """`modulate(norm(x), shift, scale)` in one pass, float32 inside, x's dtype out.

    x (B, L, D); shift/scale broadcastable, e.g. (B, 1, D) or (B, L, D). `norm` is an nn.LayerNorm
    (FP32LayerNorm included) or nn.RMSNorm over D whose eps and affine parameters are used; without
    one it is a LayerNorm with no affine parameters and `eps`.
    """
    if isinstance(norm, nn.RMSNorm):
        eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
        return rms_norm(x, norm.weight, eps, shift=shift, scale=scale)
    if norm is not None:
        assert isinstance(norm, nn.LayerNorm) and norm.normalized_shape == x.shape[-1:], norm
        return layer_norm(x, norm.weight, norm.bias, norm.eps, shift=shift, scale=scale)
    return layer_norm(x, eps=eps, shift=shift, scale=scale)


# ---------------------------------------------------------------------------------------------
# Normalization and feed-forward
# ---------------------------------------------------------------------------------------------


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype; the result is cast back to it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert len(self.normalized_shape) == 1, "normalizes the last dim only"
        return layer_norm(x, self.weight, self.bias, self.eps)


class _LinearGELU(nn.Module):
    """Linear followed by GELU; lives at `net.0` of FeedForward (so its weight is `net.0.proj.weight`)."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.approximate == "tanh":
            return linear_gelu_tanh(x, self.proj.weight, self.proj.bias)
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
# RMS norms and q/k norm with RoPE (the RoPE tables: worker/models/rope.py)
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """diffusers' RMSNorm: variance in float32; the result takes the weight's dtype if it is half
    precision (a float32 weight leaves it float32)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


def qk_norm_rope(x: torch.Tensor, norm: nn.Module, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """RMS q/k norm then RoPE (`apply_rotary`) in one pass, float32 inside, x's dtype out.

    x: (B, L, H, D); norm: an RMSNorm (nn.RMSNorm, or this module's RMSNorm as diffusers has it)
    over D (per head: FLUX, Qwen-Image, HunyuanVideo) or over H * D (across heads: Wan);
    rope: (cos, sin) tables as `apply_rotary` takes them, or None for the norm alone. Any other
    norm module is called on the flattened heads (B, L, H * D), then RoPE is applied.
    """
    if not isinstance(norm, (nn.RMSNorm, RMSNorm)):
        x = norm(x.flatten(-2)).unflatten(-1, x.shape[-2:])
        return apply_rotary(x, *rope) if rope is not None else x
    weight = norm.weight
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
    dim = weight.numel() if weight is not None else math.prod(norm.normalized_shape)
    cos, sin = rope if rope is not None else (None, None)
    return rms_norm_rope(x, weight, eps, cos, sin, across_heads=dim != x.shape[-1])
