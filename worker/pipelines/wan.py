"""Wan: every diffusers-layout Wan checkpoint we serve, in one pipeline class. A `WanVariant`, chosen
once from model_index.json, says how its requests run:

- Wan2.1 T2V (WanPipeline): one transformer, UMT5 prompt, a flow sampler per request, Wan VAE.
- Wan2.2 T2V-A14B (WanPipeline + boundary_ratio): two experts. `transformer` denoises the high-noise
  steps (t >= boundary_ratio * num_train_timesteps), `transformer_2` the rest, each with its own CFG
  scale (request.cfg_scales, highest noise first). In a batched step the requests on each side of
  the boundary run through their own expert.
- Wan2.2 TI2V-5B (WanPipeline + expand_timesteps): text, or text + image. With an image, the first
  latent frame is replaced by the image latents before every forward and gets timestep 0 through
  per-token timesteps (B, L); without one every frame is denoised at t. Wan2.2 VAE (48 channels, 16x).
- Wan2.1 I2V (WanImageToVideoPipeline): CLIP vision features of the input image go to the DiT's image
  K/V cross-attention; the first frame's VAE latents plus a 4-channel "known frame" mask are
  concatenated to the noisy latents along channels (16 + 4 + 16 = 36 input channels).
- Wan2.2 I2V-A14B (WanImageToVideoPipeline + boundary_ratio): the same channel concatenation, no CLIP,
  two experts.
- FastWan (FastVideo's WanDMDPipeline, Wan2.1 or Wan2.2 TI2V-5B text-only): the few-step DMD sampler
  (samplers/dmd.py), no CFG, FastVideo's frame-major noise draw. See docs/fastwan.md.

Seed contract as the references: the noise is the first and only random draw (the VAE encoding of
the conditioning video takes the distribution's mode); FastWan's DMD re-noising draws next, from
the same generator.
"""

from __future__ import annotations

import importlib
import io
import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffserve.v1 import generation_pb2 as pb

from diffserve.worker import loading
from diffserve.worker.models.step_cache import forward_rows, take, whole_outputs_only
from diffserve.worker.models.wan import WanTransformer
from diffserve.worker.parallel import ParallelState
from diffserve.worker.parallel.decode import decode_video
from diffserve.worker.samplers import SamplerFactory
from diffserve.worker.samplers.dmd import FASTWAN_DMD_SHIFT, FASTWAN_DMD_STEPS, DMDSampler
from diffserve.worker.pipelines.base import Capabilities, RequestState
from diffserve.worker.pipelines.denoise import Cfg, Unguided, contexts, per_row, run_step
from diffserve.worker.pipelines.latents import latent_shape
from diffserve.worker.pipelines.lora import OffersLora, ServedLora
from diffserve.worker.pipelines.step_caches import ALL_POLICIES, adapter_keys, per_layout, pick, row_caches
from diffserve.worker.pipelines.stages import T5PromptEncoder, initial_noise, to_uint8_frames
from diffserve.worker.v1 import worker_pb2 as wpb

TEXT_LENGTH = 512  # UMT5 tokens; the DiT's cross-attention context length

# Card defaults: (height, width, num_frames, steps, guidance_scale, fps).
# Wan2.1: diffusers WanPipeline's (and WanImageToVideoPipeline's) call defaults. Wan2.2: the Wan2.2
# model cards / generate.py configs (also FastVideo's Wan2_2_T2V_A14B_SamplingParam and
# Wan2_2_TI2V_5B_SamplingParam): A14B 1280x720, 81 frames, 40 steps, guidance 4.0 high-noise /
# 3.0 low-noise, 16 fps; TI2V-5B 1280x704, 121 frames, 50 steps, guidance 5.0, 24 fps.
WAN21_DEFAULTS = (480, 832, 81, 50, 5.0, 16)
A14B_T2V_DEFAULTS = (720, 1280, 81, 40, 4.0, 16)
A14B_T2V_GUIDANCE_2 = 3.0  # low-noise expert's guidance (Wan2.2 model card)
TI2V_DEFAULTS = (704, 1280, 121, 50, 5.0, 24)

# FastVideo trains FastWan2.1 with Video Sparse Attention; its checkpoints carry the VSA gate of the
# compressed-attention branch. We run dense attention (no VSA kernel), so those weights are unused.
VSA_ONLY_KEYS = ("to_gate_compress",)


class ImageConditioning(Enum):
    NONE = "none"  # text only
    CHANNELS = "channels"  # Wan I2V: mask + first-frame latents concatenated along channels
    FIRST_FRAME = "first_frame"  # Wan2.2 TI2V (expand_timesteps): image latents replace frame 0, timestep 0 there


@dataclass(frozen=True)
class WanVariant:
    """How a Wan checkpoint's requests run; read once from model_index.json."""

    experts: tuple[str, ...]  # transformer folders, highest noise first
    boundary_ratio: float | None  # two experts: the high-noise expert runs while t >= ratio * num_train
    expand_timesteps: bool  # Wan2.2 TI2V-5B layout
    image: ImageConditioning
    image_required: bool
    clip: bool  # CLIP image features to the DiT's image cross-attention (Wan2.1 I2V)
    dmd: bool  # FastWan: DMD sampler, no CFG

    @classmethod
    def from_index(cls, root: Path, index: dict) -> WanVariant:
        class_name = index.get("_class_name", "")
        boundary = index.get("boundary_ratio")
        experts = tuple(n for n in ("transformer", "transformer_2") if _has_component(index, n))
        if not experts:
            raise loading.CheckpointError(f"{root}: model_index.json names no transformer")
        if boundary is None:
            experts = experts[:1]
        expand = bool(index.get("expand_timesteps", False))
        dmd = class_name == "WanDMDPipeline"
        if dmd or (class_name == "WanPipeline" and not expand):
            image, required = ImageConditioning.NONE, False
        elif expand:  # TI2V-5B: as a WanPipeline the image is optional (text-only requests too)
            image, required = ImageConditioning.FIRST_FRAME, class_name != "WanPipeline"
        else:
            image, required = ImageConditioning.CHANNELS, True
        clip = image is ImageConditioning.CHANNELS and _transformer_config(root / experts[0]).get("image_dim") is not None
        return cls(experts, None if boundary is None else float(boundary), expand, image, required, clip, dmd)

    @property
    def capabilities(self) -> Capabilities:
        if self.dmd:  # one row per request: a cfg axis splits the rows of batched requests
            return Capabilities(uses_cfg=False, cfg_parallel=True, decodes_on_every_rank=True)
        # Image-conditioned variants have not been checked under the cfg row split: refused there.
        return Capabilities(uses_cfg=True, cfg_parallel=self.image is ImageConditioning.NONE, decodes_on_every_rank=True)


def _has_component(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def _transformer_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


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


@dataclass(eq=False)
class WanState(RequestState):
    image: Image.Image | None = None  # the decoded input image; None for text-only requests
    image_embeds: torch.Tensor | None = None  # CLIP features, (1, S_img, image_dim)
    mask: torch.Tensor | None = None  # FIRST_FRAME: 0 where latents are known, (1, 1, F, H, W)
    condition: torch.Tensor | None = None  # CHANNELS: (1, 4 + z, F, H, W); FIRST_FRAME: (1, z, 1, H, W)
    loras_2: tuple = ()  # Wan2.2 A14B: the request's adapters for `transformer_2` (`loras`: for `transformer`)


class WanPipeline(OffersLora):
    """Serves diffusers-layout WanPipeline / WanImageToVideoPipeline checkpoints and FastVideo's
    WanDMDPipeline checkpoints; `variant` says which."""

    parallel = ParallelState.single()  # the worker sets the group's state
    forward_batched = (1, 2, 3, 4, 6)  # latents, timesteps, text, image features, LoRA adapters: one per row

    def __init__(self, root: Path, name: str, device: torch.device, dtype: torch.dtype):
        index = loading.read_model_index(root)
        self.root = root
        self.device, self.dtype = device, dtype
        self.variant = v = WanVariant.from_index(root, index)
        self.capabilities = v.capabilities
        self.guide = Unguided() if v.dmd else Cfg()
        self.encoder = T5PromptEncoder(
            loading.load_tokenizer(root),
            loading.load_component(root, index, "text_encoder", dtype, device),
            TEXT_LENGTH,
            device,
            dtype,
        )
        # Strict loads; FastWan: every tensor but the VSA-only ones must match the model.
        ignore = VSA_ONLY_KEYS if v.dmd else ()
        self.experts = [WanTransformer.from_pretrained(root / n, dtype, device, ignore=ignore).eval() for n in v.experts]
        self.transformer = self.experts[0]

        # Wan2.1 I2V only: CLIP image features (penultimate hidden states) for the image cross-attention.
        # The image encoder runs in float32, as the model card loads it.
        self.image_encoder = self.image_processor = None
        if v.clip:
            self.image_encoder = loading.load_component(root, index, "image_encoder", torch.float32, device)
            library, cls_name = loading.component_class(index, "image_processor")
            self.image_processor = getattr(importlib.import_module(library), cls_name).from_pretrained(root / "image_processor")

        # The Wan VAEs run in float32, as their model cards recommend: bf16 decoding shows banding.
        self.vae = loading.load_component(root, index, "vae", torch.float32, device)
        self.samplers = SamplerFactory.from_dir(root / "scheduler")
        num_train = int(self.samplers.config.get("num_train_timesteps", 1000))
        self.boundary = None if v.boundary_ratio is None or len(self.experts) == 1 else v.boundary_ratio * num_train
        vae_config = self.vae.config
        self.scale_spatial = int(getattr(vae_config, "scale_factor_spatial", 8))
        self.scale_temporal = int(getattr(vae_config, "scale_factor_temporal", 4))
        z_dim = int(vae_config.z_dim)
        # The noise has the transformer's input channels, or the VAE's where conditioning adds more.
        self.latent_channels = z_dim if v.image is not ImageConditioning.NONE else self.transformer.config.in_channels
        mean = torch.tensor(vae_config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(vae_config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._latents_mean, self._latents_inv_std = mean.to(device), inv_std.to(device)
        self.family = "wan2.2" if v.boundary_ratio is not None or v.expand_timesteps or z_dim == 48 else "wan2.1"
        self.card = self._card(name)

    # -- card -----------------------------------------------------------------------------------

    def _card(self, name: str) -> pb.Model:
        v = self.variant
        guidance_2 = 0.0
        if v.image is ImageConditioning.NONE:
            task = "text-to-video"
            if len(self.experts) == 2:
                defaults, guidance_2 = A14B_T2V_DEFAULTS, A14B_T2V_GUIDANCE_2
            else:
                defaults = TI2V_DEFAULTS if v.expand_timesteps else WAN21_DEFAULTS
        elif not v.image_required:
            task, defaults = "text-image-to-video", TI2V_DEFAULTS
        else:
            task = "image-to-video"
            # Wan2.2 TI2V-5B generates 24 fps video; the 14B I2V models 16 fps.
            defaults = WAN21_DEFAULTS[:5] + (24 if v.expand_timesteps else 16,)
        height, width, frames, steps, guidance, fps = defaults
        patch = self.transformer.config.patch_size
        card = pb.Model(
            name=name,
            family=self.family,
            guidance_kind=pb.GUIDANCE_KIND_CFG,
            task=task,
            defaults=pb.ModelDefaults(
                height=height, width=width, num_frames=frames, num_inference_steps=steps, guidance_scale=guidance,
                fps=fps, negative_prompt="", sampler=self.samplers.class_name, flow_shift=self.samplers.flow_shift,
                guidance_scale_2=guidance_2,
            ),
            limits=pb.ModelLimits(
                size_multiple=self.scale_spatial * max(patch[1], patch[2]),
                max_height=2048, max_width=2048, max_pixels=1920 * 1088,
                frame_step=self.scale_temporal, max_num_frames=257, max_num_inference_steps=1000,
                prompt_required=True, image_required=v.image_required,
                max_images=0 if v.image is ImageConditioning.NONE else 1,
            ),
        )
        if v.dmd:
            self._fastwan_card(card)
        for field, value in loading.card_defaults(self.root).items():  # the checkpoint's own (diffserve.json)
            setattr(card.defaults, field, value)
        return card

    def _fastwan_card(self, card: pb.Model) -> None:
        if self.variant.expand_timesteps:
            # FastWan2.2-TI2V-5B-FullAttn: we keep Wan2.2 TI2V-5B's size, frames and fps.
            card.family = "fastwan2.2"
            height, width, frames, fps = 704, 1280, 121, 24
        else:
            # FastVideo's FastWanT2V480PConfig sampling defaults (fastvideo/configs/sample/wan.py):
            # 448x832 (the distillation resolution), 61 frames, 16 fps.
            card.family = "fastwan2.1"
            height, width, frames, fps = 448, 832, 61, 16
        card.defaults.height, card.defaults.width, card.defaults.num_frames, card.defaults.fps = height, width, frames, fps
        card.defaults.num_inference_steps, card.defaults.guidance_scale = len(FASTWAN_DMD_STEPS), 1.0  # no CFG
        card.guidance_kind = pb.GUIDANCE_KIND_NONE
        card.defaults.sampler, card.defaults.flow_shift = "DMD", FASTWAN_DMD_SHIFT
        card.limits.max_num_inference_steps = len(FASTWAN_DMD_STEPS)

    # -- stages ---------------------------------------------------------------------------------

    lora_2: ServedLora | None = None  # Wan2.2 A14B: the adapters of `transformer_2` (folder/transformer_2)

    def enable_lora(self, folder: Path, max_bytes: int) -> None:
        """Serves the adapters of `folder` per request (--lora-dir). On a two-expert Wan2.2 A14B,
        folder/NAME.safetensors goes into `transformer` (the high-noise expert) and
        folder/transformer_2/NAME.safetensors into `transformer_2`, as diffusers' load_lora_weights
        without and with `load_into_transformer_2=True`; a request's adapter NAME runs in each expert
        that has a file of that name, at its one scale. Each expert's cache gets half of `max_bytes`."""
        from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

        # FLF2V folds two image rows into one in the image embedder: its linears see no row per request.
        exclude = ("condition_embedder.image_embedder",) if self.transformer.config.pos_embed_seq_len else ()
        second = folder / "transformer_2"
        if len(self.experts) > 1:
            max_bytes //= 2
            if second.is_dir():
                self.lora_2 = ServedLora(self.experts[1], second, max_bytes, WanLoraLoaderMixin.lora_state_dict, exclude)
        self.lora = ServedLora(self.transformer, folder, max_bytes, WanLoraLoaderMixin.lora_state_dict, exclude)

    @property
    def lora_adapters(self) -> tuple[str, ...]:
        return tuple(sorted(set(super().lora_adapters) | set(self.lora_2.names if self.lora_2 else ())))

    def _admit_loras(self, state: WanState) -> None:
        """The request's adapters of each expert, loaded (ValueError naming an unknown or bad one)."""
        if self.lora_2 is None:
            state.loras = self.request_loras(state.request)
            return
        offered = self.lora_adapters
        for lora in state.request.loras:
            if lora.name not in offered:
                raise ValueError(f"no LoRA adapter {lora.name!r} on this worker (its --lora-dir offers: {', '.join(offered)})")
        state.loras = self.lora.resolve(state.request, partial=True)
        state.loras_2 = self.lora_2.resolve(state.request, partial=True)

    def admit(self, request_id: str, request: wpb.Request) -> WanState:
        state = WanState(request_id=request_id, request=request)
        self._admit_loras(state)
        if self.variant.image is ImageConditioning.NONE or (not request.images and not self.variant.image_required):
            return state  # text-to-video
        if len(request.images) != 1 or not request.images[0]:
            raise ValueError("image-to-video needs exactly one input image (params.images[0].data)")
        state.image = decode_image(request.images[0])  # fails early on undecodable bytes
        return state

    def encode(self, state: WanState) -> None:
        self.encode_batch([state])

    @torch.no_grad()
    def encode_batch(self, states: list[WanState]) -> None:
        """The prompts (and negative prompts) of every request in one text-encoder call; each row
        is its prompt's alone (T5 masks the other rows' padding), so batching changes no result."""
        texts = []
        for state in states:
            texts.append(state.request.prompt)
            if self.guide.unconditional(state.request):
                texts.append(state.request.negative_prompt)
        rows = iter(self.encoder.rows(texts))  # (1, L, D) each, in the pipeline's dtype
        for state in states:
            state.cond = next(rows)
            state.uncond = next(rows) if self.guide.unconditional(state.request) else None
            if self.image_encoder is not None:
                self._encode_image(state)

    def _encode_image(self, state: WanState) -> None:
        """CLIP features of the request's image (Wan2.1 I2V)."""
        # CLIP sees the original image (its processor resizes / crops it); same rows for cond and uncond.
        pixels = self.image_processor(images=state.image, return_tensors="pt").pixel_values
        pixels = pixels.to(self.device, self.image_encoder.dtype)
        hidden = self.image_encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        state.image_embeds = hidden.to(self.dtype)  # (1, S_img, image_dim)

    @torch.no_grad()
    def prepare(self, state: WanState) -> None:
        r = state.request
        shape = latent_shape(self.latent_channels, r.height, r.width, r.num_frames,
                             spatial=self.scale_spatial, temporal=self.scale_temporal)
        if self.variant.dmd:
            self._prepare_dmd(state, shape)
            return
        state.latents = initial_noise(shape, r.seed, self.device)  # the first (and only) random draw
        if self.variant.image is not ImageConditioning.NONE:
            self._condition(state)
        state.start_sampling(self.samplers.new(r.num_inference_steps, self.device))

    def _prepare_dmd(self, state: WanState, shape: tuple[int, ...]) -> None:
        # The seed contract, drawn as FastVideo's WanDMDPipeline draws it: float32 normal noise from
        # torch.Generator("cpu").manual_seed(seed) in its frame-major (B, F, C, H, W) latent layout
        # (LatentPreparationStage(use_btchw_layout=True)). The generator stays with the request:
        # the DMD re-noising draws from it, in step order.
        r = state.request
        generator = torch.Generator("cpu").manual_seed(r.seed)
        b, c, f, h, w = shape
        noise = torch.randn((b, f, c, h, w), generator=generator, dtype=torch.float32)
        state.latents = noise.permute(0, 2, 1, 3, 4).contiguous().to(self.device)  # (B, C, F, H, W)
        # Fewer steps than listed: the first k listed timesteps (the last one returns x0).
        steps = FASTWAN_DMD_STEPS[: r.num_inference_steps]
        state.start_sampling(DMDSampler(steps, generator, self.device, shift=FASTWAN_DMD_SHIFT))

    def _condition(self, state: WanState) -> None:
        """The image conditioning: mask and condition latents (none known for a text-only TI2V request)."""
        r = state.request
        _, _, lat_f, lat_h, lat_w = state.latents.shape
        if state.image is None:  # TI2V text-only: nothing known, every frame denoised
            state.mask = torch.ones(1, 1, lat_f, lat_h, lat_w, device=self.device)
            state.condition = torch.zeros_like(state.latents[:, :, :1])
            return
        # The conditioning video: the image as frame 0 (then black frames unless expand_timesteps),
        # VAE-encoded (distribution mode, no random draw) and normalised.
        image = image_to_tensor(state.image, r.height, r.width).to(self.device)[:, :, None]
        if self.variant.image is ImageConditioning.CHANNELS:
            image = torch.cat([image, image.new_zeros(1, 3, r.num_frames - 1, r.height, r.width)], dim=2)
        latent = self.vae.encode(image.to(self.vae.dtype)).latent_dist.mode().float()
        latent = (latent - self._latents_mean) * self._latents_inv_std  # (1, z, F_img, h, w)
        if self.variant.image is ImageConditioning.FIRST_FRAME:
            # Frame 0 is known: mask 0 there (the image latents are kept), 1 elsewhere (denoised).
            state.mask = torch.ones(1, 1, lat_f, lat_h, lat_w, device=self.device)
            state.mask[:, :, 0] = 0
            state.condition = latent  # (1, z, 1, h, w), broadcast over frames
        else:
            # One mask channel per VAE temporal step: frame 0's four "pixel frames" are known (1).
            mask = torch.zeros(1, self.scale_temporal, lat_f, lat_h, lat_w, device=self.device)
            mask[:, :, 0] = 1
            state.condition = torch.cat([mask, latent], dim=1)  # (1, 4 + z, F, h, w)

    # -- denoising ------------------------------------------------------------------------------

    def expert_of(self, state: WanState) -> int:
        """0: `transformer` (one expert, or Wan2.2's high-noise steps); 1: `transformer_2` (low noise).
        The timestep is compared as a tensor, as the reference compares it, on the host copy (a device
        tensor's bool() would wait for the GPU every step)."""
        return 0 if self.boundary is None or bool(state.timesteps_host[state.step] >= self.boundary) else 1

    def forward(self, expert: int, latents, timesteps, context, image_embeds, caches=None, loras=None) -> torch.Tensor | list[torch.Tensor]:
        model = self.experts[expert]
        if caches is None and loras is None:
            if isinstance(latents, list):  # requests of different sizes, packed into one sequence
                return model.forward_packed(latents, timesteps, context, image_embeds)
            return model(latents, timesteps, context, image_embeds)
        if loras is None and torch.is_tensor(latents) and whole_outputs_only(caches):
            # TaylorSeer rows (with exact ones): a row is predicted or runs the whole forward, so the rows
            # that run take the instance's forward, its CUDA graph where one is captured (bench/NOTES.md).
            return forward_rows(caches, lambda rows: model(take(latents, rows), take(timesteps, rows), take(context, rows), take(image_embeds, rows)))
        # Some rows step-cache (decided per row) or run LoRA adapters: eager, and rows do not pack: one
        # forward per size, plain rows of that size included. A cached forward runs its later blocks on
        # some of its rows only, so there every row of one forward has the same adapters (one forward per
        # size and adapter set). Rows come back in their order.
        keys = adapter_keys([tuple(x.shape) for x in latents], caches, loras)
        if torch.is_tensor(latents) and len(set(keys)) == 1:
            return self._eager(model, latents, timesteps, context, image_embeds, caches, loras)

        def run(rows: list[int]) -> torch.Tensor:
            return self._eager(model, torch.stack([latents[i] for i in rows]), take(timesteps, rows), take(context, rows), take(image_embeds, rows),
                               pick(caches, rows), pick(loras, rows))

        return per_layout(keys, run)

    def _eager(self, model: WanTransformer, latents, timesteps, context, image_embeds, caches, loras) -> torch.Tensor:
        """One forward of same-size rows, each with its step cache and LoRA adapters (None: none in any
        row). The class's forward, not the instance's: a CUDA graph or compiled graph there would replay
        without the adapters."""
        with self.lora_rows(loras, self.lora if model is self.transformer else self.lora_2):
            if caches is not None:
                return model.forward_cached(latents, timesteps, context, image_embeds, caches)
            return WanTransformer.forward(model, latents, timesteps, context, image_embeds)

    @property
    def cache_policies(self) -> tuple[str, ...]:
        """Step caching it offers (worker/pipelines/step_caches.py), on one process: a row's skip is
        decided on its rank, and a parallel layout would need the decision shared."""
        return () if self.parallel.distributed else ALL_POLICIES

    @property
    def packs(self) -> bool:
        """Whether requests of different sizes share one forward, their tokens packed (mixed-shape
        batching): on one process (a parallel layout shards one shape), and not with per-token
        timesteps (image-to-video on frame 0's tokens: one shape per forward)."""
        return not self.parallel.distributed and self.variant.image is not ImageConditioning.FIRST_FRAME

    def _group(self, state: WanState):
        """The forward a state's rows join: its expert's, and its shape's unless requests pack."""
        expert = self.expert_of(state)
        return expert if self.packs else (expert, tuple(state.latents.shape))

    def _model_input(self, state: WanState) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent input (1, C_in, F, H, W), timestep (1,) or per-token (1, L)). Timesteps go to the
        DiT raw (0..1000)."""
        t = state.timesteps[state.step]
        image = self.variant.image
        if image is ImageConditioning.FIRST_FRAME:
            x = (1 - state.mask) * state.condition + state.mask * state.latents
            pt, ph, pw = self.transformer.config.patch_size
            per_token = (state.mask[0, 0, ::pt, ::ph, ::pw] * t).flatten()  # 0 on frame 0's tokens, t elsewhere
            return x, per_token[None]
        if image is ImageConditioning.CHANNELS:
            return torch.cat([state.latents, state.condition], dim=1), t.reshape(1)
        # Text only (TI2V-layout FastWan included: diffusers' per-token timesteps all equal t without
        # an image, and the DiT's (B,) path computes the same modulation once per sample).
        return state.latents, t.reshape(1)

    def _rows(self, group: list[WanState], uncond: list[bool]) -> tuple:
        inputs = per_row(group, uncond, self._model_input)
        images = per_row(group, uncond, lambda s: s.image_embeds) if self.image_encoder is not None else []
        latents = [x for x, _ in inputs]
        if len({x.shape for x in latents}) > 1:  # packed: a list of (C_in, F, H, W), one per row
            stacked: torch.Tensor | list[torch.Tensor] = [x[0].to(self.dtype) for x in latents]
        else:
            stacked = torch.cat(latents).to(self.dtype)  # (rows, C_in, F, H, W)
        caches = row_caches(group, uncond, self.expert_of)
        # Each row's LoRA adapters for this expert (a CFG request's unconditional row too, as diffusers);
        # None: no row has any.
        expert = self.expert_of(group[0])
        adapters = (lambda s: s.loras) if expert == 0 else (lambda s: s.loras_2)
        loras = per_row(group, uncond, adapters) if any(adapters(s) for s in group) else None
        return (
            expert,
            stacked,
            torch.cat([t for _, t in inputs]),  # (rows,) or (rows, L)
            torch.cat(contexts(group, uncond)),  # (rows, S, text_dim)
            torch.cat(images) if images else None,  # (rows, S_img, image_dim); the uncond row sees the image too
            caches,  # per row: its step cache or None (exact); None for all: no row step-caches
            loras,  # per row: its (LoraWeights, scale) pairs
        )

    def denoise_step(self, states: list[WanState]) -> int:
        """One step for every state. States on the same expert share one forward (their CFG rows
        included), packed where their sizes differ (`packs`); each state keeps its own guidance and
        sampler."""
        return run_step(states, guide=self.guide, rows=self._rows, forward=self.forward,
                        key=self._group, expert=self.expert_of)

    @torch.no_grad()
    def decode(self, state: WanState) -> np.ndarray:
        latents = state.latents
        if self.variant.image is ImageConditioning.FIRST_FRAME:
            latents = (1 - state.mask) * state.condition + state.mask * latents
        latents = latents.to(self.vae.dtype) / self._latents_inv_std + self._latents_mean  # undo the latent normalisation
        video = decode_video(self.parallel, self.vae, latents)  # (1, 3, F, H, W) in [-1, 1]; None on followers
        return None if video is None else to_uint8_frames(video)
