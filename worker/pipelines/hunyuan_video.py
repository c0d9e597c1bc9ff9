"""HunyuanVideo text-to-video: LLaMA prompt states + CLIP pooled embedding, our HunyuanVideo DiT with
embedded guidance, a flow-match Euler sampler per request, the HunyuanVideo causal 3-D VAE.

As diffusers' HunyuanVideoPipeline with its defaults: the prompt goes into the LLaMA chat template,
the template's first `crop_start` tokens are cropped off the hidden states of layer
num_hidden_layers - 1 - HIDDEN_STATE_SKIP_LAYER (hidden_states[-3]), CLIP sees the bare prompt. The
guidance scale is *embedded* (guidance-distilled model, one transformer row per request, no CFG);
the reference's true CFG (true_cfg_scale > 1) is not exposed by our API, so it is off.
"""

from __future__ import annotations

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
from diffserve.worker.pipelines.stages import initial_noise, to_uint8_frames

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


class HunyuanVideoT2VPipeline:
    """Serves a diffusers-layout HunyuanVideoPipeline checkpoint (model_index `_class_name` HunyuanVideoPipeline)."""

    family = "hunyuan-video"
    task = "text-to-video"
    parallel = ParallelState.single()  # the worker sets the group's state
    capabilities = Capabilities(uses_cfg=False, cfg_parallel=False, decodes_on_every_rank=True)  # embedded guidance

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

    def admit(self, request_id: str, params: pb.GenerationParams) -> RequestState:
        return RequestState(request_id=request_id, params=params)

    @torch.no_grad()
    def encode(self, state: RequestState) -> None:
        """cond: the LLaMA states of the prompt's valid tokens only, (1, n, text_dim); extras["pooled"]: (1, clip_dim)."""
        prompt = state.params.prompt
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
        state.extras["pooled"] = self.text_encoder_2(clip_ids, output_hidden_states=False).pooler_output.to(self.dtype)
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
        state.latents = initial_noise(shape, p.seed, self.device)
        sigmas = np.linspace(1.0, 0.0, p.num_inference_steps + 1)[:-1]  # as the reference passes them
        state.start_sampling(self.samplers.new(p.num_inference_steps, self.device, sigmas=sigmas))
        # The raw guidance scale; the transformer rounds it to its dtype and scales it by 1000, as the reference.
        state.extras["guidance"] = torch.tensor([p.guidance_scale], dtype=torch.float32, device=self.device)

    @torch.no_grad()
    def denoise_step(self, states: list[RequestState]) -> int:
        """One step for every state in one forward: one row per request; texts are right-padded to the
        longest in the batch and each row attends only to its own valid tokens."""
        lengths = [s.cond.shape[1] for s in states]
        longest = max(lengths)
        text = torch.cat([torch.nn.functional.pad(s.cond, (0, 0, 0, longest - s.cond.shape[1])) for s in states])
        latents = torch.cat([s.latents for s in states]).to(self.dtype)  # (B, C, F, H, W)
        t = torch.stack([s.timesteps[s.step] for s in states]).float()  # (B,)
        pooled = torch.cat([s.extras["pooled"] for s in states])
        guidance = torch.cat([s.extras["guidance"] for s in states])
        pred = self.transformer(latents, t, text, lengths, pooled, guidance)
        for i, s in enumerate(states):
            s.latents = s.sampler.step(pred[i : i + 1], s.timesteps[s.step], s.latents, return_dict=False)[0]
            s.step += 1
        return len(states)

    @torch.no_grad()
    def decode(self, state: RequestState) -> np.ndarray:
        latents = state.latents.to(self.vae.dtype) / self.scaling_factor
        video = decode_video(self.parallel, self.vae, latents)  # (1, 3, F, H, W) in [-1, 1]; None on followers
        return None if video is None else to_uint8_frames(video)
