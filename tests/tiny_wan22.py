"""Tiny random Wan2.2 / FastWan checkpoints in diffusers layout, built locally for tests.

- `build_tiny_wan22_a14b(path)`: Wan2.2 T2V-A14B style: two experts (`transformer` for high noise,
  `transformer_2` for low noise) and `boundary_ratio` in model_index.json, the Wan2.1 VAE.
- `build_tiny_wan22_ti2v(path)`: Wan2.2 TI2V-5B style, text only: `expand_timesteps=True`, a
  48-channel transformer and the Wan2.2 VAE (residual blocks, patch size 2, 16x spatial).
- `build_tiny_fastwan(path)`: FastWan2.1 T2V style: a Wan2.1 pipeline whose model_index.json names
  `WanDMDPipeline` (as FastVideo's checkpoints do) and whose transformer carries a VSA
  `to_gate_compress` projection that dense-attention inference drops.
- `build_tiny_fastwan22_ti2v(path)`: FastWan2.2-TI2V-5B style: the TI2V layout naming `WanDMDPipeline`.

Everything reuses the tokenizer / UMT5 / transformer sizes of `tests/checkpoints.py`; all
deterministic, seconds to build, well under 1 MB.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from checkpoints import TINY_UMT5, TINY_VOCAB, TINY_WAN_TRANSFORMER, TINY_WAN_VAE, WAN_SCHEDULER, _build_tokenizer

# Wan2.2 A14B: high-noise expert for t >= boundary_ratio * 1000 (as Wan-AI's model_index.json).
A14B_BOUNDARY_RATIO = 0.875

# Wan2.2 VAE at small widths: 48 latent channels, input/output patchified 2x2 (3 * 4 = 12 channels),
# three 2x downsamples (two of them temporal) -> 8x, times the patch -> 16x spatial, 4x temporal.
TINY_WAN22_VAE = dict(
    base_dim=8,
    decoder_base_dim=8,
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
)

TI2V_SCHEDULER = dict(WAN_SCHEDULER, flow_shift=5.0)  # Wan2.2 TI2V-5B ships flow_shift 5.0


def _latent_stats(z_dim: int) -> tuple[list[float], list[float]]:
    g = torch.Generator().manual_seed(48)
    mean = (torch.randn(z_dim, generator=g) * 0.2).tolist()
    std = (0.5 + torch.rand(z_dim, generator=g)).tolist()
    return [round(v, 4) for v in mean], [round(v, 4) for v in std]


def _text_encoder():
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    return UMT5EncoderModel(UMT5Config(vocab_size=len(TINY_VOCAB), **TINY_UMT5)).eval()


def _transformer(seed: int, **overrides):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(**dict(TINY_WAN_TRANSFORMER, **overrides))


def build_tiny_wan22_a14b(path: str | Path) -> Path:
    """Two-expert Wan2.2 T2V pipeline (transformer = high noise, transformer_2 = low noise)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    path = Path(path)
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**TINY_WAN_VAE)
    pipe = WanPipeline(
        tokenizer=_build_tokenizer(),
        text_encoder=_text_encoder(),
        vae=vae,
        scheduler=UniPCMultistepScheduler(**WAN_SCHEDULER),
        transformer=_transformer(1),
        transformer_2=_transformer(2),
        boundary_ratio=A14B_BOUNDARY_RATIO,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_wan22_ti2v(path: str | Path) -> Path:
    """Wan2.2 TI2V-5B-style pipeline: expand_timesteps, 48-channel latents, Wan2.2 VAE."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    path = Path(path)
    mean, std = _latent_stats(TINY_WAN22_VAE["z_dim"])
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**TINY_WAN22_VAE, latents_mean=mean, latents_std=std)
    pipe = WanPipeline(
        tokenizer=_build_tokenizer(),
        text_encoder=_text_encoder(),
        vae=vae,
        scheduler=UniPCMultistepScheduler(**TI2V_SCHEDULER),
        transformer=_transformer(3, in_channels=48, out_channels=48),
        expand_timesteps=True,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_fastwan(path: str | Path) -> Path:
    """FastWan2.1-style checkpoint: WanDMDPipeline in model_index.json, base UniPC scheduler config,
    and a VSA `to_gate_compress` linear per block in the transformer's safetensors."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from safetensors.torch import load_file, save_file

    path = Path(path)
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**TINY_WAN_VAE)
    pipe = WanPipeline(
        tokenizer=_build_tokenizer(),
        text_encoder=_text_encoder(),
        vae=vae,
        scheduler=UniPCMultistepScheduler(**WAN_SCHEDULER),
        transformer=_transformer(4),
    )
    pipe.save_pretrained(path, safe_serialization=True)

    index_file = path / "model_index.json"
    index = json.loads(index_file.read_text())
    index["_class_name"] = "WanDMDPipeline"
    index_file.write_text(json.dumps(index, indent=2))

    weights = path / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    dim = TINY_WAN_TRANSFORMER["num_attention_heads"] * TINY_WAN_TRANSFORMER["attention_head_dim"]
    g = torch.Generator().manual_seed(5)
    for i in range(TINY_WAN_TRANSFORMER["num_layers"]):
        state[f"blocks.{i}.attn1.to_gate_compress.weight"] = torch.randn(dim, dim, generator=g) * 0.02
        state[f"blocks.{i}.attn1.to_gate_compress.bias"] = torch.zeros(dim)
    save_file(state, weights, metadata={"format": "pt"})
    return path


def build_tiny_fastwan22_ti2v(path: str | Path) -> Path:
    """FastWan2.2-TI2V-5B-style checkpoint: the TI2V layout above with WanDMDPipeline in model_index.json."""
    path = build_tiny_wan22_ti2v(path)
    index_file = path / "model_index.json"
    index = json.loads(index_file.read_text())
    index["_class_name"] = "WanDMDPipeline"
    index_file.write_text(json.dumps(index, indent=2))
    return path


BUILDERS = {"wan22-a14b": build_tiny_wan22_a14b, "wan22-ti2v": build_tiny_wan22_ti2v, "fastwan": build_tiny_fastwan,
            "fastwan22-ti2v": build_tiny_fastwan22_ti2v}

if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3 or sys.argv[1] not in BUILDERS:
        sys.exit(f"usage: python tests/tiny_wan22.py {{{','.join(BUILDERS)}}} OUT_DIR")
    print(BUILDERS[sys.argv[1]](sys.argv[2]))
