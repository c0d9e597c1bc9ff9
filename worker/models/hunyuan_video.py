"""HunyuanVideo video diffusion transformer (our implementation of diffusers' HunyuanVideoTransformer3DModel).

Reading order: config -> small pieces (RoPE, masked attention) -> conditioning (timestep +
guidance + pooled CLIP; token refiner for the LLaMA states) -> dual-stream block -> single-stream
block -> model -> loading. Parameter names and shapes are exactly diffusers' so its safetensors load
with `load_state_dict(strict=True)`; the math (and where diffusers computes in float32: RMS norm,
RoPE, the timestep sinusoids) is the same, so outputs match diffusers to float rounding.

Text padding. Each sample's text is `n_b` valid tokens followed by padding (right padding, as the
reference's tokenizer and its transformer's mask assume). Instead of an attention mask we give each
sample exactly its valid keys: attention over [video tokens, first n_b text tokens] (refiner: the
first n_b text tokens). That is the reference's mask, so a sample's output does not depend on how
much padding its batch carries (batched equals solo), and `kernels.attention.attention` stays the
only attention call. Padded text positions are never read by valid tokens and are dropped at the end.

Parallelism is applied from outside (worker/parallel/plans/hunyuan_video.py): the model has one
attention seam per attention module (`attend`) and no parallel code.

Shape legend: B batch, C latent channels, F/H/W latent frames/height/width, L video tokens
(F' * H' * W' after patchifying), S text tokens (padded), D model width, Hd heads, Dh head dim.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffserve.kernels.attention import attention
from diffserve.worker.models.checkpoint import load_module, read_config
from diffserve.worker.models.layers import (
    AdaLNZero,
    FeedForward,
    TimeGuidanceTextEmbedding,
    gated_residual,
    linear_gelu,
    norm_modulate,
    qk_norm_rope,
)
from diffserve.worker.models.rope import grid_tables, rotary_tables
from diffserve.worker.transfer import to_device


@dataclasses.dataclass(frozen=True)
class HunyuanVideoConfig:
    """The fields of diffusers' transformer/config.json (defaults: HunyuanVideo 13B T2V)."""

    in_channels: int = 16
    out_channels: int | None = 16
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    num_layers: int = 20  # dual-stream blocks
    num_single_layers: int = 40  # single-stream blocks
    num_refiner_layers: int = 2
    mlp_ratio: float = 4.0
    patch_size: int = 2
    patch_size_t: int = 1
    qk_norm: str = "rms_norm"
    guidance_embeds: bool = True
    text_embed_dim: int = 4096
    pooled_projection_dim: int = 768
    rope_theta: float = 256.0
    rope_axes_dim: tuple[int, int, int] = (16, 56, 56)
    image_condition_type: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HunyuanVideoConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if "rope_axes_dim" in kwargs:
            kwargs["rope_axes_dim"] = tuple(kwargs["rope_axes_dim"])
        cfg = cls(**kwargs)
        if cfg.image_condition_type == "token_replace":
            raise NotImplementedError("HunyuanVideo-I2V token_replace conditioning is not implemented")
        if cfg.qk_norm != "rms_norm":
            raise NotImplementedError(f"qk_norm {cfg.qk_norm!r}: only rms_norm is implemented")
        return cfg

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


# ---------------------------------------------------------------------------------------------
# Small pieces
# ---------------------------------------------------------------------------------------------


class _LinearSiLU(nn.Module):
    """Linear then SiLU at `net.0` of a feed-forward (diffusers' activation_fn="linear-silu")."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.proj(x))


class SiLUFeedForward(nn.Module):
    """The refiner's MLP: `net.0.proj` + SiLU, `net.2` (net.1 is diffusers' dropout slot)."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.net = nn.ModuleList([_LinearSiLU(dim, inner_dim), nn.Identity(), nn.Linear(inner_dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


def rope_3d(
    grid: tuple[int, int, int], axes_dim: Sequence[int], theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (1, L, 1, Dh) for tokens in (f, h, w) order; Dh is split into (t, h, w) = axes_dim parts,
    each a 1-D interleaved RoPE over that axis' position (angles in float32, as diffusers)."""
    axes = [rotary_tables(dim, size, theta, device=device, freqs_dtype=torch.float32) for size, dim in zip(grid, axes_dim)]
    cos, sin = grid_tables(axes, grid)  # (L, Dh)
    return cos[None, :, None, :], sin[None, :, None, :]


class RotaryEmbedding(nn.Module):
    """`rope_3d` as a module (no parameters; diffusers' `rope`)."""

    def __init__(self, axes_dim: Sequence[int], theta: float):
        super().__init__()
        self.axes_dim, self.theta = tuple(axes_dim), theta

    def forward(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_3d(grid, self.axes_dim, self.theta, device)


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_lengths: Sequence[int]) -> torch.Tensor:
    """Attention where row b sees only keys [0, key_lengths[b]); q (B, Lq, Hd, Dh), k/v (B, Lk, Hd, Dh).

    Rows with the same key length share one call; with no padding it is one plain call.
    """
    lk = k.shape[1]
    if all(n == lk for n in key_lengths):
        return attention(q, k, v)
    out = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    for n in sorted(set(key_lengths)):
        rows = [b for b, nb in enumerate(key_lengths) if nb == n]
        if len(rows) == q.shape[0]:
            return attention(q, k[:, :n], v[:, :n])
        idx = to_device(rows, q.device)
        out[idx] = attention(q[idx], k[idx, :n], v[idx, :n]).to(out.dtype)
    return out


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(2, (heads, -1))  # (B, L, D) -> (B, L, Hd, Dh)


# ---------------------------------------------------------------------------------------------
# Conditioning
# ---------------------------------------------------------------------------------------------


class RefinerAttention(nn.Module):
    """Plain self-attention of the token refiner (to_q/to_k/to_v/to_out.0, biases, no q/k norm)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        q, k, v = (_heads(proj(x), self.heads) for proj in (self.to_q, self.to_k, self.to_v))
        out = prefix_attention(q, k, v, lengths).flatten(2, 3).to(q.dtype)
        return self.to_out[0](out)


class RefinerBlock(nn.Module):
    """Pre-norm self-attention + SiLU MLP over the text tokens, each residual gated by temb."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefinerAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.ff = SiLUFeedForward(dim, int(dim * mlp_ratio))
        self.norm_out = nn.Module()
        self.norm_out.linear = nn.Linear(dim, 2 * dim)  # key `norm_out.linear`: the two gates

    def forward(self, x: torch.Tensor, temb: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        # x (B, S, D), temb (B, D)
        gate_msa, gate_mlp = self.norm_out.linear(F.silu(temb)).unsqueeze(1).chunk(2, dim=-1)  # (B, 1, D) each
        x = x + self.attn(self.norm1(x), lengths) * gate_msa
        return x + self.ff(self.norm2(x)) * gate_mlp


class TokenRefiner(nn.Module):
    """LLaMA states -> model width, refined by a few self-attention blocks conditioned on the timestep
    and the masked mean of the text (diffusers' HunyuanVideoTokenRefiner, key `context_embedder`)."""

    def __init__(self, in_dim: int, heads: int, head_dim: int, num_layers: int):
        super().__init__()
        dim = heads * head_dim
        self.time_text_embed = TimeGuidanceTextEmbedding(dim, in_dim, with_guidance=False)
        self.proj_in = nn.Linear(in_dim, dim)
        self.token_refiner = nn.Module()
        self.token_refiner.refiner_blocks = nn.ModuleList([RefinerBlock(dim, heads) for _ in range(num_layers)])

    def forward(self, text: torch.Tensor, timestep: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        # text (B, S, in_dim) -> (B, S, D)
        s = text.shape[1]
        mask = torch.arange(s, device=text.device)[None, :] < to_device(lengths, text.device)[:, None]
        mask = mask.float().unsqueeze(-1)  # (B, S, 1)
        pooled = ((text * mask).sum(dim=1) / mask.sum(dim=1)).to(text.dtype)  # masked mean (B, in_dim)
        temb = self.time_text_embed(timestep, pooled)
        x = self.proj_in(text)
        for block in self.token_refiner.refiner_blocks:
            x = block(x, temb, lengths)
        return x


# ---------------------------------------------------------------------------------------------
# Transformer blocks
# ---------------------------------------------------------------------------------------------


class HunyuanVideoAttention(nn.Module):
    """Attention over [video tokens, text tokens]; RoPE on the video part, RMS q/k norm per head.

    Dual-stream blocks have separate text projections (add_*_proj, norm_added_*, to_add_out) and
    output projections; single-stream blocks share one set of projections and have no output one.
    """

    def __init__(self, dim: int, heads: int, dual: bool):
        super().__init__()
        self.heads = heads
        head_dim = dim // heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_q, self.norm_k = nn.RMSNorm(head_dim, eps=1e-6), nn.RMSNorm(head_dim, eps=1e-6)
        self.dual = dual
        if dual:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.norm_added_q, self.norm_added_k = nn.RMSNorm(head_dim, eps=1e-6), nn.RMSNorm(head_dim, eps=1e-6)
            self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
            self.to_add_out = nn.Linear(dim, dim)

    def attend(self, q, k, v, text, key_lengths: Sequence[int]) -> torch.Tensor:
        """The attention seam: video q, k, v (B, L, Hd, Dh) and the text's `text` (B, S, Hd, Dh) each,
        attended as [video, text], row b against keys [0, key_lengths[b]) -> (B, L + S, Hd, Dh). A
        parallel plan (worker/parallel/plans/) may replace it on an instance."""
        q, k, v = torch.cat([q, text[0]], 1), torch.cat([k, text[1]], 1), torch.cat([v, text[2]], 1)
        return prefix_attention(q, k, v, key_lengths)

    def forward(
        self,
        x: torch.Tensor,
        num_video: int,
        rope: tuple[torch.Tensor, torch.Tensor],
        key_lengths: Sequence[int],
        context: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # dual: x video (B, L, D), context text (B, S, D) -> (video out, text out), each projected
        # single: x = [video, text] (B, L + S, D) -> (B, L + S, D), not projected (the block's proj_out does it)
        # key_lengths: row b attends to keys [0, key_lengths[b]) of [video, text].
        n = num_video
        q, k, v = (_heads(proj(x), self.heads) for proj in (self.to_q, self.to_k, self.to_v))
        if self.dual:
            tq, tk, tv = (_heads(proj(context), self.heads) for proj in (self.add_q_proj, self.add_k_proj, self.add_v_proj))
            tq, tk = qk_norm_rope(tq, self.norm_added_q, None), qk_norm_rope(tk, self.norm_added_k, None)
        else:  # one projection of [video, text]: q/k normed throughout, rotated on the video part only
            tq, tk, tv = qk_norm_rope(q[:, n:], self.norm_q, None), qk_norm_rope(k[:, n:], self.norm_k, None), v[:, n:]
            q, k, v = q[:, :n], k[:, :n], v[:, :n]
        q, k = qk_norm_rope(q, self.norm_q, rope), qk_norm_rope(k, self.norm_k, rope)  # (B, L, Hd, Dh)

        out = self.attend(q, k, v, (tq, tk, tv), key_lengths)  # (B, L + S, Hd, Dh)
        out = out.flatten(2, 3).to(q.dtype)  # (B, L + S, D)
        if not self.dual:
            return out
        return self.to_out[0](out[:, :n]), self.to_add_out(out[:, n:])


class DualStreamBlock(nn.Module):
    """Video and text each keep their own AdaLN modulation and MLP; they meet in joint attention."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = AdaLNZero(dim, 6)
        self.norm1_context = AdaLNZero(dim, 6)
        self.attn = HunyuanVideoAttention(dim, heads, dual=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, int(dim * mlp_ratio), approximate="tanh")
        self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff_context = FeedForward(dim, int(dim * mlp_ratio), approximate="tanh")

    def forward(self, x, text, temb, rope, key_lengths):
        # x (B, L, D) video, text (B, S, D), temb (B, D)
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1.modulations(temb)  # (B, 1, D) each
        c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context.modulations(temb)

        a = self.attn  # `into`: the linears reading each norm's output (layers.py, FP8)
        h = norm_modulate(x, shift, scale, self.norm1.norm, into=(a.to_q, a.to_k, a.to_v))
        c = norm_modulate(text, c_shift, c_scale, self.norm1_context.norm, into=(a.add_q_proj, a.add_k_proj, a.add_v_proj))
        attn, text_attn = a(h, x.shape[1], rope, key_lengths, context=c)
        x = gated_residual(x, attn, gate)
        text = gated_residual(text, text_attn, c_gate)

        x = gated_residual(x, self.ff(norm_modulate(x, shift_mlp, scale_mlp, self.norm2, into=self.ff.net[0].proj)), gate_mlp)
        c = norm_modulate(text, c_shift_mlp, c_scale_mlp, self.norm2_context, into=self.ff_context.net[0].proj)
        text = gated_residual(text, self.ff_context(c), c_gate_mlp)
        return x, text


class SingleStreamBlock(nn.Module):
    """Video and text as one sequence: one modulation, attention and MLP in parallel, one output linear."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        mlp_dim = int(dim * mlp_ratio)
        self.attn = HunyuanVideoAttention(dim, heads, dual=False)
        self.norm = AdaLNZero(dim, 3)
        self.proj_mlp = nn.Linear(dim, mlp_dim)
        self.proj_out = nn.Linear(dim + mlp_dim, dim)

    def forward(self, xc, num_video, temb, rope, key_lengths):
        # xc = [video, text] (B, L + S, D), the first num_video tokens video
        shift, scale, gate = self.norm.modulations(temb)  # (B, 1, D) each
        h = norm_modulate(xc, shift, scale, self.norm.norm, into=(self.proj_mlp, self.attn.to_q, self.attn.to_k, self.attn.to_v))
        mlp = linear_gelu(self.proj_mlp, h)  # (B, L + S, mlp_dim)
        attn = self.attn(h, num_video, rope, key_lengths)  # (B, L + S, D)
        return gated_residual(xc, self.proj_out(torch.cat([attn, mlp], dim=2)), gate)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class HunyuanVideoTransformer(nn.Module):
    """The HunyuanVideo denoiser (diffusers' HunyuanVideoTransformer3DModel, same weights and math).

    Owns the patch embedding, the token refiner for the LLaMA states (`context_embedder`), the
    timestep/guidance/pooled-CLIP embedding, the dual-stream then single-stream blocks and the output
    head. Each sample carries its own timestep, guidance and text length, so requests at different
    steps with different prompts share a forward.
    """

    def __init__(self, cfg: HunyuanVideoConfig):
        super().__init__()
        self.config = cfg
        dim, heads = cfg.inner_dim, cfg.num_attention_heads
        assert sum(cfg.rope_axes_dim) == cfg.attention_head_dim, "RoPE axes must split the head dim"
        patch = (cfg.patch_size_t, cfg.patch_size, cfg.patch_size)
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv3d(cfg.in_channels, dim, kernel_size=patch, stride=patch)
        self.rope = RotaryEmbedding(cfg.rope_axes_dim, cfg.rope_theta)
        self.context_embedder = TokenRefiner(cfg.text_embed_dim, heads, cfg.attention_head_dim, cfg.num_refiner_layers)
        self.time_text_embed = TimeGuidanceTextEmbedding(dim, cfg.pooled_projection_dim, cfg.guidance_embeds)
        self.transformer_blocks = nn.ModuleList([DualStreamBlock(dim, heads, cfg.mlp_ratio) for _ in range(cfg.num_layers)])
        self.single_transformer_blocks = nn.ModuleList(
            [SingleStreamBlock(dim, heads, cfg.mlp_ratio) for _ in range(cfg.num_single_layers)]
        )
        self.norm_out = nn.Module()
        self.norm_out.linear = nn.Linear(dim, 2 * dim)  # (scale, shift) of the final AdaLN
        self.norm_out.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(dim, cfg.patch_size_t * cfg.patch_size**2 * (cfg.out_channels or cfg.in_channels))

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_lengths: Sequence[int] | torch.Tensor,
        pooled: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow for a batch of latent videos.

        latents (B, C, F, H, W); timestep (B,) one per sample (0..1000); text (B, S, text_embed_dim)
        LLaMA states, row b valid in [0, text_lengths[b]) and padding after; pooled (B, pooled_dim)
        CLIP pooled output; guidance (B,) the embedded guidance scale as it is (e.g. 6.0). Returns (B, C_out, F, H, W).
        """
        b, _, f, h, w = latents.shape
        pt, p = self.config.patch_size_t, self.config.patch_size
        grid = (f // pt, h // p, w // p)  # (F', H', W')
        lengths = [int(n) for n in (text_lengths.tolist() if torch.is_tensor(text_lengths) else text_lengths)]
        assert len(lengths) == b and all(1 <= n <= text.shape[1] for n in lengths), lengths

        rope = self.rope(grid, latents.device)  # (1, L, 1, Dh) x2
        if guidance is not None:  # the reference makes it in the model dtype, then scales it by 1000
            guidance = guidance.to(self.x_embedder.proj.weight.dtype) * 1000.0
        temb = self.time_text_embed(timestep, pooled, guidance)  # (B, D)
        x = self.x_embedder.proj(latents).flatten(2).transpose(1, 2)  # (B, L, D), tokens in (f, h, w) order
        context = self.context_embedder(text, timestep, lengths)  # (B, S, D), whole on every rank
        key_lengths = [x.shape[1] + n for n in lengths]  # row b attends to all video + its valid text

        for block in self.transformer_blocks:
            x, context = block(x, context, temb, rope, key_lengths)
        num_video = x.shape[1]
        xc = torch.cat([x, context], 1)  # (B, L + S, D)
        for block in self.single_transformer_blocks:
            xc = block(xc, num_video, temb, rope, key_lengths)
        x = xc[:, :num_video]

        # Output head: AdaLN (note: scale before shift here) then linear to patch pixels.
        scale, shift = self.norm_out.linear(F.silu(temb).to(x.dtype)).unsqueeze(1).chunk(2, dim=-1)
        x = self.proj_out(norm_modulate(x, shift, scale, self.norm_out.norm))  # (B, L, C_out * pt * p * p), channels first

        # Unpatchify: (B, F', H', W', C, pt, p, p) -> (B, C, F'pt, H'p, W'p).
        x = x.reshape(b, *grid, -1, pt, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(b, x.shape[1], grid[0] * pt, grid[1] * p, grid[2] * p)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype, device: torch.device | str) -> HunyuanVideoTransformer:
        """Load the `transformer/` folder of a diffusers HunyuanVideo pipeline: built on the meta device,
        checkpoint tensors assigned in place (floating ones cast to `dtype`; diffusers keeps none of
        this model in float32). Returns the model in eval mode with gradients off."""
        cfg = HunyuanVideoConfig.from_dict(read_config(path))
        return load_module(lambda: cls(cfg), path, dtype, device)
