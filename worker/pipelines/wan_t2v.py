"""Wan text-to-video: UMT5 prompt encoder, our Wan DiT, a flow sampler per request, Wan VAE.

One class serves every diffusers `WanPipeline` checkpoint; model_index.json says which variant:

- Wan2.1 T2V (1.3B / 14B): one transformer.
- Wan2.2 T2V-A14B: two experts and `boundary_ratio`. `transformer` denoises the high-noise steps
  (t >= boundary_ratio * num_train_timesteps), `transformer_2` the rest, with guidance_scale and
  guidance_scale_2 (diffusers: guidance_scale_2 defaults to guidance_scale). In a batched step the
  requests on each side of the boundary run through their own expert.
- Wan2.2 TI2V-5B, text only: `expand_timesteps=True` (diffusers feeds one timestep per video
  token, all equal to t when no image is given) and the Wan2.2 VAE (48 latent channels, 16x).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffserve.v1 import generation_pb2 as pb

from diffserve.worker import loading
from diffserve.worker.models.wan import WanTransformer
from diffserve.worker.parallel.cfg import split_rows
from diffserve.worker.parallel.decode import decode_video
from diffserve.worker.parallel import ParallelState
from diffserve.worker.samplers import SamplerFactory
from diffserve.worker.pipelines.base import Capabilities, RequestState
from diffserve.worker.pipelines.stages import T5PromptEncoder, cfg_denoise_step, initial_noise, to_uint8_frames

TEXT_LENGTH = 512  # UMT5 tokens; the DiT's cross-attention context length

# Card defaults per variant: (height, width, num_frames, steps, guidance_scale, fps).
# Wan2.1: diffusers WanPipeline's call defaults. Wan2.2: the Wan2.2 model cards / generate.py
# configs (also FastVideo's Wan2_2_T2V_A14B_SamplingParam and Wan2_2_TI2V_5B_SamplingParam):
# A14B 1280x720, 81 frames, 40 steps, guidance 4.0 high-noise / 3.0 low-noise, 16 fps;
# TI2V-5B 1280x704, 121 frames, 50 steps, guidance 5.0, 24 fps.
GUIDANCE_2 = {"wan2.2-a14b": 3.0}  # low-noise expert's guidance (Wan2.2 model card)
DEFAULTS = {
    "wan2.1": (480, 832, 81, 50, 5.0, 16),
    "wan2.2-a14b": (720, 1280, 81, 40, 4.0, 16),
    "wan2.2-ti2v": (704, 1280, 121, 50, 5.0, 24),
}


def _has_component(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


class WanT2VPipeline:
    """Serves a diffusers-layout WanPipeline checkpoint (model_index `_class_name` WanPipeline)."""

    capabilities = Capabilities(uses_cfg=True, cfg_parallel=True, decodes_on_every_rank=True)
    parallel = ParallelState.single()  # the worker sets the group's state

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
        # Experts, highest noise first. Wan2.1 / TI2V: one. Wan2.2 A14B: transformer, transformer_2.
        self.boundary_ratio = index.get("boundary_ratio")
        names = [n for n in ("transformer", "transformer_2") if _has_component(index, n)]
        if not names:
            raise loading.CheckpointError(f"{root}: model_index.json names no transformer")
        if self.boundary_ratio is None:
            names = names[:1]
        self.experts = [self._load_transformer(root / n) for n in names]
        self.transformer = self.experts[0]
        self.expand_timesteps = bool(index.get("expand_timesteps", False))
        if len(self.experts) == 2:
            self.variant = "wan2.2-a14b"
        elif self.expand_timesteps:
            self.variant = "wan2.2-ti2v"
        else:
            self.variant = "wan2.1"
        self.family = "wan2.2" if self.variant.startswith("wan2.2") else "wan2.1"

        # The Wan VAE runs in float32, as its model card recommends: bf16 decoding shows banding.
        self.vae = loading.load_component(root, index, "vae", torch.float32, device)
        self.samplers = SamplerFactory.from_dir(root / "scheduler")
        num_train = int(self.samplers.config.get("num_train_timesteps", 1000))
        self.boundary_timestep = None if self.boundary_ratio is None else float(self.boundary_ratio) * num_train
        vae_config = self.vae.config
        self.scale_spatial = int(getattr(vae_config, "scale_factor_spatial", 8))
        self.scale_temporal = int(getattr(vae_config, "scale_factor_temporal", 4))
        self.latent_channels = self.transformer.config.in_channels
        mean = torch.tensor(vae_config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(vae_config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._latents_mean, self._latents_inv_std = mean.to(device), inv_std.to(device)
        self.card = self._card(name)

    def _load_transformer(self, folder: Path) -> WanTransformer:
        return WanTransformer.from_pretrained(folder, self.dtype, self.device).eval()

    def _card(self, name: str) -> pb.Model:
        patch = self.transformer.config.patch_size
        height, width, frames, steps, guidance, fps = DEFAULTS[self.variant]
        return pb.Model(
            name=name,
            family=self.family,
            guidance_kind=pb.GUIDANCE_KIND_CFG,
            task=self.task,
            defaults=pb.ModelDefaults(
                height=height, width=width, num_frames=frames, num_inference_steps=steps, guidance_scale=guidance,
                fps=fps, negative_prompt="", sampler=self.samplers.class_name, flow_shift=self.samplers.flow_shift,
                guidance_scale_2=GUIDANCE_2.get(self.variant, 0.0),
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
        state.start_sampling(self.samplers.new(p.num_inference_steps, self.device))

    # -- denoising ------------------------------------------------------------------------------

    def expert_of(self, state: RequestState) -> int:
        """0: `transformer` (Wan2.1, TI2V, Wan2.2 high noise); 1: `transformer_2` (Wan2.2 low noise)."""
        if self.boundary_timestep is None or len(self.experts) == 1:
            return 0
        return 0 if float(state.timesteps[state.step]) >= self.boundary_timestep else 1

    def guidance_of(self, state: RequestState) -> float:
        """The request's guidance at its current step: guidance_scale_2 for the low-noise expert
        when set, else guidance_scale (diffusers' default for guidance_scale_2)."""
        p = state.params
        if self.expert_of(state) == 1 and p.HasField("guidance_scale_2"):
            return p.guidance_scale_2
        return p.guidance_scale

    def forward_of(self, expert: int):
        """The expert's forward, split over the cfg ranks when the worker group has them."""
        return split_rows(self.parallel, self.experts[expert])

    def denoise_step(self, states: list[RequestState]) -> int:
        # TI2V (expand_timesteps): diffusers passes a (B, L) timestep whose entries all equal t for
        # text-only requests; our DiT's (B,) path computes the same modulation once per sample.
        groups: dict[int, list[RequestState]] = {}
        for s in states:
            groups.setdefault(self.expert_of(s), []).append(s)
        rows = 0
        for expert, group in sorted(groups.items()):
            rows += cfg_denoise_step(self.forward_of(expert), group, self.dtype, self.guidance_of)
        return rows

    @torch.no_grad()
    def decode(self, state: RequestState) -> np.ndarray:
        latents = state.latents.to(self.vae.dtype)
        latents = latents / self._latents_inv_std + self._latents_mean  # undo the VAE's latent normalisation
        video = decode_video(self.parallel, self.vae, latents)  # (1, 3, F, H, W) in [-1, 1]; None on followers
        return None if video is None else to_uint8_frames(video)
