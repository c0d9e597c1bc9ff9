"""Wan2.1 / Wan2.2 video diffusion transformer (our implementation of diffusers' WanTransformer3DModel).

Reading order: config -> rotary embedding -> condition embedder -> attention -> block -> model
-> loading. Parameter names and shapes are exactly diffusers' so its safetensors load with
`load_state_dict(strict=True)`, and the math (including where diffusers upcasts to float32)
is the same, so outputs match diffusers to float rounding.

Shape legend: B batch, C latent channels, F/H/W latent frames/height/width, L video tokens
(F' * H' * W' after patchifying), S text tokens, D model width, Hd heads, Dh head dim.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from diffserve.kernels.attention import attention, attention_varlen
from diffserve.worker.models.step_cache import RowCache, Rows, cached_blocks, forward_rows, take
from diffserve.worker.models.checkpoint import load_module, read_config
from diffserve.worker.models.layers import (
    FeedForward,
    FP32LayerNorm,
    Segments,
    TextProjection,
    TimestepEmbedding,
    gated_residual,
    norm_modulate,
    qk_norm_rope,
    timestep_embedding,
)
from diffserve.worker.models.rope import grid_tables, rotary_tables

# Any parameter with one of these as a dotted name component stays float32 when loading in a
# lower precision (diffusers' `_keep_in_fp32_modules` for Wan, with the same matching rule).
KEEP_IN_FP32 = frozenset({"rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"})

# Keys some I2V checkpoints carry but the model never uses (diffusers ignores them too).
IGNORED_CHECKPOINT_KEYS = ("norm_added_q",)


@dataclasses.dataclass(frozen=True)
class WanConfig:
    """The fields of diffusers' transformer/config.json that shape the model (defaults: Wan2.1 14B)."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int | None = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"  # every Wan uses RMS q/k norm across heads, as diffusers
    eps: float = 1e-6
    image_dim: int | None = None  # I2V: CLIP image feature width
    added_kv_proj_dim: int | None = None  # I2V: width fed to the image K/V projections
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None  # I2V FLF2V: learned position table for image tokens

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WanConfig:
        """Build from a config.json dict; unknown keys (`_class_name`, `window_size`, ...) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if "patch_size" in kwargs:
            kwargs["patch_size"] = tuple(kwargs["patch_size"])
        return cls(**kwargs)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


# ---------------------------------------------------------------------------------------------
# Rotary position embedding over (frame, height, width)
# ---------------------------------------------------------------------------------------------


class WanRotaryEmbedding(nn.Module):
    """3-D RoPE: the head dim is split into frame / height / width parts, each a 1-D RoPE.

    Holds only non-persistent buffers (not in the state dict); `reset_tables` rebuilds them,
    e.g. after the model was created on the meta device.
    """

    def __init__(self, head_dim: int, patch_size: tuple[int, int, int], max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        self.patch_size = patch_size
        self.max_seq_len = max_seq_len
        self.theta = theta
        h_dim = w_dim = 2 * (head_dim // 6)
        self.split_sizes = (head_dim - h_dim - w_dim, h_dim, w_dim)  # (t, h, w) parts of Dh
        self.register_buffer("freqs_cos", torch.empty(0), persistent=False)
        self.register_buffer("freqs_sin", torch.empty(0), persistent=False)
        self.reset_tables()

    def reset_tables(self, device: torch.device | str | None = None) -> None:
        # Computed on CPU in float64 (like diffusers), then moved: (max_seq_len, Dh) float32 each.
        tables = [rotary_tables(d, self.max_seq_len, self.theta, device="cpu") for d in self.split_sizes]
        self.freqs_cos = torch.cat([cos for cos, _ in tables], dim=1).to(device)
        self.freqs_sin = torch.cat([sin for _, sin in tables], dim=1).to(device)

    def forward(self, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """grid = (F', H', W') token grid -> cos, sin each (1, L, 1, Dh), L = F' * H' * W'."""
        axes = list(zip(self.freqs_cos.split(self.split_sizes, dim=1), self.freqs_sin.split(self.split_sizes, dim=1)))
        cos, sin = grid_tables(axes, grid)  # (L, Dh)
        return cos[None, :, None, :], sin[None, :, None, :]


# ---------------------------------------------------------------------------------------------
# Conditioning: timestep, text and (I2V) image embeddings
# ---------------------------------------------------------------------------------------------


class WanImageEmbedding(nn.Module):
    """I2V: CLIP image tokens -> model width (norm, GELU MLP, norm)."""

    def __init__(self, in_dim: int, dim: int, pos_embed_seq_len: int | None = None):
        super().__init__()
        self.norm1 = FP32LayerNorm(in_dim)
        self.ff = FeedForward(in_dim, inner_dim=in_dim, dim_out=dim, approximate="none")
        self.norm2 = FP32LayerNorm(dim)
        self.pos_embed = None
        if pos_embed_seq_len is not None:
            self.pos_embed = nn.Parameter(torch.zeros(1, pos_embed_seq_len, in_dim))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # image: (B, S_img, in_dim) -> (B, S_img, D)
        if self.pos_embed is not None:
            # FLF2V: rows come in (first frame, last frame) pairs, (2B, S, in_dim) -> (B, 2S, in_dim),
            # then the learned positions are added.
            _, s, c = image.shape
            image = image.reshape(-1, 2 * s, c) + self.pos_embed
        return self.norm2(self.ff(self.norm1(image)))


class WanConditionEmbedder(nn.Module):
    """Timestep -> (temb, six AdaLN modulations); text (and image) features -> model width."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim = cfg.inner_dim
        self.freq_dim = cfg.freq_dim
        self.time_embedder = TimestepEmbedding(cfg.freq_dim, dim)
        self.act_fn = nn.SiLU()
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = TextProjection(cfg.text_dim, dim)
        self.image_embedder = None
        if cfg.image_dim is not None:
            self.image_embedder = WanImageEmbedding(cfg.image_dim, dim, cfg.pos_embed_seq_len)

    def forward(
        self, timestep: torch.Tensor, context: torch.Tensor, context_image: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """timestep (B, T) with T = 1 (one per sample) or T = L (one per token); context (B, S, text_dim);
        context_image (B, S_img, image_dim) or None.

        Returns temb (B, T, D), block modulations (B, T, 6, D), text (B, S, D), image (B, S_img, D) or None.
        """
        t_freq = timestep_embedding(timestep, self.freq_dim)  # (B, T, freq_dim) float32
        t_freq = t_freq.to(self.time_embedder.linear_1.weight.dtype)  # float32 unless fp32 was not kept
        temb = self.time_embedder(t_freq).to(context.dtype)  # (B, T, D)
        modulation = self.time_proj(self.act_fn(temb)).unflatten(-1, (6, -1))  # (B, T, 6, D)
        text = self.text_embedder(context)  # (B, S, D)
        image = self.image_embedder(context_image) if context_image is not None else None
        return temb, modulation, text, image


# ---------------------------------------------------------------------------------------------
# Attention and transformer block
# ---------------------------------------------------------------------------------------------


class WanAttention(nn.Module):
    """Multi-head attention with RMS q/k norm over all heads.

    Self-attention when `context` is None (with RoPE), cross-attention to text otherwise. With
    `added_kv_dim` set (I2V) it also attends to image tokens with its own K/V projections and
    adds the two results.
    """

    def __init__(self, dim: int, heads: int, eps: float, added_kv_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # index 0 keeps diffusers' `to_out.0` keys
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.add_k_proj = self.add_v_proj = None
        if added_kv_dim is not None:
            self.add_k_proj = nn.Linear(added_kv_dim, dim)
            self.add_v_proj = nn.Linear(added_kv_dim, dim)
            self.norm_added_k = nn.RMSNorm(dim, eps=eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(2, (self.heads, -1))  # (B, L, D) -> (B, L, Hd, Dh)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The attention seam: (B, L, Hd, Dh) queries against (B, S, Hd, Dh) keys / values. A
        parallel plan (worker/parallel/plans/) may replace it on an instance."""
        return attention(q, k, v)

    def attend_segments(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments, own_keys: bool) -> torch.Tensor:
        """Packed requests (B = 1, L = sum of the segments): each segment's queries attend only to its
        own keys — the same segment of k / v for self-attention (`own_keys`), else row i of k / v (its
        own prompt, k / v: (N, S, Hd, Dh), read as one (1, N * S, Hd, Dh) sequence) — in one varlen
        attention call. Packing runs on one process only, so no parallel plan replaces this."""
        if own_keys:
            return attention_varlen(q, k, v, segments.lengths, segments.lengths)
        keys = segments.keys(k.shape[1])
        return attention_varlen(q, k.flatten(0, 1)[None], v.flatten(0, 1)[None], segments.lengths, keys)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        context_image: torch.Tensor | None = None,
        segments: Segments | None = None,
    ) -> torch.Tensor:
        # x: (B, L, D), or FP8Rows of it for FP8 projections; context: (B, S, D) or None; context_image: (B, S_img, D) or None.
        # Packed (`segments`, the requests' token counts): x is (1, sum L, D), context and context_image
        # have one row per segment.
        source = x if context is None else context
        q = qk_norm_rope(self._heads(self.to_q(x)), self.norm_q, rope)  # (B, L, Hd, Dh), rope on self-attention only
        k = qk_norm_rope(self._heads(self.to_k(source)), self.norm_k, rope)  # (B, S, Hd, Dh)
        v = self._heads(self.to_v(source))  # (B, S, Hd, Dh)

        def attend(k: torch.Tensor, v: torch.Tensor, own_keys: bool) -> torch.Tensor:
            if segments is None:
                return self.attend(q, k, v)
            return self.attend_segments(q, k, v, segments, own_keys)

        out = attend(k, v, context is None).flatten(2, 3).type_as(q)  # (B, L, D)
        if context_image is not None and self.add_k_proj is not None:
            k_img = qk_norm_rope(self._heads(self.add_k_proj(context_image)), self.norm_added_k, None)  # (B, S_img, Hd, Dh)
            v_img = self._heads(self.add_v_proj(context_image))
            out = out + attend(k_img, v_img, False).flatten(2, 3).type_as(q)
        return self.to_out[0](out)


class WanBlock(nn.Module):
    """AdaLN-modulated self-attention, plain cross-attention to the prompt, modulated GELU MLP."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim = cfg.inner_dim
        self.norm1 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.attn1 = WanAttention(dim, cfg.num_attention_heads, cfg.eps)
        self.attn2 = WanAttention(dim, cfg.num_attention_heads, cfg.eps, cfg.added_kv_proj_dim)
        self.norm2 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, inner_dim=cfg.ffn_dim, approximate="tanh")
        self.norm3 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        modulation: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        context_image: torch.Tensor | None = None,
        segments: Segments | None = None,
    ) -> torch.Tensor:
        # x: (B, L, D); modulation: (B, T, 6, D) with T = 1 or L; the six parts are float32 (B, T, D).
        # Packed requests (`segments`): x (1, sum L, D), modulation (N, 1, 6, D), one row per request,
        # read per token through segments.index; context has a row per segment.
        mods = (self.scale_shift_table + modulation.float()).unbind(2)
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = mods
        index = segments.index if segments is not None else None

        # 1. Self-attention (modulation and residual in float32). `into`: the linears reading h (layers.py, FP8).
        h = norm_modulate(x, shift_sa, scale_sa, self.norm1, index=index, into=(self.attn1.to_q, self.attn1.to_k, self.attn1.to_v))
        x = gated_residual(x, self.attn1(h, rope=rope, segments=segments), gate_sa, index)

        # 2. Cross-attention to the prompt (and image), no modulation.
        h = self.norm2(x)  # FP32LayerNorm (float32 inside) or Identity
        x = x + self.attn2(h, context=context, context_image=context_image, segments=segments)

        # 3. Feed-forward.
        h = norm_modulate(x, shift_ff, scale_ff, self.norm3, index=index, into=self.ffn.net[0].proj)
        x = gated_residual(x, self.ffn(h), gate_ff, index)
        return x


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class WanTransformer(nn.Module):
    """The Wan2.1 / Wan2.2 denoiser (diffusers' WanTransformer3DModel, same weights and math).

    Owns the patch embedding (Conv3d), the 3-D rotary tables, the timestep/text(/image)
    condition embedder, the `num_layers` transformer blocks and the output head (AdaLN + linear
    + unpatchify). It does not own the text encoder, VAE or sampler. Each sample in a batch
    carries its own timestep, so requests at different denoising steps can share a forward.
    """

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.inner_dim
        out_channels = cfg.out_channels or cfg.in_channels
        self.rope = WanRotaryEmbedding(cfg.attention_head_dim, cfg.patch_size, cfg.rope_max_seq_len)
        self.patch_embedding = nn.Conv3d(cfg.in_channels, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.condition_embedder = WanConditionEmbedder(cfg)
        self.blocks = nn.ModuleList([WanBlock(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, out_channels * math.prod(cfg.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        context_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow (noise) for a batch of latent videos.

        latents: (B, C, F, H, W); timestep: (B,) one per sample, or (B, L) one per video token
        (Wan2.2 TI2V); context: (B, S, text_dim) text-encoder states; context_image (I2V only):
        (B, S_img, image_dim) CLIP image states ((2B, S_img, image_dim) for FLF2V).
        Returns (B, C_out, F, H, W).
        """
        x, text, modulation, rope, image, temb, grid = self._embed(latents, timestep, context, context_image)
        for block in self.blocks:
            x = block(x, text, modulation, rope, image)
        return self._head(x, temb, grid)

    def forward_cached(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        context_image: torch.Tensor | None,
        caches: list[RowCache],
    ) -> torch.Tensor:
        """`forward` with a step cache per row (None: the row is exact; worker/models/step_cache.py):
        rows that reuse their cache leave the batch for what they skip, the others run on together."""

        def run(rows: Rows) -> torch.Tensor:
            x, text, modulation, rope, image, temb, grid = self._embed(
                take(latents, rows), take(timestep, rows), take(context, rows), take(context_image, rows))

            def first(stream, sub):
                return (self.blocks[0](stream[0], take(text, sub), take(modulation, sub), rope, take(image, sub)),)

            def rest(stream, sub):
                y, text_rows, mod_rows, image_rows = stream[0], take(text, sub), take(modulation, sub), take(image, sub)
                for block in self.blocks[1:]:
                    y = block(y, text_rows, mod_rows, rope, image_rows)
                return y

            row_caches = caches if rows is None else [caches[i] for i in rows]
            return self._head(cached_blocks((x,), row_caches, first, rest), temb, grid)

        return forward_rows(caches, run)

    def _embed(self, latents, timestep, context, context_image):
        """Patchify, rotary tables and conditioning: (x (B, L, D), text, modulation, rope, image, temb, grid)."""
        f, h, w = latents.shape[2:]
        pt, ph, pw = self.config.patch_size
        grid = (f // pt, h // ph, w // pw)  # (F', H', W')
        rope = self.rope(grid)  # cos, sin: (1, L, 1, Dh)

        # Patchify: (B, C, F, H, W) -> (B, D, F', H', W') -> (B, L, D), tokens in (f, h, w) order.
        x = self.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous()

        # Conditioning. temb: (B, T, D), modulation: (B, T, 6, D), T = 1 or L.
        t = timestep if timestep.ndim == 2 else timestep[:, None]  # (B, T)
        temb, modulation, text, image = self.condition_embedder(t, context, context_image)  # text: (B, S, D)
        return x, text, modulation, rope, image, temb, grid

    def _head(self, x: torch.Tensor, temb: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """AdaLN (float32), linear to patch pixels, unpatchify: (B, L, D) -> (B, C_out, F, H, W)."""
        pt, ph, pw = self.config.patch_size
        shift, scale = (self.scale_shift_table + temb.unsqueeze(2)).unbind(2)  # (B, T, D) each
        x = norm_modulate(x, shift, scale, self.norm_out)
        x = self.proj_out(x)  # (B, L, pt * ph * pw * C_out)

        # Unpatchify: (B, F', H', W', pt, ph, pw, C) -> (B, C, F'pt, H'ph, W'pw).
        x = x.reshape(x.shape[0], *grid, pt, ph, pw, -1)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(x.shape[0], x.shape[1], grid[0] * pt, grid[1] * ph, grid[2] * pw)

    def forward_packed(
        self,
        latents: list[torch.Tensor],
        timestep: torch.Tensor,
        context: torch.Tensor,
        context_image: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Requests of different sizes in one forward (mixed-shape batching): their tokens are
        concatenated into one sequence, each with its own rotary positions, timestep modulation,
        prompt and attention span, and each output equals its own forward's (to float rounding).

        latents: N tensors (C, F_i, H_i, W_i); timestep (N,); context (N, S, text_dim) (one prompt per
        request; rows of a CFG pair are two requests); context_image (N, S_img, image_dim) or None.
        Returns N tensors (C_out, F_i, H_i, W_i).
        """
        pt, ph, pw = self.config.patch_size
        grids = [(l.shape[1] // pt, l.shape[2] // ph, l.shape[3] // pw) for l in latents]
        segments = Segments([math.prod(g) for g in grids], latents[0].device)  # once for every block
        ropes = [self.rope(g) for g in grids]
        rope = (torch.cat([c for c, _ in ropes], dim=1), torch.cat([s for _, s in ropes], dim=1))  # (1, sum L, 1, Dh)
        # Patchify each request; their tokens one after the other: (1, sum L, D).
        x = torch.cat([self.patch_embedding(l[None]).flatten(2).transpose(1, 2) for l in latents], dim=1).contiguous()

        # Modulation stays one row per request, (N, 1, 6, D): the blocks' kernels read it per token by segments.index.
        temb, modulation, text, image = self.condition_embedder(timestep[:, None], context, context_image)  # (N, 1, ...)
        for block in self.blocks:
            x = block(x, text, modulation, rope, image, segments=segments)

        shift, scale = (self.scale_shift_table + temb.unsqueeze(2)).unbind(2)  # (N, 1, D) each
        x = self.proj_out(norm_modulate(x, shift, scale, self.norm_out, index=segments.index))[0]  # (sum L, pt * ph * pw * C_out)
        outputs = []
        for tokens, grid in zip(x.split(segments.counts), grids):
            y = tokens.reshape(*grid, pt, ph, pw, -1).permute(6, 0, 3, 1, 4, 2, 5)
            outputs.append(y.reshape(y.shape[0], grid[0] * pt, grid[1] * ph, grid[2] * pw))
        return outputs

    # -----------------------------------------------------------------------------------------
    # Loading
    # -----------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype, device: torch.device | str, ignore: tuple[str, ...] = ()) -> WanTransformer:
        """Load the `transformer/` folder of a diffusers Wan pipeline.

        The model is built on the meta device and the checkpoint tensors are assigned in place
        (`assign=True`), so weights are allocated once, directly on `device`. Parameters under
        KEEP_IN_FP32 stay float32, everything else floating becomes `dtype`. Returns the model
        in eval mode with gradients off.
        """
        cfg = WanConfig.from_dict(read_config(path))
        model = load_module(lambda: cls(cfg), path, dtype, device, KEEP_IN_FP32, IGNORED_CHECKPOINT_KEYS + tuple(ignore))
        model.rope.reset_tables(device)  # non-persistent buffers are still on meta
        return model

