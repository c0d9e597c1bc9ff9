"""Qwen-Image MMDiT (our implementation of diffusers' QwenImageTransformer2DModel).

A double-stream transformer: image tokens (packed 2x2 latent patches) and text tokens (Qwen2.5-VL
hidden states) keep separate weights (modulation, norms, projections, MLPs) but attend jointly,
text first. Positions are a 3-D RoPE over (frame, height, width) for image tokens, centred on the
image ("scale_rope"), and 1-D positions after the largest image extent for text tokens.

Reading order: config -> RoPE -> norms / timestep embedding -> joint attention -> block -> model
-> loading. Parameter names and shapes are exactly diffusers', so its safetensors load with
`load_state_dict(strict=True)`; the math follows diffusers' (including its float32 upcasts).

Shape legend: B batch rows, L image tokens (all images of a row: target latents first, then
Edit's conditioning image latents), S text tokens, D model width, Hd heads, Dh head dim,
Cp packed channels (latent channels x 2 x 2).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffserve.kernels.attention import attention, attention_varlen
from diffserve.worker.models.checkpoint import load_module, read_config
from diffserve.worker.models.rope import axes_tables, axis_tables, grid_tables
from diffserve.worker.models.step_cache import RowCache, Rows, cached_blocks, forward_rows, take
from diffserve.worker.models.layers import (
    FeedForward,
    RMSNorm,
    Segments,
    TimestepEmbedding,
    deinterleave,
    gated_residual,
    interleave,
    norm_modulate,
    qk_norm_rope,
)

# (frames, height, width) of one image's token grid, in packed (2x2) latent units.
ImageShape = tuple[int, int, int]

ROPE_THETA = 10000.0
ROPE_MAX_POSITIONS = 4096  # diffusers' position tables hold [-4096, 4096)
TIME_PROJ_DIM = 256


@dataclasses.dataclass(frozen=True)
class QwenImageConfig:
    """The fields of diffusers' transformer/config.json that shape the model (defaults: Qwen-Image 20B)."""

    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    zero_cond_t: bool = False
    use_additional_t_cond: bool = False
    use_layer3d_rope: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QwenImageConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if "axes_dims_rope" in kwargs:
            kwargs["axes_dims_rope"] = tuple(kwargs["axes_dims_rope"])
        cfg = cls(**kwargs)
        unsupported = [n for n in ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope") if getattr(cfg, n)]
        if unsupported:
            raise ValueError(f"Qwen-Image variants with {unsupported} set are not served yet")
        return cfg

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


# ---------------------------------------------------------------------------------------------
# Rotary position embedding: (frame, height, width) for images, a line after them for text
# ---------------------------------------------------------------------------------------------


def _centred(n: int, device) -> torch.Tensor:
    """Positions -(n - n//2) .. n//2 - 1: the image grid centred on 0 (diffusers' scale_rope)."""
    return torch.arange(n, device=device) - (n - n // 2)


def rope_tables(
    axes_dims: tuple[int, int, int], images: list[ImageShape], text_len: int, device
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """cos/sin tables, repeat-interleaved for `apply_rotary`: image (1, L, 1, Dh) and text (1, S, 1, Dh).

    Image i's frames are at positions i .. i + frames - 1; its rows and columns are centred.
    Text token j sits at position max_extent + j on all three axes, where max_extent is the largest
    half-height / half-width over the images.
    """
    d_f, d_h, d_w = axes_dims
    image_cos, image_sin = [], []
    max_extent = 0
    for index, (f, h, w) in enumerate(images):
        axes = [axis_tables(torch.arange(index, index + f, device=device), d_f, ROPE_THETA, torch.float32),
                axis_tables(_centred(h, device), d_h, ROPE_THETA, torch.float32),
                axis_tables(_centred(w, device), d_w, ROPE_THETA, torch.float32)]
        cos, sin = grid_tables(axes, (f, h, w))  # (f * h * w, Dh)
        image_cos.append(cos)
        image_sin.append(sin)
        max_extent = max(max_extent, h // 2, w // 2)
    assert max_extent + text_len <= ROPE_MAX_POSITIONS, "image + text positions exceed the RoPE range"
    text_pos = torch.arange(max_extent, max_extent + text_len, device=device)
    text_cos, text_sin = axes_tables([text_pos] * 3, axes_dims, ROPE_THETA, torch.float32)  # (S, Dh)

    def tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return cos[None, :, None, :], sin[None, :, None, :]

    return tables(torch.cat(image_cos), torch.cat(image_sin)), tables(text_cos, text_sin)


class QwenPosEmbed(nn.Module):
    """`rope_tables` as a module (no parameters; diffusers' `pos_embed`)."""

    def __init__(self, axes_dims: tuple[int, int, int]):
        super().__init__()
        self.axes_dims = axes_dims

    def forward(self, images: list[ImageShape], text_len: int, device) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        return rope_tables(self.axes_dims, images, text_len, device)


# ---------------------------------------------------------------------------------------------
# Norms and timestep embedding
# ---------------------------------------------------------------------------------------------


def qwen_timestep_embedding(timestep: torch.Tensor, dim: int = TIME_PROJ_DIM, scale: float = 1000.0) -> torch.Tensor:
    """Sinusoidal [cos | sin] embedding of timesteps in [0, 1] scaled by 1000: (B,) -> (B, dim) float32.

    Like diffusers' Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000): float32
    frequencies times the (possibly bf16-rounded) timestep, then the scale multiplies the angles.
    """
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half
    freqs = torch.exp(exponent)
    angles = scale * (timestep[:, None].float() * freqs[None, :])  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimeTextEmbed(nn.Module):
    """`time_text_embed`: sinusoidal projection then the timestep MLP (`timestep_embedder.linear_1/2`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(TIME_PROJ_DIM, dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(qwen_timestep_embedding(timestep).to(dtype))  # (B, D)


# ---------------------------------------------------------------------------------------------
# Joint attention and the double-stream block
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QwenSegments:
    """Requests packed into one forward (mixed-shape batching): request i has L_i image tokens and
    S_i text tokens (its own length, unpadded); the image stream holds every request's image tokens
    in turn (1, sum L, D; `image`), the text stream every request's text (1, sum S, D; `text`), and
    each request attends over its own [text, image] (`joint`, S_i + L_i)."""

    image: Segments
    text: Segments
    joint: Segments

    @classmethod
    def build(cls, image: tuple[int, ...], text: tuple[int, ...], device) -> QwenSegments:
        return cls(Segments(image, device), Segments(text, device), Segments([s + n for s, n in zip(text, image)], device))


class QwenImageAttention(nn.Module):
    """Image stream (to_q/k/v, norm_q/k, to_out) and text stream (add_*_proj, norm_added_*, to_add_out)
    projected separately, RMS-normed per head, rotated, then one attention over [text, image]."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.add_q_proj = nn.Linear(dim, dim)
        self.add_k_proj = nn.Linear(dim, dim)
        self.add_v_proj = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(head_dim, eps)
        self.norm_k = RMSNorm(head_dim, eps)
        self.norm_added_q = RMSNorm(head_dim, eps)
        self.norm_added_k = RMSNorm(head_dim, eps)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # diffusers' `to_out.0` (to_out.1 is dropout)
        self.to_add_out = nn.Linear(dim, dim)

    def attend(self, q, k, v, text, key_mask):
        """The attention seam: image q, k, v (B, L, Hd, Dh) and the text's `text` (B, S, Hd, Dh) each,
        attended as [text, image] with key_mask (B, S + L) or None -> (image out, text out). A
        parallel plan (worker/parallel/plans/) may replace it on an instance."""
        s = text[0].shape[1]
        out = attention(torch.cat([text[0], q], dim=1), torch.cat([text[1], k], dim=1), torch.cat([text[2], v], dim=1),
                        key_mask=key_mask)  # (B, S + L, Hd, Dh)
        return out[:, s:], out[:, :s]

    def forward(self, img, txt, img_rope, txt_rope, key_mask, segments: QwenSegments | None = None):
        # img: (B, L, D), txt: (B, S, D); key_mask: (B, S + L) bool (False at text padding) or None.
        # Packed (`segments`): img (1, sum L, D), txt (1, sum S, D); each request attends over its own
        # [text, image], unpadded (no mask).
        def heads(x):
            return x.unflatten(-1, (self.heads, -1))  # (B, N, Hd, Dh)

        img_q = qk_norm_rope(heads(self.to_q(img)), self.norm_q, img_rope)
        img_k = qk_norm_rope(heads(self.to_k(img)), self.norm_k, img_rope)
        img_v = heads(self.to_v(img))
        txt_q = qk_norm_rope(heads(self.add_q_proj(txt)), self.norm_added_q, txt_rope)
        txt_k = qk_norm_rope(heads(self.add_k_proj(txt)), self.norm_added_k, txt_rope)
        txt_v = heads(self.add_v_proj(txt))

        if segments is None:
            img_out, txt_out = self.attend(img_q, img_k, img_v, (txt_q, txt_k, txt_v), key_mask)
        else:  # one varlen call over each request's [text, image] (one process only: no plan's `attend` is bypassed)
            joint = [interleave(t, i, segments.text, segments.image) for t, i in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v))]
            txt_out, img_out = deinterleave(attention_varlen(*joint, segments.joint.lengths, segments.joint.lengths),
                                            segments.text, segments.image)
        img_out, txt_out = img_out.flatten(2, 3).to(img_q.dtype), txt_out.flatten(2, 3).to(img_q.dtype)
        return self.to_out[0](img_out.contiguous()), self.to_add_out(txt_out.contiguous())


class QwenImageBlock(nn.Module):
    """Per stream: AdaLN (shift, scale, gate) x 2 from the timestep; joint attention; GELU MLP."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))  # keys img_mod.1.*
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.attn = QwenImageAttention(dim, heads, head_dim, eps)
        self.img_mlp = FeedForward(dim, 4 * dim, approximate="tanh")
        self.txt_mlp = FeedForward(dim, 4 * dim, approximate="tanh")

    def forward(self, img, txt, temb, img_rope, txt_rope, key_mask, segments: QwenSegments | None = None):
        # img: (B, L, D), txt: (B, S, D), temb: (B, D); packed: see QwenSegments
        img_mod = self.img_mod(temb)[:, None].chunk(6, dim=-1)  # 6 x (B, 1, D): shift, scale, gate, x2
        txt_mod = self.txt_mod(temb)[:, None].chunk(6, dim=-1)
        # packed: a row per request, read per token through each stream's index
        ii, ti = (segments.image.index, segments.text.index) if segments is not None else (None, None)

        attn = self.attn  # `into`: the linears reading each norm's output (layers.py, FP8)
        img_attn, txt_attn = attn(
            norm_modulate(img, img_mod[0], img_mod[1], eps=self.eps, index=ii, into=(attn.to_q, attn.to_k, attn.to_v)),
            norm_modulate(txt, txt_mod[0], txt_mod[1], eps=self.eps, index=ti, into=(attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)),
            img_rope,
            txt_rope,
            key_mask,
            segments,
        )
        img = gated_residual(img, img_attn, img_mod[2], ii)
        txt = gated_residual(txt, txt_attn, txt_mod[2], ti)

        img_h = norm_modulate(img, img_mod[3], img_mod[4], eps=self.eps, index=ii, into=self.img_mlp.net[0].proj)
        img = gated_residual(img, self.img_mlp(img_h), img_mod[5], ii)
        txt_h = norm_modulate(txt, txt_mod[3], txt_mod[4], eps=self.eps, index=ti, into=self.txt_mlp.net[0].proj)
        txt = gated_residual(txt, self.txt_mlp(txt_h), txt_mod[5], ti)
        if txt.dtype == torch.float16:
            txt, img = txt.clip(-65504, 65504), img.clip(-65504, 65504)
        return img, txt


class AdaNormOut(nn.Module):
    """`norm_out`: LayerNorm modulated by (scale, shift) = linear(SiLU(temb)) (diffusers' AdaLayerNormContinuous)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(temb).to(x.dtype)).chunk(2, dim=-1)  # (B, D) each
        return norm_modulate(x, shift[:, None], scale[:, None], eps=self.eps)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class QwenImageTransformer(nn.Module):
    """The Qwen-Image denoiser (diffusers' QwenImageTransformer2DModel, same weights and math).

    Takes packed latents (2x2 patches already folded into channels, as the pipeline packs them),
    per-row timesteps in [0, 1] and Qwen2.5-VL text states with an optional padding mask, so rows of
    different requests (different steps, different text lengths) share one forward.
    """

    def __init__(self, cfg: QwenImageConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.inner_dim
        out_channels = cfg.out_channels or cfg.in_channels
        self.time_text_embed = TimeTextEmbed(dim)
        self.txt_norm = RMSNorm(cfg.joint_attention_dim, eps=1e-6)
        self.img_in = nn.Linear(cfg.in_channels, dim)
        self.pos_embed = QwenPosEmbed(cfg.axes_dims_rope)
        self.txt_in = nn.Linear(cfg.joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(
            [QwenImageBlock(dim, cfg.num_attention_heads, cfg.attention_head_dim) for _ in range(cfg.num_layers)]
        )
        self.norm_out = AdaNormOut(dim)
        self.proj_out = nn.Linear(dim, cfg.patch_size * cfg.patch_size * out_channels)

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None,
        image_shapes: list[ImageShape],
    ) -> torch.Tensor:
        """latents: (B, L, Cp) packed tokens of the images in `image_shapes` (same for every row),
        timestep: (B,) the sampler's timestep as it is (0..num_train_timesteps); text: (B, S, joint_attention_dim);
        text_mask: (B, S) bool, False at padding, or None when no row is padded.
        Returns (B, L, patch^2 * out_channels), the flow prediction for every image token.
        """
        x, txt, temb, img_rope, txt_rope, key_mask = self._embed(latents, timestep, text, text_mask, image_shapes)
        for block in self.transformer_blocks:
            x, txt = block(x, txt, temb, img_rope, txt_rope, key_mask)
        return self.proj_out(self.norm_out(x, temb))  # (B, L, patch^2 * out_channels)

    def forward_cached(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None,
        image_shapes: list[ImageShape],
        caches: list[RowCache],
    ) -> torch.Tensor:
        """`forward` with a step cache per row (None: the row is exact; worker/models/step_cache.py)."""

        def run(rows: Rows) -> torch.Tensor:
            x, txt, temb, img_rope, txt_rope, key_mask = self._embed(
                take(latents, rows), take(timestep, rows), take(text, rows), take(text_mask, rows), image_shapes)

            def first(stream, sub):
                return self.transformer_blocks[0](*stream, take(temb, sub), img_rope, txt_rope, take(key_mask, sub))

            def rest(stream, sub):
                (x, txt), temb_rows, mask_rows = stream, take(temb, sub), take(key_mask, sub)
                for block in self.transformer_blocks[1:]:
                    x, txt = block(x, txt, temb_rows, img_rope, txt_rope, mask_rows)
                return x

            row_caches = caches if rows is None else [caches[i] for i in rows]
            return self.proj_out(self.norm_out(cached_blocks((x, txt), row_caches, first, rest), temb))

        return forward_rows(caches, run)

    def _embed(self, latents, timestep, text, text_mask, image_shapes):
        """Token embeddings, conditioning, rotary tables and the key mask:
        (x (B, L, D), txt (B, S, D), temb (B, D), img_rope, txt_rope, key_mask (B, S + L) or None)."""
        x = self.img_in(latents)  # (B, L, D)
        temb = self.time_text_embed(timestep.to(x.dtype) / 1000, x.dtype)  # (B, D); t / 1000 in the model dtype, as the reference
        txt = self.txt_in(self.txt_norm(text))  # (B, S, D)

        img_rope, txt_rope = self.pos_embed(image_shapes, txt.shape[1], x.device)
        key_mask = None  # over the keys [text, image tokens], built once for every block
        if text_mask is not None:
            key_mask = torch.cat([text_mask.bool(), text_mask.new_ones(x.shape[:2], dtype=torch.bool)], dim=1)  # (B, S + L)
        return x, txt, temb, img_rope, txt_rope, key_mask

    def forward_packed(
        self,
        latents: list[torch.Tensor],
        timestep: torch.Tensor,
        texts: list[torch.Tensor],
        image_shapes: list[list[ImageShape]],
    ) -> list[torch.Tensor]:
        """Requests of different sizes (and prompt lengths) in one forward: their image tokens and
        their texts concatenated (QwenSegments), each with its own positions, modulation and attention
        over its own [text, image]; each output equals its own unpadded forward's (to float rounding).

        latents: R tensors (L_i, Cp); timestep (R,); texts: R tensors (S_i, joint_attention_dim), each
        its real tokens only; image_shapes: each request's images. Returns R tensors (L_i, Cout).
        """
        x = self.img_in(torch.cat(latents)[None])  # (1, sum L, D)
        segments = QwenSegments.build(tuple(l.shape[0] for l in latents), tuple(t.shape[0] for t in texts), x.device)
        temb = self.time_text_embed(timestep.to(x.dtype) / 1000, x.dtype)  # (R, D)
        txt = self.txt_in(self.txt_norm(torch.cat(texts)[None]))  # (1, sum S, D)
        ropes = [self.pos_embed(shapes, n, x.device) for shapes, n in zip(image_shapes, segments.text.counts)]
        img_rope = tuple(torch.cat([r[0][j] for r in ropes], dim=1) for j in (0, 1))
        txt_rope = tuple(torch.cat([r[1][j] for r in ropes], dim=1) for j in (0, 1))
        for block in self.transformer_blocks:
            x, txt = block(x, txt, temb, img_rope, txt_rope, None, segments)
        scale, shift = self.norm_out.linear(F.silu(temb).to(x.dtype)).chunk(2, dim=-1)  # (R, D) each
        x = norm_modulate(x, shift[:, None], scale[:, None], eps=self.norm_out.eps, index=segments.image.index)
        return list(self.proj_out(x)[0].split(segments.image.counts))

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype, device: torch.device | str) -> QwenImageTransformer:
        """Load the `transformer/` folder of a diffusers Qwen-Image pipeline (all floating weights in `dtype`,
        as diffusers does: the model keeps no module in float32)."""
        cfg = QwenImageConfig.from_dict(read_config(path))
        return load_module(lambda: cls(cfg), path, dtype, device)
