"""Wan2.1 text-to-video: UMT5 prompt encoder, our Wan DiT, a flow sampler per request, Wan VAE."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffserve.v1 import generation_pb2 as pb

from .. import loading
from ..models.wan import WanTransformer
from ..samplers import SamplerFactory
from .base import RequestState
from .stages import T5PromptEncoder, cfg_denoise_step, initial_noise, to_uint8_frames

TEXT_LENGTH = 512  # UMT5 tokens; the DiT's cross-attention context length


class WanT2VPipeline:
    """Serves a diffusers-layout WanPipeline checkpoint (model_index `_class_name` WanPipeline)."""

    family = "wan2.1"
    task = "text-to-video"

    def __init__(self, root: Path, name: str, device: torch.device, dtype: torch.dtype):
        index = loading.read_model_index(root)
        self.device, self.dtype = device, dtype
        self.encoder = T5PromptEncoder(
            loading.load_tokenizer(root),
            loading.load_component(root, index, "text_encoder", dtype, device),
            TEXT_LENGTH,
            device,
            dtype,
        )
        self.transformer = WanTransformer.from_pretrained(root / "transformer", dtype, device).eval()
        # The Wan VAE runs in float32, as its model card recommends: bf16 decoding shows banding.
        self.vae = loading.load_component(root, index, "vae", torch.float32, device)
        self.samplers = SamplerFactory.from_dir(root / "scheduler")
        vae_config = self.vae.config
        self.scale_spatial = int(getattr(vae_config, "scale_factor_spatial", 8))
        self.scale_temporal = int(getattr(vae_config, "scale_factor_temporal", 4))
        self.latent_channels = self.transformer.config.in_channels
        mean = torch.tensor(vae_config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(vae_config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._latents_mean, self._latents_inv_std = mean.to(device), inv_std.to(device)
        self.card = self._card(name)

    def _card(self, name: str) -> pb.Model:
        patch = self.transformer.config.patch_size
        return pb.Model(
            name=name,
            family=self.family,
            task=self.task,
            defaults=pb.ModelDefaults(
                height=480, width=832, num_frames=81, num_inference_steps=50, guidance_scale=5.0, fps=16,
                negative_prompt="", sampler=self.samplers.class_name, flow_shift=self.samplers.flow_shift,
            ),
            limits=pb.ModelLimits(
                size_multiple=self.scale_spatial * max(patch[1], patch[2]),
                max_height=2048, max_width=2048, max_pixels=1920 * 1088,
                frame_step=self.scale_temporal, max_num_frames=257, max_num_inference_steps=1000,
                prompt_required=True, image_required=False, max_images=0,
            ),
        )

    def admit(self, request_id: str, params: pb.GenerationParams) -> RequestState:
        return RequestState(request_id=request_id, params=params)

    def encode(self, state: RequestState) -> None:
        prompts = [state.params.prompt] + ([state.params.negative_prompt] if state.do_cfg else [])
        embeds = self.encoder(prompts).to(self.dtype)
        state.cond = embeds[:1]
        state.uncond = embeds[1:2] if state.do_cfg else None

    def prepare(self, state: RequestState) -> None:
        p = state.params
        shape = (
            1,
            self.latent_channels,
            (p.num_frames - 1) // self.scale_temporal + 1,
            p.height // self.scale_spatial,
            p.width // self.scale_spatial,
        )
        state.latents = initial_noise(shape, p.seed, self.device)
        state.sampler = self.samplers.new(p.num_inference_steps, self.device)
        state.timesteps = state.sampler.timesteps
        state.step = 0

    def denoise_step(self, states: list[RequestState]) -> int:
        return cfg_denoise_step(self.transformer, states, self.dtype)

    @torch.no_grad()
    def decode(self, state: RequestState) -> np.ndarray:
        latents = state.latents.to(self.vae.dtype)
        latents = latents / self._latents_inv_std + self._latents_mean  # undo the VAE's latent normalisation
        video = self.vae.decode(latents, return_dict=False)[0]  # (1, 3, F, H, W) in [-1, 1]
        return to_uint8_frames(video)
