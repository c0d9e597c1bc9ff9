"""Tiny random checkpoints in diffusers layout, built locally for tests (no hub downloads).

`build_tiny_wan(path)` writes a complete Wan2.1 T2V pipeline folder that
`diffusers.WanPipeline.from_pretrained(path)` loads: a 2-layer transformer, a minimal VAE
with the real compression factors (8x spatial, 4x temporal, 16 latent channels), a 2-layer
UMT5 encoder, a word-level tokenizer and the scheduler Wan2.1-T2V-1.3B ships. Deterministic
(seeded), builds in well under a second and is a few hundred KB on disk.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Transformer: 2 heads x 16 head dim = width 32; RoPE splits the head dim into t/h/w = 8/4/4.
TINY_WAN_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)

# VAE: 4 resolution levels -> 3 spatial downsamples (x8), two of them temporal (x4), as the real
# Wan VAE. z_dim=16 keeps the real 16-entry latents_mean/latents_std defaults.
TINY_WAN_VAE = dict(
    base_dim=3,
    z_dim=16,
    dim_mult=[1, 1, 1, 1],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
)

# Text encoder: d_model must equal the transformer's text_dim.
TINY_UMT5 = dict(
    d_model=32,
    d_kv=16,
    d_ff=64,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=2,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=32,
    feed_forward_proj="gated-gelu",
    dense_act_fn="gelu_new",
    dropout_rate=0.0,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)

# Scheduler as in Wan-AI/Wan2.1-T2V-1.3B-Diffusers/scheduler/scheduler_config.json.
WAN_SCHEDULER = dict(
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    flow_shift=3.0,
    num_train_timesteps=1000,
)

# Tokenizer: T5-style ids for the special tokens, then a small word-level vocabulary.
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2
_WORDS = """
a an the and or of in on at to with from by for over under into through near behind above
is are was be being has have it its this that these those there here very slowly quickly
cat cats dog dogs bird birds fish horse cow person people man woman child children robot car
cars train boat ship plane tree trees flower flowers grass forest mountain mountains river lake
sea ocean beach sky cloud clouds sun moon star stars rain snow wind fire water city street road
house room kitchen window door table chair book cake food bread cup light shadow night day
morning evening sunset sunrise summer winter spring autumn red orange yellow green blue purple
pink white black gray brown golden silver bright dark small big large tiny huge old young new
happy sad beautiful cute calm wild soft warm cold wet cozy colorful cinematic realistic
detailed blurry static still video image photo painting style quality low high best worst
running walking flying swimming jumping dancing sitting standing playing eating drinking
reading baking cooking looking smiling laughing sleeping moving falling rising shining glowing
camera shot view close up wide angle slow motion scene background foreground frame frames
ugly deformed overexposed subtitles jpeg compression artifacts extra fingers hands faces
""".split()
_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,!?;:'\"-()")
TINY_VOCAB = SPECIAL_TOKENS + list(dict.fromkeys(w for w in _WORDS + _CHARS if w not in SPECIAL_TOKENS))


def _build_tokenizer():
    """Lowercasing word-level tokenizer that appends </s> like T5 and pads with <pad> (id 0)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(TINY_VOCAB)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
        padding_side="right",
    )


def build_tiny_wan(path: str | Path) -> Path:
    """Write a tiny random Wan2.1 T2V pipeline (diffusers layout) to `path` and return it."""
    return build_wan(path)


def build_wan(
    path: str | Path,
    *,
    transformer: dict = TINY_WAN_TRANSFORMER,
    vae: dict = TINY_WAN_VAE,
    umt5: dict = TINY_UMT5,
    vocab_size: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random Wan2.1 T2V pipeline with these configs (default: the tiny one) to `path`.

    bench/end_to_end.py passes the full-size configs (Wan2.1-T2V-1.3B DiT, UMT5-XXL, the default
    AutoencoderKLWan) with device="cuda" and dtype=torch.bfloat16: modules are initialised on
    `device`; the text encoder is saved in `dtype`, the transformer and VAE in float32 (as the
    Wan2.1 diffusers checkpoints ship them). `vocab_size` (default: the tiny vocabulary's size)
    may exceed the tokenizer's vocabulary.
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    path = Path(path)
    tokenizer = _build_tokenizer()

    with torch.device(device):
        torch.manual_seed(0)
        transformer_model = WanTransformer3DModel(**transformer)
        torch.manual_seed(0)
        vae_model = AutoencoderKLWan(**vae)
        torch.manual_seed(0)
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=vocab_size or len(TINY_VOCAB), **umt5)).to(dtype).eval()
    scheduler = UniPCMultistepScheduler(**WAN_SCHEDULER)

    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.cpu(),  # saved from host memory
        vae=vae_model.cpu(),
        scheduler=scheduler,
        transformer=transformer_model.cpu(),
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


BUILDERS = {"wan": build_tiny_wan}

if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3 or sys.argv[1] not in BUILDERS:
        sys.exit(f"usage: python tests/checkpoints.py {{{','.join(BUILDERS)}}} OUT_DIR")
    print(BUILDERS[sys.argv[1]](sys.argv[2]))
