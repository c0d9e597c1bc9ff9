"""Wan image-to-video (diffusers' WanImageToVideoPipeline checkpoints), three variants in one class.

- Wan2.1 I2V: CLIP vision features of the input image go to the DiT's image K/V cross-attention
  (`context_image`); the first frame's VAE latents plus a 4-channel "known frame" mask are
  concatenated to the noisy latents along channels (16 + 4 + 16 = 36 input channels).
- Wan2.2 I2V-A14B: the same channel concatenation, no CLIP; two experts: `transformer` denoises
  while t >= boundary_ratio * num_train_timesteps, `transformer_2` below.
- Wan2.2 TI2V-5B with an image (`expand_timesteps`): the first latent frame is replaced by the
  image latents before every forward and gets timestep 0 through per-token timesteps (B, L).

Seed contract as the reference: the noise is the first and only random draw (the VAE encoding of
the conditioning video takes the distribution's mode).
"""

from __future__ import annotations

import importlib
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffserve.v1 import generation_pb2 as pb

from diffserve.worker import loading
from diffserve.worker.models.wan import WanTransformer
from diffserve.worker.parallel.decode import decode_video
from diffserve.worker.parallel import ParallelState
from diffserve.worker.samplers import SamplerFactory
from diffserve.worker.pipelines.base import Capabilities, RequestState
from diffserve.worker.pipelines.stages import T5PromptEncoder, initial_noise, to_uint8_frames

TEXT_LENGTH = 512  # UMT5 tokens; the DiT's cross-attention context length


def _has_component(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


# Wan2.2 TI2V-5B card defaults (model card / generate.py): (height, width, frames, steps, guidance, fps).
TI2V_DEFAULTS = (704, 1280, 121, 50, 5.0, 24)

def decode_image(data: bytes) -> Image.Image:
    """Encoded bytes (PNG, JPEG, WebP) -> RGB PIL image."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


def image_to_tensor(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """The reference's VideoProcessor.preprocess(image, height, width) for one PIL image: plain resize
    to (width, height) with Lanczos (no crop, aspect not kept), then [0, 255] -> [-1, 1].
    Returns float32 (1, 3, H, W)."""
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS, reducing_gap=None)
    array = np.asarray(image).astype(np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2.0 - 1.0


class WanI2VPipeline:
    """Serves a diffusers-layout WanImageToVideoPipeline checkpoint (Wan2.1 I2V, Wan2.2 I2V-A14B, Wan2.2 TI2V-5B)."""

    task = "image-to-video"
    parallel = ParallelState.single()  # the worker sets the group's state
    capabilities = Capabilities(uses_cfg=True, cfg_parallel=False, decodes_on_every_rank=True)

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
        # Experts: [transformer] or, for Wan2.2 A14B, [transformer (high noise), transformer_2 (low noise)].
        self.experts: list[WanTransformer | None] = [
            WanTransformer.from_pretrained(root / n, dtype, device).eval() if _has_component(index, n) else None
            for n in ("transformer", "transformer_2")
        ]
        first = next(m for m in self.experts if m is not None)
        self.patch_size = first.config.patch_size
        self.expand_timesteps = bool(index.get("expand_timesteps") or False)
        # Wan2.2 TI2V-5B ships as a WanPipeline: text-only requests are served too (no image: every
        # latent frame is denoised at timestep t, which is WanPipeline's expand_timesteps path).
        self.image_optional = self.expand_timesteps and index.get("_class_name") == "WanPipeline"
        if self.image_optional:
            self.task = "text-image-to-video"
        self.samplers = SamplerFactory.from_dir(root / "scheduler")
        boundary_ratio = index.get("boundary_ratio")
        num_train = self.samplers.config.get("num_train_timesteps", 1000)
        self.boundary = None if boundary_ratio is None else float(boundary_ratio) * num_train

        # Wan2.1 I2V only: CLIP image features (penultimate hidden states) for the image cross-attention.
        # The image encoder runs in float32, as the model card loads it.
        self.image_encoder = self.image_processor = None
        if self.experts[0] is not None and self.experts[0].config.image_dim is not None:
            self.image_encoder = loading.load_component(root, index, "image_encoder", torch.float32, device)
            library, cls_name = loading.component_class(index, "image_processor")
            processor_cls = getattr(importlib.import_module(library), cls_name)
            self.image_processor = processor_cls.from_pretrained(root / "image_processor")

        # The Wan VAEs run in float32, as their model cards recommend: bf16 decoding shows banding.
        self.vae = loading.load_component(root, index, "vae", torch.float32, device)
        vae_config = self.vae.config
        self.z_dim = int(vae_config.z_dim)
        self.scale_spatial = int(getattr(vae_config, "scale_factor_spatial", 8))
        self.scale_temporal = int(getattr(vae_config, "scale_factor_temporal", 4))
        mean = torch.tensor(vae_config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(vae_config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._latents_mean, self._latents_inv_std = mean.to(device), inv_std.to(device)
        wan22 = self.boundary is not None or self.expand_timesteps or self.z_dim == 48
        self.family = "wan2.2" if wan22 else "wan2.1"
        self.card = self._card(name)

    def _card(self, name: str) -> pb.Model:
        patch = self.patch_size
        # Wan2.2 TI2V-5B generates 24 fps video; the 14B I2V models 16 fps.
        fps = 24 if self.expand_timesteps else 16
        height, width, frames, steps, guidance = 480, 832, 81, 50, 5.0  # WanImageToVideoPipeline's call defaults
        if self.image_optional:
            height, width, frames, steps, guidance, fps = TI2V_DEFAULTS
        return pb.Model(
            name=name,
            family=self.family,
            guidance_kind=pb.GUIDANCE_KIND_CFG,
            task=self.task,
            defaults=pb.ModelDefaults(
                height=height, width=width, num_frames=frames, num_inference_steps=steps, guidance_scale=guidance, fps=fps,
                negative_prompt="", sampler=self.samplers.class_name, flow_shift=self.samplers.flow_shift,
            ),
            limits=pb.ModelLimits(
                size_multiple=self.scale_spatial * max(patch[1], patch[2]),
                max_height=2048, max_width=2048, max_pixels=1920 * 1088,
                frame_step=self.scale_temporal, max_num_frames=257, max_num_inference_steps=1000,
                prompt_required=True, image_required=not self.image_optional, max_images=1,
            ),
        )

    # -----------------------------------------------------------------------------------------
    # Stages
    # -----------------------------------------------------------------------------------------

    def admit(self, request_id: str, params: pb.GenerationParams) -> RequestState:
        state = RequestState(request_id=request_id, params=params)
        if not params.images and self.image_optional:
            state.extras["image"] = None  # text-to-video
            return state
        if len(params.images) != 1 or not params.images[0].data:
            raise ValueError("image-to-video needs exactly one input image (params.images[0].data)")
        state.extras["image"] = decode_image(params.images[0].data)  # fails early on undecodable bytes
        return state

    @torch.no_grad()
    def encode(self, state: RequestState) -> None:
        prompts = [state.params.prompt] + ([state.params.negative_prompt] if state.do_cfg else [])
        embeds = self.encoder(prompts).to(self.dtype)
        state.cond = embeds[:1]
        state.uncond = embeds[1:2] if state.do_cfg else None
        if self.image_encoder is not None:
            # CLIP sees the original image (its processor resizes / crops it); same rows for cond and uncond.
            pixels = self.image_processor(images=state.extras["image"], return_tensors="pt").pixel_values
            pixels = pixels.to(self.device, self.image_encoder.dtype)
            hidden = self.image_encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
            state.extras["image_embeds"] = hidden.to(self.dtype)  # (1, S_img, image_dim)

    @torch.no_grad()
    def prepare(self, state: RequestState) -> None:
        p = state.params
        lat_f = (p.num_frames - 1) // self.scale_temporal + 1
        lat_h, lat_w = p.height // self.scale_spatial, p.width // self.scale_spatial
        # 1. The noise: the first (and only) draw from the request's generator.
        state.latents = initial_noise((1, self.z_dim, lat_f, lat_h, lat_w), p.seed, self.device)

        if state.extras["image"] is None:  # TI2V text-only: nothing known, every frame denoised
            state.extras["mask"] = torch.ones(1, 1, lat_f, lat_h, lat_w, device=self.device)
            state.extras["condition"] = torch.zeros_like(state.latents[:, :, :1])
            state.start_sampling(self.samplers.new(p.num_inference_steps, self.device))
            return

        # 2. The conditioning video: the image as frame 0 (then black frames unless expand_timesteps),
        #    VAE-encoded (distribution mode, no random draw) and normalised.
        image = image_to_tensor(state.extras["image"], p.height, p.width).to(self.device)[:, :, None]
        if not self.expand_timesteps:
            image = torch.cat([image, image.new_zeros(1, 3, p.num_frames - 1, p.height, p.width)], dim=2)
        latent = self.vae.encode(image.to(self.vae.dtype)).latent_dist.mode().float()
        latent = (latent - self._latents_mean) * self._latents_inv_std  # (1, z, F_img, h, w)

        if self.expand_timesteps:
            # Frame 0 is known: mask 0 there (the image latents are kept), 1 elsewhere (denoised).
            mask = torch.ones(1, 1, lat_f, lat_h, lat_w, device=self.device)
            mask[:, :, 0] = 0
            state.extras["mask"] = mask
            state.extras["condition"] = latent  # (1, z, 1, h, w), broadcast over frames
        else:
            # One mask channel per VAE temporal step: frame 0's four "pixel frames" are known (1).
            mask = torch.zeros(1, self.scale_temporal, lat_f, lat_h, lat_w, device=self.device)
            mask[:, :, 0] = 1
            state.extras["condition"] = torch.cat([mask, latent], dim=1)  # (1, 4 + z, F, h, w)

        state.start_sampling(self.samplers.new(p.num_inference_steps, self.device))

    def _expert(self, t: torch.Tensor) -> int:
        return 0 if self.boundary is None or bool(t >= self.boundary) else 1

    def _model_input(self, state: RequestState, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent input (1, C_in, F, H, W) in the model dtype, timestep (1,) or per-token (1, L))."""
        if self.expand_timesteps:
            mask, condition = state.extras["mask"], state.extras["condition"]
            x = (1 - mask) * condition + mask * state.latents
            pt, ph, pw = self.patch_size
            per_token = (mask[0, 0, ::pt, ::ph, ::pw] * t).flatten()  # 0 on frame 0's tokens, t elsewhere
            return x.to(self.dtype), per_token[None]
        x = torch.cat([state.latents, state.extras["condition"]], dim=1)
        return x.to(self.dtype), t.reshape(1)

    @torch.no_grad()
    def denoise_step(self, states: list[RequestState]) -> int:
        """One step for every state. States whose timestep falls on the same expert share one forward
        (their CFG rows included); each state keeps its own guidance and sampler."""
        groups: dict[int, list[RequestState]] = {}
        for s in states:
            groups.setdefault(self._expert(s.timesteps[s.step]), []).append(s)
        rows = 0
        for expert, group in groups.items():
            rows += self._run_expert(self.experts[expert], group)
        return rows

    def _run_expert(self, model: WanTransformer, states: list[RequestState]) -> int:
        latents, timesteps, contexts, images = [], [], [], []
        for s in states:
            x, t = self._model_input(s, s.timesteps[s.step])
            n = 2 if s.do_cfg else 1
            latents += [x] * n
            timesteps += [t] * n
            contexts += [s.cond, s.uncond] if s.do_cfg else [s.cond]
            if self.image_encoder is not None:
                images += [s.extras["image_embeds"]] * n  # the uncond row sees the same image
        pred = model(
            torch.cat(latents),  # (rows, C_in, F, H, W)
            torch.cat(timesteps),  # (rows,) or (rows, L)
            torch.cat(contexts),  # (rows, S, text_dim)
            torch.cat(images) if images else None,  # (rows, S_img, image_dim)
        )
        row = 0
        for s in states:
            if s.do_cfg:
                # Wan2.2 A14B: guidance_scale_2 for the low-noise expert when set, else guidance_scale.
                low_noise = self._expert(s.timesteps[s.step]) == 1 and s.params.HasField("guidance_scale_2")
                scale = s.params.guidance_scale_2 if low_noise else s.params.guidance_scale
                cond, uncond = pred[row : row + 1], pred[row + 1 : row + 2]
                noise = uncond + scale * (cond - uncond)
                row += 2
            else:
                noise = pred[row : row + 1]
                row += 1
            s.latents = s.sampler.step(noise, s.timesteps[s.step], s.latents, return_dict=False)[0]
            s.step += 1
        return row

    @torch.no_grad()
    def decode(self, state: RequestState) -> np.ndarray:
        latents = state.latents
        if self.expand_timesteps:
            mask = state.extras["mask"]
            latents = (1 - mask) * state.extras["condition"] + mask * latents
        latents = latents.to(self.vae.dtype) / self._latents_inv_std + self._latents_mean
        video = decode_video(self.parallel, self.vae, latents)  # (1, 3, F, H, W) in [-1, 1]; None on followers
        return None if video is None else to_uint8_frames(video)
