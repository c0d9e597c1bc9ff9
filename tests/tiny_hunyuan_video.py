"""A tiny random HunyuanVideo T2V pipeline in diffusers layout, built locally for tests.

`build_tiny_hunyuan_video(path)` writes a folder that `diffusers.HunyuanVideoPipeline.from_pretrained`
loads: a transformer with 2 dual-stream + 2 single-stream blocks and a 2-layer token refiner, a
minimal causal 3-D VAE with the real compression factors (8x spatial, 4x temporal), a 4-layer
LlamaModel (the reference takes hidden_states[-3], i.e. the output of layer 2) with a word-level
tokenizer whose prompt-template prefix is exactly the reference's crop_start (95 tokens), a tiny
CLIPTextModel for the pooled embedding, and the scheduler HunyuanVideo ships (flow-match Euler,
shift 7). Deterministic, a second to build, well under a MB on disk.
"""

from __future__ import annotations

from pathlib import Path

import torch

try:  # `python -m pytest` from the repo root
    from tests.checkpoints import TINY_VOCAB
except ImportError:  # plain pytest: tests/ itself is on sys.path
    from checkpoints import TINY_VOCAB

# Transformer: 2 heads x 16 head dim = width 32; RoPE splits the head dim into t/h/w = 4/6/6.
TINY_HUNYUAN_TRANSFORMER = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=2,
    num_single_layers=2,
    num_refiner_layers=2,
    mlp_ratio=2.0,
    patch_size=2,
    patch_size_t=1,
    qk_norm="rms_norm",
    guidance_embeds=True,
    text_embed_dim=32,  # = the Llama hidden size
    pooled_projection_dim=24,  # = the CLIP hidden size
    rope_theta=256.0,
    rope_axes_dim=(4, 6, 6),
)

# VAE: 4 levels -> 3 spatial downsamples (x8), two temporal (x4), 4 latent channels.
TINY_HUNYUAN_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(8, 8, 16, 16),
    layers_per_block=1,
    norm_num_groups=4,
    temporal_compression_ratio=4,
    spatial_compression_ratio=8,
)

TINY_LLAMA = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
)

TINY_CLIP = dict(
    hidden_size=24,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    projection_dim=24,
)

# As hunyuanvideo-community/HunyuanVideo/scheduler/scheduler_config.json.
HUNYUAN_SCHEDULER = dict(shift=7.0, num_train_timesteps=1000)

LLAMA_SPECIALS = ["<pad>", "<unk>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "\n"]
CLIP_SPECIALS = ["<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"]


def _word_level(specials: list[str]):
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab = {t: i for i, t in enumerate(specials + [w for w in TINY_VOCAB if w not in specials and w not in ("<pad>", "</s>", "<unk>")])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    # Words, punctuation runs and each newline are tokens; other whitespace is dropped; one digit per token.
    # With this split the reference's template prefix is exactly 95 tokens, its crop_start.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n|\w+|[^\w\s]+"), "isolated"),
        pre_tokenizers.Split(Regex(r"[^\S\n]+"), "removed"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    return tok, vocab


def build_llama_tokenizer():
    """Word-level tokenizer with Llama-3 chat specials, padding right (valid tokens first, as the
    transformer's text mask assumes). It adds no BOS so that the template prefix is 95 tokens."""
    from transformers import PreTrainedTokenizerFast

    tok, _ = _word_level(LLAMA_SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>"], model_max_length=1024, padding_side="right",
    )


def build_clip_tokenizer():
    """Word-level tokenizer CLIP-style: <|startoftext|> ... <|endoftext|>, padded right to 77."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok, vocab = _word_level(CLIP_SPECIALS)
    sot, eot = "<|startoftext|>", "<|endoftext|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{sot} $A {eot}", pair=f"{sot} $A {eot} $B {eot}", special_tokens=[(sot, vocab[sot]), (eot, vocab[eot])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=sot, eos_token=eot, pad_token="<pad>", unk_token="<unk>", model_max_length=77,
        padding_side="right",
    )


def build_tiny_hunyuan_video(path: str | Path) -> Path:
    """Write a tiny random HunyuanVideo T2V pipeline (diffusers layout) to `path` and return it."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    path = Path(path)
    tokenizer, tokenizer_2 = build_llama_tokenizer(), build_clip_tokenizer()

    torch.manual_seed(0)
    transformer = HunyuanVideoTransformer3DModel(**TINY_HUNYUAN_TRANSFORMER)
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(**TINY_HUNYUAN_VAE)
    torch.manual_seed(0)
    llama_config = LlamaConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **TINY_LLAMA,
    )
    text_encoder = LlamaModel(llama_config).eval()
    torch.manual_seed(0)
    clip_config = CLIPTextConfig(
        vocab_size=len(tokenizer_2), pad_token_id=tokenizer_2.pad_token_id, bos_token_id=tokenizer_2.bos_token_id,
        eos_token_id=tokenizer_2.eos_token_id, **TINY_CLIP,
    )
    text_encoder_2 = CLIPTextModel(clip_config).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**HUNYUAN_SCHEDULER)

    pipe = HunyuanVideoPipeline(
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae, scheduler=scheduler,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


if __name__ == "__main__":
    import sys

    print(build_tiny_hunyuan_video(sys.argv[1]))
