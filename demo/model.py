"""The demo model's sizes and how it is written: the Wan2.1 architecture at a tiny size, in the
diffusers layout (WanTransformer3DModel, UMT5 encoder with a word-level tokenizer over the
caption vocabulary, AutoencoderKLWan, UniPC flow scheduler), so diffusers' WanPipeline loads it
and diffserve serves it through the path real checkpoints take."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffserve.demo.data import vocabulary

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # T5's ids 0, 1, 2

# 4x spatial compression (a 16x16 latent for 64x64): at Wan's 8x a 9-pixel star spans two latent cells and its
# shape does not survive reconstruction (measured: shapes read back right 15-50 % of the time vs 100 % colours).
VAE = dict(base_dim=16, decoder_base_dim=16, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True],
           scale_factor_spatial=4, scale_factor_temporal=4)
TEXT = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
            relative_attention_max_distance=32, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", dropout_rate=0.0,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
                   text_dim=64, freq_dim=64, ffn_dim=512, num_layers=6, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                   eps=1e-6, rope_max_seq_len=1024)
SCHEDULER = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000)
MAX_TEXT_TOKENS = 512  # what WanPipeline pads the prompt embeddings to (zeros), in training too
# The card's defaults (worker/loading.card_defaults reads them from diffserve.json): the size it was trained at.
CARD_DEFAULTS = dict(height=64, width=64, num_frames=1, num_inference_steps=20, guidance_scale=5.0, fps=8)


def tokens() -> list[str]:
    return SPECIAL_TOKENS + vocabulary()


def tokenizer():
    """Word-level, lowercasing, </s> appended as T5 does, padded with <pad> (id 0)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(tokens())}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=MAX_TEXT_TOKENS, padding_side="right")


def new_modules(seed: int = 0, **vae_overrides):
    """(vae, text_encoder, transformer), freshly initialised from `seed` (VAE sizes overridable)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**{**VAE, **vae_overrides})
    torch.manual_seed(seed + 1)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokens()), **TEXT))
    torch.manual_seed(seed + 2)
    transformer = WanTransformer3DModel(**TRANSFORMER)
    return vae, text_encoder, transformer


def save(path: str | Path, vae, text_encoder, transformer) -> Path:
    """Writes the pipeline folder (safetensors)."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    path = Path(path)
    pipe = WanPipeline(tokenizer=tokenizer(), text_encoder=text_encoder.eval(), vae=vae.eval(),
                       scheduler=UniPCMultistepScheduler(**SCHEDULER), transformer=transformer.eval())
    pipe.save_pretrained(path, safe_serialization=True)
    (path / "diffserve.json").write_text(json.dumps({"defaults": CARD_DEFAULTS}, indent=1) + "\n")
    return path
