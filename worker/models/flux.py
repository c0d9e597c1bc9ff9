"""FLUX.1 text-to-image transformer (our implementation of diffusers' FluxTransformer2DModel).

Reading order: config -> rotary embedding over (text, image) ids -> (conditioning: timestep,
guidance, pooled CLIP text) -> joint attention -> double-stream block -> single-stream block
-> model -> loading. Parameter names and shapes are exactly diffusers' so its safetensors load
with `load_state_dict(strict=True)`; the math (including the dtype each op runs in) is the same,
so outputs match diffusers to float rounding.

FLUX works on *packed* latents: the VAE latent (C, H, W) is cut into 2x2 patches, each patch
flattened to 4C channels, giving (H/2 * W/2, 4C) tokens. Packing and unpacking are in the
pipeline (worker/pipelines/flux.py); this model sees tokens only.

Shape legend: B batch, N image tokens, S text tokens, D model width, Hd heads, Dh head dim,
Cin packed latent channels (64 for FLUX.1), J text-encoder width (T5), P pooled width (CLIP).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from diffserve.kernels.attention import attention, attention_varlen
from diffserve.worker.models.checkpoint import load_module, read_config
from diffserve.worker.models.rope import axes_tables
from diffserve.worker.models.step_cache import RowCache, Rows, cached_blocks, forward_rows, take
from diffserve.worker.models.layers import (
    AdaLNZero,
    FeedForward,
    Segments,
    TimeGuidanceTextEmbedding,
    deinterleave,
    gated_residual,
    interleave,
    linear_gelu,
    norm_modulate,
    qk_norm_rope,
)


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """The fields of diffusers' transformer/config.json that shape the model (defaults: FLUX.1-dev)."""

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19  # double-stream blocks
    num_single_layers: int = 38  # single-stream blocks
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = True  # FLUX.1-dev: guidance-distilled; FLUX.1-schnell: False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FluxConfig:
        """Build from a config.json dict; unknown keys (`_class_name`, `_diffusers_version`) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if "axes_dims_rope" in kwargs:
            kwargs["axes_dims_rope"] = tuple(kwargs["axes_dims_rope"])
        return cls(**kwargs)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


# ---------------------------------------------------------------------------------------------
# Rotary position embedding from (axis0, row, column) ids
# ---------------------------------------------------------------------------------------------


def flux_rope(ids: torch.Tensor, axes_dims: tuple[int, ...], theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-axis RoPE tables from integer position ids.

    ids: (L, n_axes), one row per token (text tokens all zeros, image token (0, row, col)).
    The head dim is split into `axes_dims` parts; part i is a 1-D RoPE of the i-th id, angles
    computed in float64 (as diffusers does where the device allows), tables in float32.
    Returns cos, sin each (1, L, 1, Dh), repeat-interleaved (channel pairs share an angle).
    """
    double_ok = ids.device.type not in ("mps", "npu")
    cos, sin = axes_tables(list(ids.unbind(1)), axes_dims, theta, torch.float64 if double_ok else torch.float32)  # (L, Dh)
    return cos[None, :, None, :], sin[None, :, None, :]


class FluxPosEmbed(nn.Module):
    """RoPE tables of the joint [text, image] sequence from their position ids (no parameters;
    diffusers' `pos_embed`)."""

    def __init__(self, axes_dims: tuple[int, ...]):
        super().__init__()
        self.axes_dims = axes_dims

    def forward(self, txt_ids: torch.Tensor, img_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # txt_ids (S, 3), img_ids (N, 3) -> cos, sin each (1, S + N, 1, Dh)
        return flux_rope(torch.cat([txt_ids, img_ids], dim=0), self.axes_dims)


@dataclasses.dataclass(frozen=True)
class FluxSegments:
    """Several requests packed into one forward (mixed-shape batching): request i has N_i image
    tokens and S text tokens. The image stream holds every request's image tokens one after the
    other (1, sum N, D; `image`), the text stream every request's text (1, R * S, D; `text`), and
    the single-stream sequence each request's [text, image] in turn (`joint`), which is also how
    the double-stream blocks attend. The rotary tables are laid out the same way."""

    image: Segments
    text: Segments
    joint: Segments
    image_rope: tuple[torch.Tensor, torch.Tensor]  # (1, sum N, 1, Dh)
    text_rope: tuple[torch.Tensor, torch.Tensor]  # (1, R * S, 1, Dh)
    joint_rope: tuple[torch.Tensor, torch.Tensor]  # (1, sum (S + N), 1, Dh)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


class FluxAttention(nn.Module):
    """Joint attention with per-head RMS q/k norm and RoPE over the whole sequence.

    Double-stream blocks (`joint=True`) project image and text tokens with separate weights
    (`to_*` and `add_*_proj`), attend over the concatenation [text, image] and project each part
    back with its own output layer. Single-stream blocks (`joint=False`) get the already
    concatenated sequence and have no output projection (`pre_only`; the block's proj_out does it).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, joint: bool, eps: float = 1e-6):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.norm_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_k = nn.RMSNorm(head_dim, eps=eps)
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.joint = joint
        if joint:
            self.to_out = nn.ModuleList([nn.Linear(inner, dim)])  # index 0 keeps diffusers' `to_out.0` keys
            self.norm_added_q = nn.RMSNorm(head_dim, eps=eps)
            self.norm_added_k = nn.RMSNorm(head_dim, eps=eps)
            self.add_q_proj = nn.Linear(dim, inner)
            self.add_k_proj = nn.Linear(dim, inner)
            self.add_v_proj = nn.Linear(dim, inner)
            self.to_add_out = nn.Linear(inner, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1))  # (B, L, D) -> (B, L, Hd, Dh)

    def _qkv(self, x: torch.Tensor, to_q, to_k, to_v, norm_q, norm_k, rope):
        return qk_norm_rope(self._heads(to_q(x)), norm_q, rope), qk_norm_rope(self._heads(to_k(x)), norm_k, rope), self._heads(to_v(x))

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The attention seam. Single stream: q, k, v of [text, image] (B, S + N, Hd, Dh) -> the same
        shape. Joint: image q, k, v (B, N, Hd, Dh) and the text's `text` (B, S, Hd, Dh) each, attended
        as [text, image] -> (image out, text out). A parallel plan (worker/parallel/plans/) may
        replace it on an instance."""
        if text is None:
            return attention(q, k, v)
        s = text[0].shape[1]
        out = attention(torch.cat([text[0], q], dim=1), torch.cat([text[1], k], dim=1), torch.cat([text[2], v], dim=1))
        return out[:, s:], out[:, :s]

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        context: torch.Tensor | None = None,
        segments: FluxSegments | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # joint: x image (B, N, D), context text (B, S, D) -> (image out, text out)
        # single: x = [text, image] (B, S + N, D) -> (B, S + N, D), not projected
        # rope tables are laid out [text, image] like the sequence
        if segments is not None:
            return self._forward_packed(x, context, segments)
        if not self.joint:
            q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k, rope)  # (B, S + N, Hd, Dh)
            return self.attend(q, k, v).flatten(2, 3)  # (B, S + N, D)
        text_len = context.shape[1]
        image_rope = tuple(r[:, text_len:] for r in rope)
        q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k, image_rope)  # (B, N, Hd, Dh)
        text_rope = tuple(r[:, :text_len] for r in rope)
        cq, ck, cv = self._qkv(context, self.add_q_proj, self.add_k_proj, self.add_v_proj,
                               self.norm_added_q, self.norm_added_k, text_rope)  # (B, S, Hd, Dh)
        image_out, text_out = self.attend(q, k, v, (cq, ck, cv))
        image_out, text_out = image_out.flatten(2, 3).contiguous(), text_out.flatten(2, 3).contiguous()
        return self.to_out[0](image_out), self.to_add_out(text_out)

    def _forward_packed(self, x: torch.Tensor, context: torch.Tensor | None, segments: FluxSegments):
        """As forward, for packed requests (FluxSegments' layouts): each request attends over its own
        [text, image] only, all of them in one varlen attention call. (Packing runs on one process
        only, so no parallel plan's `attend` is bypassed.)"""
        lens = segments.joint.lengths
        if not self.joint:
            q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k, segments.joint_rope)
            return attention_varlen(q, k, v, lens, lens).flatten(2, 3)
        q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k, segments.image_rope)
        cq, ck, cv = self._qkv(context, self.add_q_proj, self.add_k_proj, self.add_v_proj,
                               self.norm_added_q, self.norm_added_k, segments.text_rope)
        out = attention_varlen(*(interleave(t, i, segments.text, segments.image) for t, i in ((cq, q), (ck, k), (cv, v))), lens, lens)
        text_out, image_out = deinterleave(out, segments.text, segments.image)
        return self.to_out[0](image_out.flatten(2, 3).contiguous()), self.to_add_out(text_out.flatten(2, 3).contiguous())


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


def _clip_fp16(x: torch.Tensor) -> torch.Tensor:
    """diffusers clamps float16 activations to the finite range after each block."""
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class FluxDoubleBlock(nn.Module):
    """MMDiT block: image and text streams with their own AdaLN/MLP weights, one joint attention.
    (diffusers' FluxTransformerBlock, `transformer_blocks.*` keys.)"""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = AdaLNZero(dim, 6)
        self.norm1_context = AdaLNZero(dim, 6)
        self.attn = FluxAttention(dim, heads, head_dim, joint=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, inner_dim=4 * dim, approximate="tanh")
        self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff_context = FeedForward(dim, inner_dim=4 * dim, approximate="tanh")

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, temb: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
        segments: FluxSegments | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # x (B, N, D) image, context (B, S, D) text, temb (B, D); packed (`segments`): x (1, sum N, D),
        # context (1, R * S, D), each request's modulation row (R, 1, D) read per token by the segments' index.
        mods, c_mods = self.norm1.modulations(temb), self.norm1_context.modulations(temb)  # (B, 1, D) each
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = mods
        c_shift_a, c_scale_a, c_gate_a, c_shift_f, c_scale_f, c_gate_f = c_mods
        xi, ci = (segments.image.index, segments.text.index) if segments is not None else (None, None)

        # 1. Joint attention over [text, image]. `into`: the linears reading each norm's output (layers.py, FP8).
        attn = self.attn
        h = norm_modulate(x, shift_a, scale_a, self.norm1.norm, index=xi, into=(attn.to_q, attn.to_k, attn.to_v))
        c = norm_modulate(context, c_shift_a, c_scale_a, self.norm1_context.norm, index=ci,
                          into=(attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        attn_x, attn_c = attn(h, rope, context=c, segments=segments)

        # 2. Image stream: gated residuals.
        x = gated_residual(x, attn_x, gate_a, xi)
        x = gated_residual(x, self.ff(norm_modulate(x, shift_f, scale_f, self.norm2, index=xi, into=self.ff.net[0].proj)), gate_f, xi)

        # 3. Text stream: the same with its own weights.
        context = gated_residual(context, attn_c, c_gate_a, ci)
        c = norm_modulate(context, c_shift_f, c_scale_f, self.norm2_context, index=ci, into=self.ff_context.net[0].proj)
        context = gated_residual(context, self.ff_context(c), c_gate_f, ci)
        return _clip_fp16(x), _clip_fp16(context)


class FluxSingleBlock(nn.Module):
    """Parallel attention + MLP over the concatenated [text, image] sequence, one gated residual.
    (diffusers' FluxSingleTransformerBlock, `single_transformer_blocks.*` keys.)"""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        mlp_dim = int(dim * mlp_ratio)
        self.norm = AdaLNZero(dim, 3)
        self.proj_mlp = nn.Linear(dim, mlp_dim)
        self.proj_out = nn.Linear(dim + mlp_dim, dim)
        self.attn = FluxAttention(dim, heads, head_dim, joint=False)

    def forward(self, xc: torch.Tensor, temb: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                segments: FluxSegments | None = None) -> torch.Tensor:
        # xc = [text, image] (B, S + N, D); packed: each request's [text, image] in turn (1, sum (S + N), D)
        shift, scale, gate = self.norm.modulations(temb)  # (B, 1, D) each; packed: a row per request
        index = segments.joint.index if segments is not None else None
        h = norm_modulate(xc, shift, scale, self.norm.norm, index=index,
                          into=(self.proj_mlp, self.attn.to_q, self.attn.to_k, self.attn.to_v))
        mlp = linear_gelu(self.proj_mlp, h)  # (B, S + N, 4D)
        attn = self.attn(h, rope, segments=segments)  # (B, S + N, D)
        xc = gated_residual(xc, self.proj_out(torch.cat([attn, mlp], dim=2)), gate, index)
        return _clip_fp16(xc)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class FluxTransformer(nn.Module):
    """The FLUX.1 denoiser (diffusers' FluxTransformer2DModel, same weights and math).

    Owns the token embedders (packed latents and T5 states -> width D), the timestep / guidance /
    pooled-text embedding, `num_layers` double-stream and `num_single_layers` single-stream
    blocks and the AdaLN output head. It does not own the text encoders, VAE or sampler.
    Every sample carries its own timestep, guidance and pooled text, so requests at different
    steps with different guidance scales can share one forward.
    """

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.inner_dim
        out_channels = cfg.out_channels or cfg.in_channels
        self.time_text_embed = TimeGuidanceTextEmbedding(dim, cfg.pooled_projection_dim, cfg.guidance_embeds)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, dim)
        self.x_embedder = nn.Linear(cfg.in_channels, dim)
        self.pos_embed = FluxPosEmbed(cfg.axes_dims_rope)
        heads, head_dim = cfg.num_attention_heads, cfg.attention_head_dim
        self.transformer_blocks = nn.ModuleList([FluxDoubleBlock(dim, heads, head_dim) for _ in range(cfg.num_layers)])
        self.single_transformer_blocks = nn.ModuleList(
            [FluxSingleBlock(dim, heads, head_dim) for _ in range(cfg.num_single_layers)]
        )
        self.norm_out = AdaLNZero(dim, 2)
        self.proj_out = nn.Linear(dim, cfg.patch_size * cfg.patch_size * out_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.weight.dtype

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow for a batch of packed latents.

        latents: (B, N, Cin) packed tokens; timestep: (B,) the sampler's timestep as it is
        (0..num_train_timesteps), one per sample; context: (B, S, J) T5 states; pooled: (B, P) CLIP pooled;
        img_ids: (N, 3), txt_ids: (S, 3) RoPE position ids shared by the batch; guidance: (B,)
        embedded guidance scale (guidance-distilled checkpoints only, else None).
        Returns (B, N, Cout) in the model dtype.
        """
        x, c, temb, rope = self._embed(latents, timestep, context, pooled, img_ids, txt_ids, guidance)
        for block in self.transformer_blocks:
            x, c = block(x, c, temb, rope)
        return self._head(self._single_stream(x, c, temb, rope), temb)

    def forward_cached(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None,
        caches: list[RowCache],
    ) -> torch.Tensor:
        """`forward` with a step cache per row (None: the row is exact; worker/models/step_cache.py).
        The stack is diffusers' for its hooks: every double-stream block, then every single-stream one."""

        def run(rows: Rows) -> torch.Tensor:
            x, c, temb, rope = self._embed(take(latents, rows), take(timestep, rows), take(context, rows), take(pooled, rows),
                                           img_ids, txt_ids, take(guidance, rows))

            def first(stream, sub):
                return self.transformer_blocks[0](*stream, take(temb, sub), rope)

            def rest(stream, sub):
                (x, c), temb_rows = stream, take(temb, sub)
                for block in self.transformer_blocks[1:]:
                    x, c = block(x, c, temb_rows, rope)
                return self._single_stream(x, c, temb_rows, rope)

            row_caches = caches if rows is None else [caches[i] for i in rows]
            return self._head(cached_blocks((x, c), row_caches, first, rest), temb)

        return forward_rows(caches, run)

    def _embed(self, latents, timestep, context, pooled, img_ids, txt_ids, guidance):
        """Token embeddings, conditioning and rotary tables: (x (B, N, D), c (B, S, D), temb (B, D), rope)."""
        x = self.x_embedder(latents)  # (B, N, D)

        # Conditioning vector. The reference embeds t / 1000 rounded to the model dtype, times 1000,
        # and the raw guidance rounded likewise, times 1000.
        t = (timestep / 1000).to(x.dtype) * 1000
        g = guidance.to(x.dtype) * 1000 if guidance is not None and self.config.guidance_embeds else None
        temb = self.time_text_embed(t, pooled, g)  # (B, D)

        c = self.context_embedder(context)  # (B, S, D)
        rope = self.pos_embed(txt_ids, img_ids)  # (1, S + N, 1, Dh)
        return x, c, temb, rope

    def _single_stream(self, x: torch.Tensor, c: torch.Tensor, temb: torch.Tensor, rope) -> torch.Tensor:
        """The single-stream blocks over [text, image]; returns the image tokens (B, N, D)."""
        text_len = c.shape[1]
        xc = torch.cat([c, x], dim=1)  # (B, S + N, D)
        for block in self.single_transformer_blocks:
            xc = block(xc, temb, rope)
        return xc[:, text_len:]

    def _head(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """Output head: AdaLN (scale first, then shift) and linear to packed channels, (B, N, Cout)."""
        scale, shift = self.norm_out.modulations(temb)
        return self.proj_out(norm_modulate(x, shift, scale, self.norm_out.norm))

    def forward_packed(
        self,
        latents: list[torch.Tensor],
        timestep: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor,
        img_ids: list[torch.Tensor],
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Requests of different sizes in one forward (mixed-shape batching; FluxSegments' layouts):
        each with its own positions, timestep / guidance / pooled-text modulation and attention over
        its own [text, image]; each output equals its own forward's (to float rounding).

        latents: R tensors (N_i, Cin); timestep, guidance (R,); context (R, S, J); pooled (R, P);
        img_ids: R tensors (N_i, 3); txt_ids (S, 3). Returns R tensors (N_i, Cout).
        """
        counts = tuple(l.shape[0] for l in latents)
        rows, text_len = len(latents), context.shape[1]
        x = self.x_embedder(torch.cat(latents)[None])  # (1, sum N, D)
        t = (timestep / 1000).to(x.dtype) * 1000
        g = guidance.to(x.dtype) * 1000 if guidance is not None and self.config.guidance_embeds else None
        temb = self.time_text_embed(t, pooled, g)  # (R, D)
        c = self.context_embedder(context).reshape(1, rows * text_len, -1)  # (1, R * S, D)

        axes = self.config.axes_dims_rope
        text_rope, image_ropes = flux_rope(txt_ids, axes), [flux_rope(ids, axes) for ids in img_ids]

        def cat(tables, dim=1):
            return tuple(torch.cat([t[j] for t in tables], dim=dim) for j in (0, 1))

        device = x.device
        segments = FluxSegments(  # built once for every block
            image=Segments(counts, device), text=Segments((text_len,) * rows, device),
            joint=Segments([text_len + n for n in counts], device),
            image_rope=cat(image_ropes), text_rope=cat([text_rope] * rows),
            joint_rope=cat([r for image in image_ropes for r in (text_rope, image)]),
        )
        for block in self.transformer_blocks:
            x, c = block(x, c, temb, None, segments)

        xc = interleave(c, x, segments.text, segments.image)  # each [text, image] in turn
        for block in self.single_transformer_blocks:
            xc = block(xc, temb, None, segments)
        x = torch.cat([seg[:, text_len:] for seg in xc.split(segments.joint.counts, dim=1)], dim=1)  # (1, sum N, D)

        scale, shift = self.norm_out.modulations(temb)  # (R, 1, D) each
        return list(self.proj_out(norm_modulate(x, shift, scale, self.norm_out.norm, index=segments.image.index))[0].split(counts))

    # -----------------------------------------------------------------------------------------
    # Loading
    # -----------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype, device: torch.device | str) -> FluxTransformer:
        """Load the `transformer/` folder of a diffusers FLUX pipeline.

        Built on the meta device; the checkpoint tensors are assigned in place (`assign=True`), so
        weights are allocated once, directly on `device`, floating ones cast to `dtype` (diffusers
        keeps no FLUX module in float32). Returns the model in eval mode with gradients off.
        """
        cfg = FluxConfig.from_dict(read_config(path))
        return load_module(lambda: cls(cfg), path, dtype, device)

