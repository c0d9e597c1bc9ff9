"""A tiny random FLUX.1-dev pipeline in diffusers layout, built locally for tests (no hub downloads).

`build_tiny_flux(path)` writes a folder that `diffusers.FluxPipeline.from_pretrained(path)` loads:
a guidance-distilled transformer with 2 double-stream and 2 single-stream blocks, a minimal
AutoencoderKL with the real 8x compression and 16 latent channels (and FLUX's scaling/shift
factors), a 2-layer CLIP text model (pooled prompt), a 2-layer T5 encoder (sequence prompt), two
word-level tokenizers (CLIP-style with start/end tokens and 77 positions; T5-style appending
</s>) and FLUX.1-dev's scheduler config. Deterministic (seeded), builds in about a second.

    python tests/tiny_flux.py OUT_DIR
"""

from __future__ import annotations

from pathlib import Path

import torch

try:  # `python -m pytest` from the repo root puts the root on sys.path
    from tests.checkpoints import TINY_VOCAB
except ImportError:  # plain `pytest` or `python tests/tiny_flux.py`: tests/ itself is on sys.path
    from checkpoints import TINY_VOCAB

# Transformer: 2 heads x 16 head dim = width 32; RoPE splits the head dim into 4/6/6.
TINY_FLUX_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,  # 16 VAE channels x 2x2 packing
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,  # = T5 d_model
    pooled_projection_dim=32,  # = CLIP hidden size
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)

# VAE: 4 levels -> 3 downsamples (x8) as FLUX's, 16 latent channels, FLUX.1's scaling/shift factors.
TINY_FLUX_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[8, 8, 8, 8],
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=4,
    sample_size=64,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)

# Scheduler as in black-forest-labs/FLUX.1-dev/scheduler/scheduler_config.json.
FLUX_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)

CLIP_SPECIAL = ["<|startoftext|>", "<|endoftext|>", "<unk>"]  # ids 0, 1, 2
T5_SPECIAL = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2
CLIP_LENGTH = 77


def _vocab(special: list[str]) -> dict[str, int]:
    words = special + [w for w in TINY_VOCAB if w not in special and w not in ("<pad>", "</s>", "<unk>")]
    return {w: i for i, w in enumerate(words)}


def _word_tokenizer(vocab: dict[str, int], template: str, specials: list[str], **kwargs):
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(s, vocab[s]) for s in specials])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", padding_side="right", **kwargs)


def build_clip_tokenizer():
    """CLIP-like: <|startoftext|> words <|endoftext|>, padded with <|endoftext|> to 77 positions."""
    vocab = _vocab(CLIP_SPECIAL)
    return _word_tokenizer(
        vocab, "<|startoftext|> $A <|endoftext|>", ["<|startoftext|>", "<|endoftext|>"],
        bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=CLIP_LENGTH,
    )


def build_t5_tokenizer():
    """T5-like: words </s>, padded with <pad> (id 0)."""
    vocab = _vocab(T5_SPECIAL)
    return _word_tokenizer(vocab, "$A </s>", ["</s>"], eos_token="</s>", pad_token="<pad>", model_max_length=512)


def build_tiny_flux(path: str | Path) -> Path:
    """Write a tiny random FLUX.1-dev pipeline (diffusers layout) to `path` and return it."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    path = Path(path)
    clip_tok, t5_tok = build_clip_tokenizer(), build_t5_tokenizer()

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER)
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_FLUX_VAE)
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=CLIP_LENGTH, projection_dim=32, hidden_act="quick_gelu",
        bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id,
    )).eval()
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        dense_act_fn="gelu_new", dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)

    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok,
        transformer=transformer,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python tests/tiny_flux.py OUT_DIR")
    print(build_tiny_flux(sys.argv[1]))
