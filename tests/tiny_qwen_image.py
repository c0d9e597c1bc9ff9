"""Tiny random Qwen-Image / Qwen-Image-Edit checkpoints in diffusers layout (no hub downloads).

`build_tiny_qwen_image(path)` writes a folder `diffusers.QwenImagePipeline.from_pretrained` loads;
`build_tiny_qwen_image_edit(path)` one for `QwenImageEditPipeline` (adds a Qwen2-VL processor;
load it with `load_reference_processor`, see there).
Both hold a 2-layer MMDiT, a minimal AutoencoderKLQwenImage with the real factors (8x spatial,
16 latent channels), a 2-layer Qwen2.5-VL (text + vision tower), a word-level tokenizer with
Qwen's chat special tokens, and Qwen-Image's scheduler config. Deterministic; KBs on disk.

The tokenizer splits words, punctuation and newlines into separate tokens, which makes Qwen's
template prefixes exactly as long as with the real BPE tokenizer (34 tokens for Qwen-Image), so
the reference's `prompt_template_encode_start_idx` drops just the template, as with real weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import TINY_VOCAB  # noqa: E402  (the shared small English vocabulary)

TINY_QWEN_TRANSFORMER = dict(
    patch_size=2,
    in_channels=64,  # 16 latent channels x 2 x 2
    out_channels=16,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,  # = the text encoder's hidden size
    axes_dims_rope=(4, 6, 6),  # sums to the head dim
)

TINY_QWEN_VAE = dict(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])

# Qwen/Qwen-Image scheduler/scheduler_config.json.
QWEN_IMAGE_SCHEDULER = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    invert_sigmas=False,
    max_image_seq_len=8192,
    max_shift=0.9,
    num_train_timesteps=1000,
    shift=1.0,
    shift_terminal=0.02,
    stochastic_sampling=False,
    time_shift_type="exponential",
    use_beta_sigmas=False,
    use_dynamic_shifting=True,
    use_exponential_sigmas=False,
    use_karras_sigmas=False,
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
_TEMPLATE_WORDS = """
system user assistant Describe describe the image by detailing color shape size texture quantity text spatial
relationships objects background key features input then explain how user's instruction should alter modify
Generate new that meets requirements while maintaining consistency original where appropriate A The Make make
turn Turn into change Change add Add remove Remove
""".split()
_PUNCT = list(".,!?;:'\"-()") + ["\n", "<unk>"]
QWEN_VOCAB = SPECIAL_TOKENS + list(dict.fromkeys(w for w in TINY_VOCAB + _TEMPLATE_WORDS + _PUNCT if w not in SPECIAL_TOKENS))


def _id(token: str) -> int:
    return QWEN_VOCAB.index(token)


def build_tokenizer():
    """Word-level tokenizer: words, each punctuation run and each newline are tokens; spaces vanish."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(QWEN_VOCAB)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\w']+|[^\w\s]|\n"), behavior="removed", invert=True)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        model_max_length=32768,
        padding_side="right",
    )


def build_text_encoder():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(QWEN_VOCAB),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[2, 3, 3]),
            bos_token_id=_id("<|endoftext|>"),
            eos_token_id=_id("<|im_end|>"),
            pad_token_id=_id("<|endoftext|>"),
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            out_hidden_size=32,
            fullatt_block_indexes=[1],
        ),
        image_token_id=_id("<|image_pad|>"),
        video_token_id=_id("<|video_pad|>"),
        vision_start_token_id=_id("<|vision_start|>"),
        vision_end_token_id=_id("<|vision_end|>"),
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():  # the default init leaves tiny models nearly constant; widen it
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn_like(p) * 0.3)
    return model


def build_image_processor():
    """Qwen2-VL image processor capped at 3x3 merged image tokens (real checkpoints: up to 16384)."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": 28 * 28, "longest_edge": 28 * 28 * 9}, patch_size=14, merge_size=2, temporal_patch_size=2
    )


def qwen2vl_processor(image_processor, tokenizer):
    """A transformers Qwen2VLProcessor over these parts.

    transformers 5 refuses to build one without a video processor, and its video processors need
    torchvision; where that fails (torchvision absent) the processor is assembled without its
    constructor's class checks. Its __call__ (the code under test) is transformers' own either way.
    """
    from transformers import Qwen2VLProcessor

    try:
        return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)
    except (AttributeError, ImportError, TypeError, ValueError):
        proc = object.__new__(Qwen2VLProcessor)
        proc.chat_template = None
        proc.image_processor, proc.tokenizer, proc.video_processor = image_processor, tokenizer, None
        proc.image_token, proc.video_token = "<|image_pad|>", "<|video_pad|>"
        proc.image_token_id = tokenizer.convert_tokens_to_ids(proc.image_token)
        proc.video_token_id = tokenizer.convert_tokens_to_ids(proc.video_token)
        return proc


def load_reference_processor(path: str | Path):
    """The processor of a checkpoint written by build_tiny_qwen_image_edit, for diffusers' reference pipeline."""
    from transformers import AutoImageProcessor, AutoTokenizer

    folder = Path(path) / "processor"
    return qwen2vl_processor(AutoImageProcessor.from_pretrained(folder), AutoTokenizer.from_pretrained(folder))


def _components():
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(**TINY_QWEN_TRANSFORMER).eval()
    with torch.no_grad():  # zero-initialised output layers would make a flat image
        for p in transformer.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(**TINY_QWEN_VAE).eval()
    return dict(
        transformer=transformer,
        vae=vae,
        text_encoder=build_text_encoder(),
        tokenizer=build_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER),
    )


def build_tiny_qwen_image(path: str | Path) -> Path:
    from diffusers import QwenImagePipeline

    path = Path(path)
    QwenImagePipeline(**_components()).save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_qwen_image_edit(path: str | Path) -> Path:
    """Like Qwen/Qwen-Image-Edit: the pipeline plus processor/ (tokenizer files + preprocessor_config.json),
    written by hand because a Qwen2VLProcessor cannot always be built here (see qwen2vl_processor)."""
    import json

    from diffusers import QwenImageEditPipeline

    path = Path(path)
    parts = _components()
    QwenImageEditPipeline(processor=None, **parts).save_pretrained(path, safe_serialization=True)
    folder = path / "processor"
    parts["tokenizer"].save_pretrained(folder)
    build_image_processor().save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}, indent=2))
    index = json.loads((path / "model_index.json").read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    (path / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return path


if __name__ == "__main__":
    builders = {"qwen-image": build_tiny_qwen_image, "qwen-image-edit": build_tiny_qwen_image_edit}
    if len(sys.argv) != 3 or sys.argv[1] not in builders:
        sys.exit(f"usage: python tests/tiny_qwen_image.py {{{','.join(builders)}}} OUT_DIR")
    print(builders[sys.argv[1]](sys.argv[2]))
