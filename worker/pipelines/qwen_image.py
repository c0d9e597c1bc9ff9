"""Qwen-Image (text-to-image) and Qwen-Image-Edit (image + instruction -> image).

Both: a Qwen2.5-VL prompt encoder (chat template, template prefix dropped), our Qwen-Image MMDiT on
packed 2x2 latents, a FlowMatchEuler sampler per request with the dynamic shift `mu` of the
latent sequence length, true CFG with the norm rescale, and the Qwen-Image VAE.
Edit also runs the input image through the VL encoder (image tokens in the prompt) and through
the VAE, whose packed latents follow the noise latents in the DiT's image sequence.

The request's CFG scale (request.cfg_scales, from the public `guidance_scale`) is the reference
pipelines' `true_cfg_scale` (they have a separate `guidance_scale` only for guidance-distilled
variants, which we do not serve). As the scheduler always fills `negative_prompt` (card default
" ") and sends a scale only when it is > 1, CFG runs exactly when the reference's rule with a
negative prompt given says so.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffserve.v1 import generation_pb2 as pb

from diffserve.worker import loading
from diffserve.worker.models.qwen_image import QwenImageTransformer
from diffserve.worker.models.step_cache import take
from diffserve.worker.parallel import ParallelState
from diffserve.worker.samplers import SamplerFactory
from diffserve.worker.pipelines.base import Capabilities, RequestState
from diffserve.worker.pipelines.denoise import Cfg, contexts, pad_texts, per_row, run_step
from diffserve.worker.pipelines.latents import calculate_shift, latent_shape, pack, unpack
from diffserve.worker.pipelines.lora import OffersLora, ServedLora
from diffserve.worker.pipelines.step_caches import FIRST_BLOCK, adapter_keys, per_layout, pick, row_caches
from diffserve.worker.pipelines.stages import initial_noise, to_uint8_frames
from diffserve.worker.v1 import worker_pb2 as wpb
from diffserve.worker.transfer import to_device

MAX_TEXT_TOKENS = 1024  # the reference's tokenizer_max_length / max_sequence_length
EDIT_TARGET_AREA = 1024 * 1024  # Edit resizes the input image to about this many pixels


def edit_image_size(width: int, height: int) -> tuple[int, int]:
    """The reference's `calculate_dimensions`: ~1024^2 pixels at the input's aspect ratio, multiples of 32."""
    ratio = width / height
    w = math.sqrt(EDIT_TARGET_AREA * ratio)
    h = w / ratio
    return round(w / 32) * 32, round(h / 32) * 32


@dataclass(eq=False)
class QwenImageState(RequestState):
    image_latents: torch.Tensor | None = None  # Edit: the input image's packed VAE latents, (1, L_img, C * 4)
    condition_shapes: list = field(default_factory=list)  # Edit: the input image's (frames, h, w) token grid
    image_shapes: list = field(default_factory=list)  # every image's token grid: the noise's first, then conditions


class _QwenImageBase(OffersLora):
    family = "qwen-image"
    capabilities = Capabilities(uses_cfg=True, cfg_parallel=True)  # true CFG: cond / uncond rows on the two cfg halves
    parallel = ParallelState.single()  # the worker sets the group's state
    guide = Cfg(norm_rescale=True)
    forward_batched = (0, 1, 2, 3, 6)  # latents, timesteps, text, text mask, LoRA adapters: one per row
    task = ""
    template = ""
    template_drop = 0  # tokens of the template before the user's text (prompt_template_encode_start_idx)

    def __init__(self, root: Path, name: str, device: torch.device, dtype: torch.dtype):
        index = loading.read_model_index(root)
        self.device, self.dtype = device, dtype
        self.text_encoder = loading.load_component(root, index, "text_encoder", dtype, device)
        self.transformer = QwenImageTransformer.from_pretrained(root / "transformer", dtype, device)
        # The VAE runs in float32 (decoding in bf16 bands, as with Wan's VAE of the same design).
        self.vae = loading.load_component(root, index, "vae", torch.float32, device)
        self.samplers = SamplerFactory.from_dir(root / "scheduler")
        vae_config = self.vae.config
        self.vae_scale = 2 ** len(vae_config.temperal_downsample)
        self.latent_channels = vae_config.z_dim
        stats = dict(dtype=torch.float32, device=device)
        self._latents_mean = torch.tensor(vae_config.latents_mean, **stats).view(1, -1, 1, 1, 1)
        self._latents_std = torch.tensor(vae_config.latents_std, **stats).view(1, -1, 1, 1, 1)
        self.card = self._card(name)

    # ---- card ---------------------------------------------------------------------------------

    def _card(self, name: str) -> pb.Model:
        needs_image = self.task == "image-edit"
        return pb.Model(
            name=name,
            family=self.family,
            guidance_kind=pb.GUIDANCE_KIND_CFG_NORM_RESCALE,
            task=self.task,
            defaults=pb.ModelDefaults(
                # Qwen-Image: the reference's default size (default_sample_size 128 x VAE factor 8).
                # Edit: 0 = derived on the worker from the input image, as the reference does.
                height=0 if needs_image else 1024, width=0 if needs_image else 1024, num_frames=1, num_inference_steps=50,
                guidance_scale=4.0,  # = the reference's true_cfg_scale
                fps=16, negative_prompt=" ",
                sampler=self.samplers.class_name, flow_shift=self.samplers.flow_shift,
            ),
            limits=pb.ModelLimits(
                size_multiple=self.vae_scale * self.transformer.config.patch_size,
                max_height=2048, max_width=2048, max_pixels=2048 * 2048,
                frame_step=1, max_num_frames=1, max_num_inference_steps=1000,
                prompt_required=True, image_required=needs_image, max_images=1 if needs_image else 0,
            ),
        )

    # ---- stages -------------------------------------------------------------------------------

    def admit(self, request_id: str, request: wpb.Request) -> QwenImageState:
        if request.num_frames != 1:
            raise ValueError(f"{self.family} makes images: num_frames must be 1 (got {request.num_frames})")
        state = QwenImageState(request_id=request_id, request=request)
        state.loras = self.request_loras(request)
        return state

    def enable_lora(self, folder: Path, max_bytes: int) -> None:
        """Serves the adapters of `folder` per request (--lora-dir; worker/pipelines/lora.py)."""
        from diffusers.loaders.lora_pipeline import QwenImageLoraLoaderMixin

        self.lora = ServedLora(self.transformer, folder, max_bytes, QwenImageLoraLoaderMixin.lora_state_dict)

    @torch.no_grad()
    def _hidden_states(self, inputs) -> torch.Tensor:
        """Last hidden states of the VL model at the prompt's tokens, template prefix dropped: (1, S, D)."""
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        out = self.text_encoder(**inputs, output_hidden_states=True)
        hidden = out.hidden_states[-1][0][inputs["attention_mask"][0].bool()]  # (tokens, D)
        return hidden[self.template_drop :][None].to(self.dtype)

    def _encode_prompt(self, state: QwenImageState, text: str, vision=None) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, state: QwenImageState, vision=None) -> None:
        r = state.request
        state.cond = self._encode_prompt(state, r.prompt, vision)
        state.uncond = self._encode_prompt(state, r.negative_prompt, vision) if self.guide.unconditional(r) else None

    def prepare(self, state: QwenImageState) -> None:
        r = state.request
        _, c, _, h, w = latent_shape(self.latent_channels, r.height, r.width, spatial=self.vae_scale)  # latent pixels
        noise = initial_noise((1, 1, c, h, w), r.seed, self.device)  # the reference's draw, (B, F, C, H, W)
        state.latents = pack(noise)  # (1, L, C * 4) float32
        steps = r.num_inference_steps
        sigmas = np.linspace(1.0, 1 / steps, steps)
        mu = calculate_shift(state.latents.shape[1], self.samplers.config)
        state.start_sampling(self.samplers.new(steps, self.device, sigmas=sigmas, mu=mu))
        patch = self.transformer.config.patch_size
        state.image_shapes = [(1, h // patch, w // patch)] + state.condition_shapes

    def forward(self, x, t, text, mask, image_shapes, caches=None, loras=None) -> torch.Tensor | list[torch.Tensor]:
        model = self.transformer
        if caches is None and loras is None:
            if isinstance(x, list):  # requests of different sizes, packed into one sequence
                return model.forward_packed(x, t, text, image_shapes)
            return model(x, t, text, mask, image_shapes)
        # Some rows step-cache (decided per row) or run LoRA adapters: eager, and rows do not pack: one
        # forward per image layout (texts padded again), exact rows of that layout included; where rows
        # step-cache, also one per adapter set. Rows back in their order.
        packed = isinstance(x, list)
        keys = adapter_keys([tuple(map(tuple, shapes)) for shapes in image_shapes] if packed else [()] * len(x), caches, loras)
        if not packed and len(set(keys)) == 1:
            return self._eager(x, t, text, mask, image_shapes, caches, loras)

        def run(rows: list[int]) -> torch.Tensor:
            if packed:
                padded, padding = self._texts([text[i][None] for i in rows])
                return self._eager(torch.stack([x[i] for i in rows]), take(t, rows), padded, padding, image_shapes[rows[0]],
                                   pick(caches, rows), pick(loras, rows))
            return self._eager(take(x, rows), take(t, rows), take(text, rows), take(mask, rows), image_shapes, pick(caches, rows), pick(loras, rows))

        return per_layout(keys, run)

    def _eager(self, x, t, text, mask, image_shapes, caches, loras) -> torch.Tensor:
        """One forward of rows of one image layout with their step caches and LoRA adapters (None: none
        in any row). The class's forward: a CUDA graph there would replay without the adapters."""
        with self.lora_rows(loras):
            if caches is not None:
                return self.transformer.forward_cached(x, t, text, mask, image_shapes, caches)
            return QwenImageTransformer.forward(self.transformer, x, t, text, mask, image_shapes)

    @property
    def cache_policies(self) -> tuple[str, ...]:
        """Step caching it offers (worker/pipelines/step_caches.py), on one process: a row's skip is
        decided on its rank, and a parallel layout would need the decision shared."""
        return () if self.parallel.distributed else FIRST_BLOCK

    def _texts(self, texts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(1, S_i, D) prompt rows -> right-padded (R, S, D) in the model dtype and the (R, S) mask
        of real tokens, None where no row is padded."""
        text, lengths = pad_texts(texts)
        mask = None
        if min(lengths) < text.shape[1]:
            mask = torch.arange(text.shape[1], device=self.device)[None, :] < to_device(lengths, self.device)[:, None]
        return text.to(self.dtype), mask

    @property
    def packs(self) -> bool:
        """Whether requests of different sizes share one forward, their tokens packed (mixed-shape
        batching): on one process (a parallel layout shards one shape)."""
        return not self.parallel.distributed

    def _rows(self, group: list[QwenImageState], uncond: list[bool]) -> tuple:
        """cond / uncond rows of different text lengths, padded and masked. Timesteps go in as the
        sampler gives them; the DiT divides by 1000 in its dtype, as the reference casts them."""
        def latents(s: QwenImageState) -> torch.Tensor:
            if s.image_latents is None:
                return s.latents
            return torch.cat([s.latents, s.image_latents], dim=1)  # (1, L + L_img, Cp)

        t = torch.stack(per_row(group, uncond, lambda s: s.timesteps[s.step]))  # (R,) as the sampler gives them (the DiT scales them)
        caches = row_caches(group, uncond)  # per row: its step cache or None (exact); None for all: no row step-caches
        if len({tuple(s.image_shapes) for s in group}) > 1:  # packed: lists of rows, texts unpadded
            return ([x[0].to(self.dtype) for x in per_row(group, uncond, latents)], t,
                    [c[0].to(self.dtype) for c in contexts(group, uncond)], None, per_row(group, uncond, lambda s: list(s.image_shapes)), caches)
        text, mask = self._texts(contexts(group, uncond))  # (R, S, D), (R, S) or None
        x = torch.cat(per_row(group, uncond, latents)).to(self.dtype)
        # Each row's LoRA adapters (the unconditional row too, as diffusers); None: no row has any.
        loras = per_row(group, uncond, lambda s: s.loras) if any(s.loras for s in group) else None
        return x, t, text, mask, list(group[0].image_shapes), caches, loras

    def denoise_step(self, states: list[QwenImageState]) -> int:
        """One step for all `states`: one DiT forward, packed where image-token layouts differ (`packs`;
        else one forward per layout); the prediction of the noise tokens only, in float32, is guided."""
        packs = self.packs and not any(s.loras for s in states)  # a step with a LoRA row: one forward per layout
        return run_step(states, guide=self.guide, rows=self._rows, forward=self.forward,
                        key=lambda s: 0 if packs else tuple(s.image_shapes),
                        prediction=lambda out, s: out[:, : s.latents.shape[1]].float())

    @torch.no_grad()
    def decode(self, state: RequestState) -> np.ndarray:
        r = state.request
        latents = unpack(state.latents.float(), r.height // self.vae_scale, r.width // self.vae_scale)[:, :, None]  # (1, C, 1, H, W)
        latents = latents / (1.0 / self._latents_std) + self._latents_mean  # undo the latent normalisation
        image = self.vae.decode(latents, return_dict=False)[0]  # (1, 3, 1, H, W) in [-1, 1]
        return to_uint8_frames(image)


class QwenImagePipeline(_QwenImageBase):
    """Serves a diffusers-layout QwenImagePipeline checkpoint (Qwen/Qwen-Image)."""

    task = "text-to-image"
    template = (
        "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
        "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    template_drop = 34

    def __init__(self, root: Path, name: str, device: torch.device, dtype: torch.dtype):
        self.tokenizer = loading.load_tokenizer(root)
        super().__init__(root, name, device, dtype)

    def _encode_prompt(self, state: QwenImageState, text: str, vision=None) -> torch.Tensor:
        tokens = self.tokenizer(
            [self.template.format(text)], max_length=MAX_TEXT_TOKENS + self.template_drop,
            padding=True, truncation=True, return_tensors="pt",
        )
        inputs = {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}
        return self._hidden_states(inputs)[:, :MAX_TEXT_TOKENS]


class QwenImageEditPipeline(_QwenImageBase):
    """Serves a diffusers-layout QwenImageEditPipeline checkpoint (Qwen/Qwen-Image-Edit).

    The input image is resized to ~1024^2 pixels at its own aspect ratio (the reference's rule);
    an unset output height / width (0: the card's default) is derived from the input image's
    aspect ratio at ~1024^2 pixels, rounded down to the size multiple, as the reference does.
    """

    task = "image-edit"
    template = (
        "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
        "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
        "image that meets the user's requirements while maintaining consistency with the original input where "
        "appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    template_drop = 64

    def __init__(self, root: Path, name: str, device: torch.device, dtype: torch.dtype):
        from diffusers.image_processor import VaeImageProcessor
        from transformers import AutoImageProcessor, AutoTokenizer

        # The processor/ folder's parts, used as transformers' Qwen2VLProcessor uses them (see
        # _encode_prompt): that class also wants a video processor, which needs torchvision.
        self.tokenizer = AutoTokenizer.from_pretrained(root / "processor")
        self.vl_image_processor = AutoImageProcessor.from_pretrained(root / "processor")
        super().__init__(root, name, device, dtype)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale * 2)

    def admit(self, request_id: str, request: wpb.Request) -> QwenImageState:
        if len(request.images) != 1 or not request.images[0]:
            raise ValueError("Qwen-Image-Edit takes exactly one input image (params.images[0].data)")
        return super().admit(request_id, self._sized(request))

    def _sized(self, request: wpb.Request) -> wpb.Request:
        """Until the scheduler sends Edit's size (derived from the input image): an unset height /
        width (0) becomes the input image's aspect ratio at ~1024^2 pixels, rounded down to the size
        multiple, as the reference does. Delete once request.height / width always come set."""
        if request.height and request.width:
            return request
        from PIL import Image

        resolved = wpb.Request()
        resolved.CopyFrom(request)
        width, height = edit_image_size(*Image.open(io.BytesIO(request.images[0])).size)
        multiple = self.vae_scale * 2
        resolved.width = resolved.width or width // multiple * multiple
        resolved.height = resolved.height or height // multiple * multiple
        return resolved

    def encode(self, state: QwenImageState, vision=None) -> None:
        from PIL import Image

        image = Image.open(io.BytesIO(state.request.images[0])).convert("RGB")
        width, height = edit_image_size(*image.size)
        image = self.image_processor.resize(image, height, width)  # PIL, as the VL encoder sees it
        # Pixel patches and their (t, h, w) grid, shared by the prompt and the negative.
        vision = self.vl_image_processor(images=[image], return_tensors="pt")
        super().encode(state, vision)
        self._encode_image_latents(state, image, height, width)

    def _encode_prompt(self, state: QwenImageState, text: str, vision=None) -> torch.Tensor:
        # As Qwen2VLProcessor: the image placeholder becomes one token per merged patch.
        image_token = "<|image_pad|>"
        n_image_tokens = int(vision["image_grid_thw"][0].prod()) // self.vl_image_processor.merge_size**2
        prompt = self.template.format(text).replace(image_token, image_token * n_image_tokens)
        tokens = self.tokenizer([prompt], padding=True, return_tensors="pt")
        return self._hidden_states(
            {
                "input_ids": tokens.input_ids,
                "attention_mask": tokens.attention_mask,
                "pixel_values": vision["pixel_values"],
                "image_grid_thw": vision["image_grid_thw"],
            }
        )

    @torch.no_grad()
    def _encode_image_latents(self, state: QwenImageState, image, height: int, width: int) -> None:
        pixels = self.image_processor.preprocess(image, height, width).unsqueeze(2)  # (1, 3, 1, H, W) in [-1, 1]
        latents = self.vae.encode(pixels.to(self.device, torch.float32)).latent_dist.mode()  # (1, C, 1, h, w)
        latents = (latents - self._latents_mean) / self._latents_std
        state.image_latents = pack(latents)  # (1, L_img, C * 4)
        patch = self.transformer.config.patch_size
        state.condition_shapes = [(1, height // self.vae_scale // patch, width // self.vae_scale // patch)]
