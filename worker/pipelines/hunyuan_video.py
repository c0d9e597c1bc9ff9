"""HunyuanVideo text-to-video: LLaMA prompt states + CLIP pooled embedding, our HunyuanVideo DiT with
embedded guidance, a flow-match Euler sampler per request, the HunyuanVideo causal 3-D VAE.

As diffusers' HunyuanVideoPipeline with its defaults: the prompt goes into the LLaMA chat template,
the template's first `crop_start` tokens are cropped off the hidden states of layer
num_hidden_layers - 1 - HIDDEN_STATE_SKIP_LAYER (hidden_states[-3]), CLIP sees the bare prompt. The
guidance scale is *embedded* (guidance-distilled model, one transformer row per request, no CFG);
the reference's true CFG (true_cfg_scale > 1) is not exposed by our API, so it is off.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffserve.v1 import generation_pb2 as pb

from diffserve.worker import loading
from diffserve.worker.models.hunyuan_video import HunyuanVideoTransformer
from diffserve.worker.parallel.decode import decode_video
from diffserve.worker.parallel import ParallelState
from diffserve.worker.samplers import SamplerFactory
from diffserve.worker.pipelines.base import Capabilities, RequestState
from diffserve.worker.pipelines.denoise import Unguided, pad_texts, run_step
from diffserve.worker.pipelines.latents import latent_shape
from diffserve.worker.pipelines.lora import OffersLora, ServedLora
from diffserve.worker.pipelines.stages import initial_noise, to_uint8_frames
from diffserve.worker.v1 import worker_pb2 as wpb
from diffserve.worker.transfer import to_device

# diffusers' DEFAULT_PROMPT_TEMPLATE for HunyuanVideo (the text of the original release).
PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
CROP_START = 95  # tokens of the template before the prompt (BOS included), dropped from the states
MAX_SEQUENCE_LENGTH = 256  # prompt tokens kept after the crop
HIDDEN_STATE_SKIP_LAYER = 2  # the states of layer num_hidden_layers - 1 - 2, i.e. hidden_states[-3]
CLIP_LENGTH = 77


@dataclass(eq=False)
class HunyuanVideoState(RequestState):
    pooled: torch.Tensor | None = None  # CLIP pooled prompt embedding, (1, clip_dim)


class HunyuanVideoT2VPipeline(OffersLora):
    """Serves a diffusers-layout HunyuanVideoPipeline checkpoint (model_index `_class_name` HunyuanVideoPipeline)."""

    family = "hunyuan-video"
    task = "text-to-video"
    parallel = ParallelState.single()  # the worker sets the group's state
    # Embedded guidance: one row per request. Rows are not split over a cfg axis, so cfg-parallel layouts
    # are refused (the row split cuts per-row lists too now, so listing the text lengths and adapters in
    # forward_batched would be the start; not built or tested).
    capabilities = Capabilities(uses_cfg=False, cfg_parallel=False, decodes_on_every_rank=True)
    guide = Unguided()
    forward_batched = (0, 1, 2, 4, 5)  # latents, t, text, pooled, guidance (no cfg axis: never split)

    def __init__(self, root: Path, name: str, device: torch.device, dtype: torch.dtype):
        index = loading.read_model_index(root)
        self.device, self.dtype = device, dtype
        self.tokenizer = loading.load_tokenizer(root, "tokenizer")
        self.text_encoder = loading.load_component(root, index, "text_encoder", dtype, device)
        self.tokenizer_2 = loading.load_tokenizer(root, "tokenizer_2")
        self.text_encoder_2 = loading.load_component(root, index, "text_encoder_2", dtype, device)
        self.transformer = HunyuanVideoTransformer.from_pretrained(root / "transformer", dtype, device)
        self.vae = loading.load_component(root, index, "vae", dtype, device)
        # Tiled decoding only engages above the VAE's tile size (256 px / 64 frames by default), where
        # an untiled decode of a 720p clip would not fit in memory anyway.
        self.vae.enable_tiling()
        self.samplers = SamplerFactory.from_dir(root / "scheduler")
        self.scale_spatial = int(self.vae.spatial_compression_ratio)
        self.scale_temporal = int(self.vae.temporal_compression_ratio)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.latent_channels = self.transformer.config.in_channels
        self.card = self._card(name)

    def _card(self, name: str) -> pb.Model:
        return pb.Model(
            name=name,
            family=self.family,
            guidance_kind=pb.GUIDANCE_KIND_EMBEDDED,
            task=self.task,
            defaults=pb.ModelDefaults(
                height=720, width=1280, num_frames=129, num_inference_steps=50, guidance_scale=6.0, fps=24,
                negative_prompt="", sampler=self.samplers.class_name, flow_shift=self.samplers.flow_shift,
            ),
            limits=pb.ModelLimits(
                size_multiple=self.scale_spatial * self.transformer.config.patch_size,  # 16
                max_height=1280, max_width=1280, max_pixels=1280 * 720,
                frame_step=self.scale_temporal, max_num_frames=129, max_num_inference_steps=1000,
                prompt_required=True, image_required=False, max_images=0,
            ),
        )

    def enable_lora(self, folder: Path, max_bytes: int) -> None:
        """Serves the adapters of `folder` per request (--lora-dir; worker/pipelines/lora.py), read as
        diffusers' HunyuanVideoPipeline.load_lora_weights reads them (the original layout converted)."""
        from diffusers.loaders.lora_pipeline import HunyuanVideoLoraLoaderMixin

        self.lora = ServedLora(self.transformer, folder, max_bytes, HunyuanVideoLoraLoaderMixin.lora_state_dict)

    def admit(self, request_id: str, request: wpb.Request) -> HunyuanVideoState:
        state = HunyuanVideoState(request_id=request_id, request=request)
        state.loras = self.request_loras(request)
        return state

    @torch.no_grad()
    def encode(self, state: HunyuanVideoState) -> None:
        """cond: the LLaMA states of the prompt's valid tokens only, (1, n, text_dim); pooled: (1, clip_dim)."""
        prompt = state.request.prompt
        tokens = self.tokenizer(
            [PROMPT_TEMPLATE.format(prompt)], max_length=MAX_SEQUENCE_LENGTH + CROP_START, padding="max_length",
            truncation=True, return_attention_mask=True, return_tensors="pt",
        )
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        embeds = hidden[-(HIDDEN_STATE_SKIP_LAYER + 1)][:, CROP_START:]  # (1, 256, text_dim)
        mask = mask[:, CROP_START:]
        n = int(mask.sum())
        # The transformer counts the first n text tokens as valid (the reference masks the same way),
        # so the prompt must come first and the padding after.
        if n == 0 or not bool(mask[0, :n].all()):
            raise ValueError("the prompt tokenizer must pad on the right and leave prompt tokens after the template")
        state.cond = embeds[:, :n].to(self.dtype)

        clip_ids = self.tokenizer_2(
            [prompt], max_length=CLIP_LENGTH, padding="max_length", truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        state.pooled = self.text_encoder_2(clip_ids, output_hidden_states=False).pooler_output.to(self.dtype)
        state.uncond = None

    def prepare(self, state: HunyuanVideoState) -> None:
        r = state.request
        shape = latent_shape(self.latent_channels, r.height, r.width, r.num_frames,
                             spatial=self.scale_spatial, temporal=self.scale_temporal)
        state.latents = initial_noise(shape, r.seed, self.device)
        sigmas = np.linspace(1.0, 0.0, r.num_inference_steps + 1)[:-1]  # as the reference passes them
        state.start_sampling(self.samplers.new(r.num_inference_steps, self.device, sigmas=sigmas))

    def forward(self, latents, t, text, lengths, pooled, guidance, loras=None) -> torch.Tensor:
        if loras is None:
            return self.transformer(latents, t, text, lengths, pooled, guidance)
        # Rows with LoRA adapters: the class's forward, eager (a graph on the instance would replay
        # without the adapters); rows with other adapters or none share it.
        with self.lora_rows(loras):
            return HunyuanVideoTransformer.forward(self.transformer, latents, t, text, lengths, pooled, guidance)

    def _rows(self, group: list[HunyuanVideoState], uncond: list[bool]) -> tuple:
        """One row per request; texts are right-padded to the longest in the batch and each row
        attends only to its own valid tokens. Timesteps and the embedded guidance go in as they are
        (float32); the DiT rounds the guidance to its dtype and scales it by 1000, as the reference.
        Last, each row's LoRA adapters, or None where no row has any."""
        text, lengths = pad_texts([s.cond for s in group])
        latents = torch.cat([s.latents for s in group]).to(self.dtype)  # (B, C, F, H, W)
        t = torch.stack([s.timesteps[s.step] for s in group]).float()  # (B,)
        pooled = torch.cat([s.pooled for s in group])
        guidance = to_device([s.request.embedded_guidance for s in group], self.device, torch.float32)
        loras = [s.loras for s in group] if any(s.loras for s in group) else None  # per row; None: no row has any
        return latents, t, text, lengths, pooled, guidance, loras

    def denoise_step(self, states: list[HunyuanVideoState]) -> int:
        """One step for every state in one forward, one row per request."""
        return run_step(states, guide=self.guide, rows=self._rows, forward=self.forward)

    @torch.no_grad()
    def decode(self, state: RequestState) -> np.ndarray:
        latents = state.latents.to(self.vae.dtype) / self.scaling_factor
        video = decode_video(self.parallel, self.vae, latents)  # (1, 3, F, H, W) in [-1, 1]; None on followers
        return None if video is None else to_uint8_frames(video)
