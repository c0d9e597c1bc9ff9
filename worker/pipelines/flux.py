"""FLUX.1 text-to-image: CLIP pooled + T5 sequence prompt, our FLUX DiT on packed 2x2 latents,
a flow-matching Euler sampler with resolution-dependent shift per request, AutoencoderKL.

FLUX.1-dev is guidance-distilled: the guidance scale is an input of the transformer (embedded
like a timestep), not classifier-free guidance, so every request is one transformer row. The
reference is diffusers' FluxPipeline with true CFG off (true_cfg_scale 1, the default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffserve.v1 import generation_pb2 as pb

from diffserve.worker import loading
from diffserve.worker.models.flux import FluxTransformer
from diffserve.worker.models.step_cache import take
from diffserve.worker.parallel import ParallelState
from diffserve.worker.samplers import SamplerFactory
from diffserve.worker.pipelines.base import Capabilities, RequestState
from diffserve.worker.pipelines.denoise import Unguided, run_step
from diffserve.worker.pipelines.latents import calculate_shift, latent_shape, pack, unpack
from diffserve.worker.pipelines.lora import OffersLora, ServedLora
from diffserve.worker.pipelines.step_caches import FIRST_BLOCK, adapter_keys, per_layout, pick, row_caches
from diffserve.worker.pipelines.stages import initial_noise, to_uint8_frames
from diffserve.worker.v1 import worker_pb2 as wpb
from diffserve.worker.transfer import to_device

T5_LENGTH = 512  # FluxPipeline's max_sequence_length default (and maximum)
DEFAULT_SIZE = 1024


def image_ids(h2: int, w2: int, device: torch.device) -> torch.Tensor:
    """RoPE ids of the packed tokens, (h2 * w2, 3): (0, row, column) in row-major token order."""
    ids = torch.zeros(h2, w2, 3, device=device)
    ids[..., 1] = torch.arange(h2, device=device)[:, None]
    ids[..., 2] = torch.arange(w2, device=device)[None, :]
    return ids.reshape(h2 * w2, 3)


@dataclass(eq=False)
class FluxState(RequestState):
    pooled: torch.Tensor | None = None  # CLIP pooled prompt embedding, (1, P)
    latent_hw: tuple[int, int] = (0, 0)  # unpacked latent rows, columns (even)


class FluxPipeline(OffersLora):
    """Serves a diffusers-layout FluxPipeline checkpoint (model_index `_class_name` FluxPipeline)."""

    family = "flux.1"
    # Guidance is embedded (guidance-distilled): no unconditional rows; the cfg axis splits the
    # rows of requests batched together.
    capabilities = Capabilities(uses_cfg=False, cfg_parallel=True)
    parallel = ParallelState.single()  # the worker sets the group's state
    task = "text-to-image"
    guide = Unguided()
    forward_batched = (0, 1, 2, 3, 6, 8)  # x, t, context, pooled, guidance, LoRA adapters: one per row

    def __init__(self, root: Path, name: str, device: torch.device, dtype: torch.dtype):
        index = loading.read_model_index(root)
        self.device, self.dtype = device, dtype
        self.clip_tokenizer = loading.load_tokenizer(root, "tokenizer")
        self.clip = loading.load_component(root, index, "text_encoder", dtype, device)
        self.t5_tokenizer = loading.load_tokenizer(root, "tokenizer_2")
        self.t5 = loading.load_component(root, index, "text_encoder_2", dtype, device)
        self.transformer = FluxTransformer.from_pretrained(root / "transformer", dtype, device).eval()
        # The VAE decodes in float32 (diffusers would use the pipeline dtype): one decode per image, better output.
        self.vae = loading.load_component(root, index, "vae", torch.float32, device)
        self.samplers = SamplerFactory.from_dir(root / "scheduler")

        self.clip_length = int(getattr(self.clip_tokenizer, "model_max_length", 77) or 77)
        if self.clip_length > 10_000:  # tokenizers without a configured length report a huge sentinel
            self.clip_length = 77
        vae_config = self.vae.config
        self.vae_scale = 2 ** (len(vae_config.block_out_channels) - 1)  # 8 for FLUX
        self.scaling_factor = float(vae_config.scaling_factor)
        self.shift_factor = float(getattr(vae_config, "shift_factor", None) or 0.0)
        self.latent_channels = self.transformer.config.in_channels // 4  # packed channels are 4x the VAE's
        self.guidance_embeds = self.transformer.config.guidance_embeds
        self.card = self._card(name)

    # -----------------------------------------------------------------------------------------
    # Model card: defaults and limits
    # -----------------------------------------------------------------------------------------

    def _card(self, name: str) -> pb.Model:
        # With dynamic shifting the effective shift depends on the image size; report it at the default size.
        if self.samplers.config.get("use_dynamic_shifting", False):
            tokens = (DEFAULT_SIZE // (self.vae_scale * 2)) ** 2
            flow_shift = math.exp(calculate_shift(tokens, self.samplers.config))
        else:
            flow_shift = self.samplers.flow_shift
        # FLUX.1-dev: 28 steps, embedded guidance 3.5. Without a guidance embedder (FLUX.1-schnell): 4 steps.
        steps, guidance = (28, 3.5) if self.guidance_embeds else (4, 0.0)
        return pb.Model(
            name=name,
            family=self.family,
            guidance_kind=pb.GUIDANCE_KIND_EMBEDDED if self.guidance_embeds else pb.GUIDANCE_KIND_NONE,
            task=self.task,
            defaults=pb.ModelDefaults(
                height=DEFAULT_SIZE, width=DEFAULT_SIZE, num_frames=1, num_inference_steps=steps,
                guidance_scale=guidance, fps=16, negative_prompt="", sampler=self.samplers.class_name,
                flow_shift=flow_shift,
            ),
            limits=pb.ModelLimits(
                size_multiple=self.vae_scale * 2,  # VAE factor x 2x2 packing
                max_height=2048, max_width=2048, max_pixels=2048 * 2048,
                frame_step=1, max_num_frames=1, max_num_inference_steps=1000,
                prompt_required=True, image_required=False, max_images=0,
            ),
        )

    # -----------------------------------------------------------------------------------------
    # Stages
    # -----------------------------------------------------------------------------------------

    def enable_lora(self, folder: Path, max_bytes: int) -> None:
        """Serves the adapters of `folder` per request (--lora-dir; worker/pipelines/lora.py)."""
        self.lora = ServedLora(self.transformer, folder, max_bytes, _flux_lora_state_dict)

    def admit(self, request_id: str, request: wpb.Request) -> FluxState:
        state = FluxState(request_id=request_id, request=request)
        state.loras = self.request_loras(request)
        return state

    @torch.no_grad()
    def encode(self, state: RequestState) -> None:
        """cond: T5 states (1, 512, J), padded to the fixed length and unmasked as in FluxPipeline, so
        every request has the same text length and rows batch without masks; pooled:
        CLIP pooled embedding (1, P). The negative prompt is not used (true CFG is off)."""
        prompt = [state.request.prompt]
        clip_ids = self.clip_tokenizer(
            prompt, padding="max_length", max_length=self.clip_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        pooled = self.clip(clip_ids, output_hidden_states=False).pooler_output  # (1, P)
        t5_ids = self.t5_tokenizer(
            prompt, padding="max_length", max_length=T5_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        text = self.t5(t5_ids, output_hidden_states=False)[0]  # (1, 512, J)
        state.cond = text.to(self.dtype)
        state.uncond = None
        state.pooled = pooled.to(self.dtype)

    def prepare(self, state: FluxState) -> None:
        r = state.request
        _, c, _, h, w = latent_shape(self.latent_channels, r.height, r.width, spatial=self.vae_scale, multiple=2)
        noise = initial_noise((1, c, h, w), r.seed, self.device)  # the seed contract: unpacked
        state.latents = pack(noise)  # float32 (1, N, 4C), N = h/2 * w/2
        state.latent_hw = (h, w)

        steps = r.num_inference_steps
        kwargs = {"mu": calculate_shift(state.latents.shape[1], self.samplers.config)}
        if not self.samplers.config.get("use_flow_sigmas", False):
            kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
        state.start_sampling(self.samplers.new(steps, self.device, **kwargs))

    def forward(self, x, t, context, pooled, img_ids, txt_ids, guidance, caches=None, loras=None) -> torch.Tensor | list[torch.Tensor]:
        model = self.transformer
        if caches is None and loras is None:
            if isinstance(x, list):  # requests of different sizes, packed into one sequence
                return model.forward_packed(x, t, context, pooled, img_ids, txt_ids, guidance)
            return model(x, t, context, pooled, img_ids, txt_ids, guidance)
        # Some rows step-cache (decided per row) or run LoRA adapters: eager, and rows do not pack: one
        # forward per size, exact rows of that size included; where rows step-cache, also one per adapter
        # set (a cached forward runs its later blocks on some of its rows only). Rows back in their order.
        keys = adapter_keys([tuple(row.shape) for row in x], caches, loras)
        if torch.is_tensor(x) and len(set(keys)) == 1:
            return self._eager(x, t, context, pooled, img_ids, txt_ids, guidance, caches, loras)

        def run(rows: list[int]) -> torch.Tensor:
            ids = img_ids if torch.is_tensor(img_ids) else img_ids[rows[0]]
            return self._eager(torch.stack([x[i] for i in rows]), take(t, rows), take(context, rows), take(pooled, rows), ids, txt_ids,
                               take(guidance, rows), pick(caches, rows), pick(loras, rows))

        return per_layout(keys, run)

    def _eager(self, x, t, context, pooled, img_ids, txt_ids, guidance, caches, loras) -> torch.Tensor:
        """One forward of same-size rows with their step caches and LoRA adapters (None: none in any
        row). The class's forward: a CUDA graph there would replay without the adapters."""
        with self.lora_rows(loras):
            if caches is not None:
                return self.transformer.forward_cached(x, t, context, pooled, img_ids, txt_ids, guidance, caches)
            return FluxTransformer.forward(self.transformer, x, t, context, pooled, img_ids, txt_ids, guidance)

    @property
    def cache_policies(self) -> tuple[str, ...]:
        """Step caching it offers (worker/pipelines/step_caches.py), on one process: a row's skip is
        decided on its rank, and a parallel layout would need the decision shared."""
        return () if self.parallel.distributed else FIRST_BLOCK

    @property
    def packs(self) -> bool:
        """Whether requests of different sizes share one forward, their tokens packed (mixed-shape
        batching): on one process (a parallel layout shards one shape)."""
        return not self.parallel.distributed

    def _rows(self, group: list[FluxState], uncond: list[bool]) -> tuple:
        """One row per request: the sampler's timestep and the embedded guidance as they are (the
        DiT does the reference's scaling), guidance only for checkpoints with a guidance embedder.
        Requests of different sizes: lists of their tokens and of their position ids (packed). Last,
        each row's step cache, or None where no row step-caches."""
        sizes = {s.latent_hw for s in group}
        if len(sizes) > 1:
            x: torch.Tensor | list[torch.Tensor] = [s.latents[0].to(self.dtype) for s in group]  # (N_i, 4C) each
            img_ids: torch.Tensor | list[torch.Tensor] = [image_ids(h // 2, w // 2, self.device) for h, w in (s.latent_hw for s in group)]
        else:
            h, w = group[0].latent_hw
            x = torch.cat([s.latents for s in group]).to(self.dtype)  # (B, N, 4C)
            img_ids = image_ids(h // 2, w // 2, self.device)
        t = torch.stack([s.timesteps[s.step] for s in group]).float()  # (B,)
        guidance = None
        if self.guidance_embeds:
            guidance = to_device([s.request.embedded_guidance for s in group], self.device, torch.float32)
        context = torch.cat([s.cond for s in group])  # (B, 512, J)
        pooled = torch.cat([s.pooled for s in group])  # (B, P)
        txt_ids = torch.zeros(context.shape[1], 3, device=self.device)
        loras = [s.loras for s in group] if any(s.loras for s in group) else None  # per row; None: no row has any
        return x, t, context, pooled, img_ids, txt_ids, guidance, row_caches(group, uncond), loras

    def denoise_step(self, states: list[FluxState]) -> int:
        """One step for every state: one transformer forward, packed where sizes differ (`packs`;
        else one forward per size). Each row carries its own timestep, guidance and prompt."""
        # float32 prediction keeps the latents float32 through the Euler update. A step with a LoRA row
        # does not pack (one forward per size, rows with and without adapters together).
        packs = self.packs and not any(s.loras for s in states)
        return run_step(states, guide=self.guide, rows=self._rows, forward=self.forward,
                        key=lambda s: 0 if packs else s.latent_hw, prediction=lambda out, s: out.float())

    @torch.no_grad()
    def decode(self, state: RequestState) -> np.ndarray:
        h, w = state.latent_hw
        latents = unpack(state.latents, h, w).to(self.vae.dtype)  # (1, C, H/8, W/8)
        latents = latents / self.scaling_factor + self.shift_factor
        image = self.vae.decode(latents, return_dict=False)[0]  # (1, 3, H, W) in [-1, 1]
        return to_uint8_frames(image[:, :, None])  # (1, H, W, 3)


def _flux_lora_state_dict(tensors: dict) -> dict:
    """diffusers' FLUX LoRA reading (kohya, XLabs, BFL Control, fal layouts to diffusers'); a file
    with kohya network alphas (`*.alpha` keys beside PEFT names) is refused: diffusers would scale
    by them, which worker/lora_files.py does not do yet."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    state, alphas = FluxLoraLoaderMixin.lora_state_dict(tensors, return_alphas=True)
    if alphas:
        raise ValueError(f"network alphas ({next(iter(alphas))}, ...) are not supported yet")
    return state
