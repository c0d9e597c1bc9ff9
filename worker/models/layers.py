"""Building blocks shared by our diffusion-transformer implementations.

Wan lives on top of these today; FLUX, Qwen-Image and HunyuanVideo are meant to reuse them.
Module and parameter names follow diffusers' (`linear_1`, `net.0.proj`, ...) on
purpose: the diffusers safetensors checkpoints then load into our modules with
`load_state_dict(strict=True)` and no key renaming.

The memory-bound pieces (norms with their AdaLN modulation, gated residuals, q/k norm with RoPE,
GELU, the timestep embedding) run through diffserve.kernels' fused ops: Triton kernels on CUDA,
their torch references (the math written out) on CPU and under torch.compile.

FP8 seam: a producer whose output goes straight into linears (`norm_modulate`, `linear_gelu`) takes
`into=`, those linears; when they all take FP8 input (`--quantization fp8` made them FP8Linear,
worker/models/fp8.py), the producer's kernel writes the activation quantized per token (`FP8Rows`)
instead of in the model's dtype, and the linears skip their own quantization pass. Otherwise
`into` changes nothing.

Shape legend used in the comments: B batch, L sequence (tokens), H heads,
D head dim (or channels where there are no heads), N any number of leading dims.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffserve.kernels.activation import gelu_tanh, linear_gelu_tanh  # noqa: F401  (gelu_tanh for the models)
from diffserve.kernels.attention import SeqLens
from diffserve.kernels.fp8 import FP8Rows, gelu_tanh_fp8, layer_norm_fp8, rms_norm_fp8
from diffserve.kernels.norm import layer_norm, rms_norm
from diffserve.kernels.residual import gated_residual  # noqa: F401  (x + y * gate for the models)
from diffserve.kernels.rope import apply_rotary, rms_norm_rope  # noqa: F401  (apply_rotary for the models)
from diffserve.kernels.timestep import timestep_embedding  # noqa: F401  (for the models)
from diffserve.worker.models.fp8 import FP8Linear
from diffserve.worker.transfer import to_device

# The linears a producer's output goes into: one module, several (q / k / v read one input), or None.
Into = nn.Module | tuple[nn.Module, ...] | None


def reads_fp8(into: Into) -> bool:
    """Whether every linear in `into` takes its input as FP8Rows (FP8Linear), so that the producer
    writes it quantized (this module's docstring)."""
    if into is None:
        return False
    return all(isinstance(m, FP8Linear) for m in (into if isinstance(into, tuple) else (into,)))


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


class Segments:
    """Requests packed one after the other into one token sequence (mixed-shape batching), described
    once per forward for every layer: `lengths`, each request's token count as a SeqLens (whose int32
    cumulative offsets `attention_varlen` reads), and `index`, each token's request ((sum L,) int32 on
    the device), by which the fused norm / residual kernels read the request's modulation row, (R, 1, D),
    in place: no per-token copy of the modulation is made. Both are built on the host and copied
    without waiting for the device."""

    def __init__(self, counts: tuple[int, ...] | list[int], device: torch.device | str):
        self.lengths = SeqLens(counts)
        index = torch.repeat_interleave(torch.arange(len(self.lengths), dtype=torch.int32), torch.tensor(self.lengths.lengths))
        self.index = to_device(index, device)  # (sum L,) int32
        self._keys: dict[int, SeqLens] = {}

    @property
    def counts(self) -> tuple[int, ...]:
        return self.lengths.lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def keys(self, per_request: int) -> SeqLens:
        """`per_request` keys for every request (its own prompt, as long as every other: cross-attention
        to the (R, S, D) text), cached."""
        lens = self._keys.get(per_request)
        if lens is None:
            lens = self._keys[per_request] = SeqLens((per_request,) * len(self))
        return lens


def interleave(first: torch.Tensor, second: torch.Tensor, a: Segments, b: Segments) -> torch.Tensor:
    """Two packed streams (1, sum a, ...) and (1, sum b, ...) -> (1, sum a + sum b, ...) with each
    request's part of `first`, then its part of `second`, in turn ([text, image] per request)."""
    pairs = zip(first.split(a.counts, dim=1), second.split(b.counts, dim=1))
    return torch.cat([part for pair in pairs for part in pair], dim=1)


def deinterleave(joint: torch.Tensor, a: Segments, b: Segments) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `interleave`: (first, second) streams back from the joint sequence."""
    parts = joint.split([n for pair in zip(a.counts, b.counts) for n in pair], dim=1)
    return torch.cat(parts[0::2], dim=1), torch.cat(parts[1::2], dim=1)


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
    index: torch.Tensor | None = None,
    into: Into = None,
) -> torch.Tensor | FP8Rows:
    """`modulate(norm(x), shift, scale)` in one pass, float32 inside, x's dtype out (FP8Rows when the
    linears `into` take FP8 input: this module's docstring).

    x (B, L, D); shift/scale broadcastable, e.g. (B, 1, D) or (B, L, D), or for packed requests one
    row per request, (R, 1, D), with `index` (Segments.index) saying each token's. `norm` is an
    nn.LayerNorm (FP32LayerNorm included) or nn.RMSNorm over D whose eps and affine parameters are
    used; without one it is a LayerNorm with no affine parameters and `eps`.
    """
    fp8 = reads_fp8(into)
    if isinstance(norm, nn.RMSNorm):
        eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
        return (rms_norm_fp8 if fp8 else rms_norm)(x, norm.weight, eps, shift=shift, scale=scale, index=index)
    if norm is not None:
        assert isinstance(norm, nn.LayerNorm) and norm.normalized_shape == x.shape[-1:], norm
        return (layer_norm_fp8 if fp8 else layer_norm)(x, norm.weight, norm.bias, norm.eps, shift=shift, scale=scale, index=index)
    return (layer_norm_fp8 if fp8 else layer_norm)(x, eps=eps, shift=shift, scale=scale, index=index)


# ---------------------------------------------------------------------------------------------
# Normalization and feed-forward
# ---------------------------------------------------------------------------------------------


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype; the result is cast back to it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert len(self.normalized_shape) == 1, "normalizes the last dim only"
        return layer_norm(x, self.weight, self.bias, self.eps)


def linear_gelu(linear: nn.Module, x: torch.Tensor | FP8Rows, into: Into = None) -> torch.Tensor | FP8Rows:
    """gelu_tanh(linear(x)). When the linears `into` take FP8 input, the GELU kernel writes it as
    FP8Rows (`gelu_tanh_fp8`). Else a plain nn.Linear runs `linear_gelu_tanh` (bias and GELU in the
    GEMM's epilogue on CUDA); any other linear module runs its own forward, then `gelu_tanh`: FP8Linear
    (worker/models/fp8.py), a LoraLinear adapting this step's rows (worker/models/lora.py: its
    low-rank term goes in before the GELU)."""
    if reads_fp8(into):
        return gelu_tanh_fp8(linear(x))
    if type(linear) is nn.Linear or (isinstance(linear, nn.Linear) and not getattr(linear, "adapting", False)):
        return linear_gelu_tanh(x, linear.weight, linear.bias)  # (a LoRA layer with no adapter on this step too)
    return gelu_tanh(linear(x))


class _LinearGELU(nn.Module):
    """Linear followed by GELU; lives at `net.0` of FeedForward (so its weight is `net.0.proj.weight`)."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, x: torch.Tensor | FP8Rows, into: Into = None) -> torch.Tensor | FP8Rows:
        if self.approximate == "tanh":
            return linear_gelu(self.proj, x, into)
        return F.gelu(self.proj(x), approximate=self.approximate)  # exact GELU: `into` quantizes for itself


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

    def forward(self, x: torch.Tensor | FP8Rows) -> torch.Tensor:
        # (N..., dim) -> (N..., inner_dim) -> (N..., dim_out); the hidden activation comes quantized
        # out of the GELU when net.2 takes FP8 input
        h = self.net[0](x, into=self.net[2])
        return self.net[2](self.net[1](h))


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
