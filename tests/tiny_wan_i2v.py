"""Tiny random Wan image-to-video checkpoints in diffusers layout (WanImageToVideoPipeline), for tests.

Three variants, each loadable by `diffusers.WanImageToVideoPipeline.from_pretrained(path)`:

- `build_tiny_wan21_i2v`: Wan2.1 I2V: a CLIP vision encoder + CLIPImageProcessor, a transformer with
  image_dim / added_kv_proj_dim (image K/V cross-attention) and 36 input channels (16 noise + 4 mask
  + 16 first-frame condition latents), the Wan2.1 VAE.
- `build_tiny_wan22_i2v`: Wan2.2 I2V-A14B: no image encoder, two transformers (`transformer` for
  t >= boundary_ratio * 1000, `transformer_2` below), 36 input channels.
- `build_tiny_wan22_ti2v`: Wan2.2 TI2V-5B with an image: expand_timesteps, 48-channel transformer,
  the Wan2.2 VAE (z_dim 48, residual blocks, patch size 2 -> 16x spatial compression).

Deterministic (seeded), each builds in about a second and is a few hundred KB on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from checkpoints import TINY_UMT5, TINY_VOCAB, TINY_WAN_TRANSFORMER, TINY_WAN_VAE, _build_tokenizer

# Wan2.1 I2V transformer: width 32, CLIP features of width 32 go through the image embedder to width 32,
# which the added K/V projections take (added_kv_proj_dim is the model width, as in the real 14B).
TINY_I2V_TRANSFORMER = dict(TINY_WAN_TRANSFORMER, in_channels=36, out_channels=16, image_dim=32, added_kv_proj_dim=32)

# Wan2.2 A14B I2V experts: the same layout without the image branch.
TINY_A14B_TRANSFORMER = dict(TINY_WAN_TRANSFORMER, in_channels=36, out_channels=16)

# Wan2.2 TI2V-5B: 48 latent channels in and out, no channel concatenation.
TINY_TI2V_TRANSFORMER = dict(TINY_WAN_TRANSFORMER, in_channels=48, out_channels=48)

# CLIP ViT: 32x32 input in 8x8 patches -> 16 patch tokens + CLS; the pipeline takes hidden_states[-2].
TINY_CLIP_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
    projection_dim=32,
)

# CLIPImageProcessor as in Wan2.1-I2V (resize shortest edge, bicubic, center crop, CLIP mean/std), at 32 px.
TINY_CLIP_PROCESSOR = dict(
    do_resize=True,
    size={"shortest_edge": 32},
    resample=3,
    do_center_crop=True,
    crop_size={"height": 32, "width": 32},
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
    image_mean=[0.48145466, 0.4578275, 0.40821073],
    image_std=[0.26862954, 0.26130258, 0.27577711],
    do_convert_rgb=True,
)

# Wan2.2 VAE: residual blocks, patchify 2x2 (12 input channels), 3 downsamples -> 16x spatial, 4x temporal.
TINY_WAN22_VAE = dict(
    base_dim=4,
    decoder_base_dim=4,
    z_dim=48,
    dim_mult=[1, 1, 1, 1],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
    is_residual=True,
    in_channels=12,
    out_channels=12,
    patch_size=2,
    scale_factor_spatial=16,
    scale_factor_temporal=4,
    # Non-trivial latent statistics so the (de)normalisation is exercised.
    latents_mean=[round(0.1 * ((i % 7) - 3), 3) for i in range(48)],
    latents_std=[round(1.0 + 0.1 * (i % 5), 3) for i in range(48)],
)

# Schedulers: UniPC with flow sigmas, as the Wan I2V checkpoints ship (shift 5 for 480P / Wan2.2).
WAN_I2V_SCHEDULER = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0, num_train_timesteps=1000)

# Wan2.2 I2V-A14B switches experts at t = 0.9 * 1000.
A14B_BOUNDARY_RATIO = 0.9


def _text_encoder():
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    return UMT5EncoderModel(UMT5Config(vocab_size=len(TINY_VOCAB), **TINY_UMT5)).eval()


def _transformer(config: dict, seed: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(**config)


def _vae(config: dict):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(**config)


def _save(pipe, path: Path) -> Path:
    pipe.save_pretrained(path, safe_serialization=True)
    # transformers without torchvision instantiates CLIPImageProcessorPil; real checkpoints name the
    # public class, which resolves to the same processor.
    index_file = path / "model_index.json"
    index = json.loads(index_file.read_text())
    if index.get("image_processor", [None, None])[1] is not None:
        index["image_processor"] = ["transformers", "CLIPImageProcessor"]
        index_file.write_text(json.dumps(index, indent=2))
    return path


def build_tiny_wan21_i2v(path: str | Path) -> Path:
    """Wan2.1 I2V (Wan-AI/Wan2.1-I2V-14B-480P-Diffusers layout), tiny and random."""
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    path = Path(path)
    torch.manual_seed(0)
    image_encoder = CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP_VISION)).eval()
    pipe = WanImageToVideoPipeline(
        tokenizer=_build_tokenizer(),
        text_encoder=_text_encoder(),
        vae=_vae(TINY_WAN_VAE),
        scheduler=UniPCMultistepScheduler(**WAN_I2V_SCHEDULER),
        image_processor=CLIPImageProcessor(**TINY_CLIP_PROCESSOR),
        image_encoder=image_encoder,
        transformer=_transformer(TINY_I2V_TRANSFORMER, 0),
    )
    return _save(pipe, path)


def build_tiny_wan22_i2v(path: str | Path) -> Path:
    """Wan2.2 I2V-A14B (two experts switched at boundary_ratio), tiny and random."""
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline

    path = Path(path)
    pipe = WanImageToVideoPipeline(
        tokenizer=_build_tokenizer(),
        text_encoder=_text_encoder(),
        vae=_vae(TINY_WAN_VAE),
        scheduler=UniPCMultistepScheduler(**WAN_I2V_SCHEDULER),
        transformer=_transformer(TINY_A14B_TRANSFORMER, 0),
        transformer_2=_transformer(TINY_A14B_TRANSFORMER, 1),
        boundary_ratio=A14B_BOUNDARY_RATIO,
    )
    return _save(pipe, path)


def build_tiny_wan22_ti2v(path: str | Path) -> Path:
    """Wan2.2 TI2V-5B with image conditioning (expand_timesteps, Wan2.2 VAE), tiny and random."""
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline

    path = Path(path)
    pipe = WanImageToVideoPipeline(
        tokenizer=_build_tokenizer(),
        text_encoder=_text_encoder(),
        vae=_vae(TINY_WAN22_VAE),
        scheduler=UniPCMultistepScheduler(**WAN_I2V_SCHEDULER),
        transformer=_transformer(TINY_TI2V_TRANSFORMER, 0),
        expand_timesteps=True,
    )
    return _save(pipe, path)


BUILDERS = {"wan21-i2v": build_tiny_wan21_i2v, "wan22-i2v": build_tiny_wan22_i2v, "wan22-ti2v": build_tiny_wan22_ti2v}

if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3 or sys.argv[1] not in BUILDERS:
        sys.exit(f"usage: python tests/tiny_wan_i2v.py {{{','.join(BUILDERS)}}} OUT_DIR")
    print(BUILDERS[sys.argv[1]](sys.argv[2]))
