"""FastWan (FastVideo's DMD-distilled Wan2.1 T2V): Wan2.1 components, a few-step DMD sampler, no CFG.

Recognised from the checkpoint: FastVideo's FastWan checkpoints name `WanDMDPipeline` as
model_index.json's `_class_name` (their scheduler/ folder is the base model's UniPC config, which
the DMD rule does not use). See docs/fastwan.md for the sources and the decisions taken here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffserve.v1 import generation_pb2 as pb

from diffserve.worker.models.wan import WanTransformer
from diffserve.worker.samplers.dmd import FASTWAN_DMD_SHIFT, FASTWAN_DMD_STEPS, DMDSampler
from diffserve.worker.pipelines.base import Capabilities, RequestState
from diffserve.worker.pipelines.wan_t2v import WanT2VPipeline

# FastVideo trains FastWan2.1 with Video Sparse Attention; its checkpoints carry the VSA gate of the
# compressed-attention branch. We run dense attention (no VSA kernel), so those weights are unused.
VSA_ONLY_KEYS = ("to_gate_compress",)


class FastWanPipeline(WanT2VPipeline):
    """Serves FastVideo's FastWan checkpoints (model_index `_class_name` WanDMDPipeline): FastWan2.1-T2V
    (Wan2.1 components) and FastWan2.2-TI2V-5B text-only (expand_timesteps, Wan2.2 VAE; its per-token
    timesteps all equal t without an image, so the DiT's per-sample path is used)."""

    # DMD runs one row per request and calls the transformer directly: no CFG rows to split.
    capabilities = Capabilities(uses_cfg=False, cfg_parallel=False, decodes_on_every_rank=True)
    dmd_steps = FASTWAN_DMD_STEPS
    dmd_shift = FASTWAN_DMD_SHIFT

    def _load_transformer(self, folder: Path) -> WanTransformer:
        # Every tensor but the VSA-only ones must match the model exactly (strict load).
        return WanTransformer.from_pretrained(folder, self.dtype, self.device, ignore=VSA_ONLY_KEYS)

    def _card(self, name: str) -> pb.Model:
        card = super()._card(name)
        if self.expand_timesteps:
            # FastWan2.2-TI2V-5B-FullAttn: we keep Wan2.2 TI2V-5B's size, frames and fps.
            card.family = "fastwan2.2"
            height, width, frames, fps = 704, 1280, 121, 24
        else:
            # FastVideo's FastWanT2V480PConfig sampling defaults (fastvideo/configs/sample/wan.py):
            # 448x832 (the distillation resolution), 61 frames, 16 fps.
            card.family = "fastwan2.1"
            height, width, frames, fps = 448, 832, 61, 16
        card.defaults.height, card.defaults.width, card.defaults.num_frames, card.defaults.fps = height, width, frames, fps
        card.defaults.num_inference_steps, card.defaults.guidance_scale = len(self.dmd_steps), 1.0  # no CFG
        card.guidance_kind = pb.GUIDANCE_KIND_NONE
        card.defaults.sampler, card.defaults.flow_shift = "DMD", self.dmd_shift
        card.limits.max_num_inference_steps = len(self.dmd_steps)
        return card

    def encode(self, state: RequestState) -> None:
        # No CFG: the distilled model runs the prompt only, whatever guidance_scale says.
        state.cond = self.encoder([state.params.prompt]).to(self.dtype)
        state.uncond = None

    def prepare(self, state: RequestState) -> None:
        p = state.params
        shape = (
            1,
            self.latent_channels,
            (p.num_frames - 1) // self.scale_temporal + 1,
            p.height // self.scale_spatial,
            p.width // self.scale_spatial,
        )
        # The seed contract, drawn as FastVideo's WanDMDPipeline draws it: float32 normal noise from
        # torch.Generator("cpu").manual_seed(seed) in its frame-major (B, F, C, H, W) latent layout
        # (LatentPreparationStage(use_btchw_layout=True)). The generator stays with the request:
        # the DMD re-noising draws from it, in step order.
        generator = torch.Generator("cpu").manual_seed(p.seed)
        b, c, f, h, w = shape
        noise = torch.randn((b, f, c, h, w), generator=generator, dtype=torch.float32)
        state.latents = noise.permute(0, 2, 1, 3, 4).contiguous().to(self.device)  # (B, C, F, H, W)
        # Fewer steps than listed: the first k listed timesteps (the last one returns x0).
        steps = self.dmd_steps[: p.num_inference_steps]
        state.start_sampling(DMDSampler(steps, generator, self.device, shift=self.dmd_shift))

    @torch.no_grad()
    def denoise_step(self, states: list[RequestState]) -> int:
        x = torch.cat([s.latents for s in states]).to(self.dtype)  # (B, C, F, H, W)
        t = torch.stack([s.timesteps[s.step] for s in states])  # (B,)
        flow = self.transformer(x, t, torch.cat([s.cond for s in states]))
        for i, s in enumerate(states):
            s.latents = s.sampler.step(flow[i : i + 1], s.timesteps[s.step], s.latents, return_dict=False)[0]
            s.step += 1
        return len(states)
