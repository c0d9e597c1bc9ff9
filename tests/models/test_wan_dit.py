"""Our WanTransformer against diffusers' WanTransformer3DModel on the tiny random checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel
from safetensors.torch import load_file

from diffserve.worker.models.wan import KEEP_IN_FP32, WanConfig, WanTransformer
from tests.fixtures.tiny.wan import TINY_WAN_TRANSFORMER, build_tiny_wan

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("tiny_wan"))


@pytest.fixture(scope="module")
def ours(ckpt):
    return WanTransformer.from_pretrained(ckpt / "transformer", torch.float32, "cpu")


@pytest.fixture(scope="module")
def ref(ckpt):
    return WanTransformer3DModel.from_pretrained(ckpt / "transformer", torch_dtype=torch.float32).eval()


def _inputs(batch: int, seed: int = 0, frames: int = 2, size: int = 8, text_len: int = 16):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 16, frames, size, size, generator=g)  # (B, C, F, H, W)
    context = torch.randn(batch, text_len, TINY_WAN_TRANSFORMER["text_dim"], generator=g)  # (B, S, text_dim)
    return latents, context


def _ref(ref, latents, timestep, context, **kw):
    with torch.no_grad():
        return ref(latents, timestep, context, return_dict=False, **kw)[0]


def test_loads_strict(ckpt, ours, ref):
    state_dict = load_file(ckpt / "transformer" / "diffusion_pytorch_model.safetensors")
    fresh = WanTransformer(WanConfig.from_dict(json.loads((ckpt / "transformer" / "config.json").read_text())))
    result = fresh.load_state_dict(state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    ours_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    ref_shapes = {k: v.shape for k, v in ref.state_dict().items()}
    assert ours_shapes == ref_shapes
    assert all(p.device.type == "cpu" for p in ours.parameters())
    assert ours.rope.freqs_cos.device.type == "cpu" and ours.rope.freqs_cos.shape == ref.rope.freqs_cos.shape
    torch.testing.assert_close(ours.rope.freqs_cos, ref.rope.freqs_cos, atol=0, rtol=0)
    torch.testing.assert_close(ours.rope.freqs_sin, ref.rope.freqs_sin, atol=0, rtol=0)


def test_loads_sharded_checkpoint(tmp_path, ours, ref):
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("diffusion_pytorch_model-*.safetensors"))) > 1
    sharded = WanTransformer.from_pretrained(tmp_path, torch.float32, "cpu")
    expected = ours.state_dict()
    for name, tensor in sharded.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], atol=0, rtol=0)


def test_config_ignores_unknown_keys():
    raw = {"_class_name": "WanTransformer3DModel", "window_size": [-1, -1], "patch_size": [1, 2, 2]}
    cfg = WanConfig.from_dict(raw)
    assert cfg.patch_size == (1, 2, 2) and cfg.num_layers == 40


def test_batch_same_timestep(ours, ref):
    latents, context = _inputs(2)
    t = torch.tensor([700.0, 700.0])
    with torch.no_grad():
        out = ours(latents, t, context)
    assert out.shape == latents.shape
    torch.testing.assert_close(out, _ref(ref, latents, t, context), **TOL)


def test_per_sample_timesteps_match_single_runs(ours, ref):
    latents, context = _inputs(3, seed=1)
    t = torch.tensor([999.0, 437.25, 3.0])
    with torch.no_grad():
        out = ours(latents, t, context)
    for i in range(3):
        alone = _ref(ref, latents[i : i + 1], t[i : i + 1], context[i : i + 1])
        torch.testing.assert_close(out[i : i + 1], alone, **TOL)


def test_per_token_timesteps(ours, ref):
    # Wan2.2 TI2V style: timestep (B, L), one per video token.
    latents, context = _inputs(2, seed=2, frames=3, size=6)
    num_tokens = 3 * 3 * 3
    t = torch.rand(2, num_tokens, generator=torch.Generator().manual_seed(3)) * 1000
    with torch.no_grad():
        out = ours(latents, t, context)
    torch.testing.assert_close(out, _ref(ref, latents, t, context), **TOL)


def test_bf16_load_keeps_fp32_modules_like_diffusers(ckpt):
    ours = WanTransformer.from_pretrained(ckpt / "transformer", torch.bfloat16, "cpu")
    ref = WanTransformer3DModel.from_pretrained(ckpt / "transformer", torch_dtype=torch.bfloat16).eval()
    ref_dtypes = {k: v.dtype for k, v in ref.named_parameters()}
    assert {k: v.dtype for k, v in ours.named_parameters()} == ref_dtypes
    assert any(v == torch.float32 for v in ref_dtypes.values())
    assert ours.blocks[0].scale_shift_table.dtype == torch.float32 and "scale_shift_table" in KEEP_IN_FP32

    latents, context = _inputs(2, seed=4)
    latents, context = latents.bfloat16(), context.bfloat16()
    t = torch.tensor([900.0, 20.0])
    with torch.no_grad():
        out = ours(latents, t, context)
    expected = _ref(ref, latents, t, context)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("pos_embed", [False, True], ids=["i2v", "flf2v"])
def test_i2v_image_path(tmp_path, pos_embed):
    # diffusers splits the text/image context assuming exactly 512 text tokens.
    image_dim, image_len = 24, 5
    extra = dict(image_dim=image_dim, added_kv_proj_dim=TINY_WAN_TRANSFORMER["num_attention_heads"] * 16)
    if pos_embed:
        extra["pos_embed_seq_len"] = 2 * image_len
    torch.manual_seed(0)
    ref = WanTransformer3DModel(**TINY_WAN_TRANSFORMER, **extra).eval()
    with torch.no_grad():  # pos_embed starts at zero; make it matter
        for p in ref.parameters():
            if p.abs().sum() == 0:
                p.normal_()
    ref.save_pretrained(tmp_path)
    ours = WanTransformer.from_pretrained(tmp_path, torch.float32, "cpu")

    latents, context = _inputs(2, seed=5, text_len=512)
    image_batch = 4 if pos_embed else 2  # FLF2V: first- and last-frame features per sample
    image = torch.randn(image_batch, image_len, image_dim, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([800.0, 100.0])
    with torch.no_grad():
        out = ours(latents, t, context, context_image=image)
    expected = _ref(ref, latents, t, context, encoder_hidden_states_image=image)
    torch.testing.assert_close(out, expected, **TOL)


def test_tiny_pipeline_runs(ckpt):
    pipe = WanPipeline.from_pretrained(ckpt)
    pipe.set_progress_bar_config(disable=True)
    video = pipe(
        "a cat baking a cake in a cozy kitchen",
        negative_prompt="blurry, low quality",
        num_frames=5,
        height=32,
        width=32,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    ).frames
    assert video.shape == (1, 5, 32, 32, 3)


def test_packed_requests_of_different_sizes_each_equal_their_own_forward(ours):
    """Mixed-shape batching: three requests of different frame counts and sizes (and timesteps and
    prompts) in one packed forward; each output equals the request's forward alone."""
    g = torch.Generator().manual_seed(7)
    shapes = [(16, 1, 8, 8), (16, 3, 6, 10), (16, 2, 12, 8)]
    latents = [torch.randn(*shape, generator=g) for shape in shapes]
    context = torch.randn(3, 16, TINY_WAN_TRANSFORMER["text_dim"], generator=g)
    t = torch.tensor([999.0, 500.0, 12.5])
    with torch.no_grad():
        packed = ours.forward_packed(latents, t, context)
        for i, lat in enumerate(latents):
            alone = ours(lat[None], t[i:i + 1], context[i:i + 1])[0]
            assert packed[i].shape == lat.shape
            torch.testing.assert_close(packed[i], alone, **TOL)
        # One segment alone is the plain forward too.
        torch.testing.assert_close(ours.forward_packed(latents[:1], t[:1], context[:1])[0], ours(latents[0][None], t[:1], context[:1])[0], **TOL)


def test_packed_forward_keeps_modulation_per_request_and_attends_once_per_layer(ours, monkeypatch):
    """The packed forward's cost is the unpacked forwards' (issue 15, item 4): each modulation stays one
    row per request, (N, 1, D), read per token through the segments' index (no (1, sum L, 6, D) copy),
    and each attention (self and cross) is one varlen call over every request, not one per request."""
    from diffserve.kernels import norm
    from diffserve.worker.models import layers, wan

    shapes = [(16, 1, 8, 8), (16, 3, 6, 10), (16, 2, 12, 8)]
    tokens = [f * (h // 2) * (w // 2) for _, f, h, w in shapes]
    g = torch.Generator().manual_seed(7)
    latents = [torch.randn(*shape, generator=g) for shape in shapes]
    context = torch.randn(3, 16, TINY_WAN_TRANSFORMER["text_dim"], generator=g)
    seen = {"norm": 0, "residual": 0, "varlen": []}
    varlen = wan.attention_varlen

    def per_request(t, index):
        assert t.shape[:2] == (3, 1) and index is not None and index.tolist() == [i for i, n in enumerate(tokens) for _ in range(n)]

    def layer_norm(x, weight=None, bias=None, eps=1e-5, shift=None, scale=None, index=None):
        if scale is not None:
            per_request(scale, index)
            seen["norm"] += 1
        return norm.layer_norm(x, weight, bias, eps, shift, scale, index)

    def gated_residual(x, y, gate, index=None):
        per_request(gate, index)
        seen["residual"] += 1
        return layers.gated_residual(x, y, gate, index)

    def attention_varlen(q, k, v, q_lens, k_lens):
        seen["varlen"].append((q_lens.lengths, k_lens.lengths))
        return varlen(q, k, v, q_lens, k_lens)

    monkeypatch.setattr(layers, "layer_norm", layer_norm)
    monkeypatch.setattr(wan, "gated_residual", gated_residual)
    monkeypatch.setattr(wan, "attention_varlen", attention_varlen)
    with torch.no_grad():
        ours.forward_packed(latents, torch.tensor([999.0, 500.0, 12.5]), context)
    blocks = len(ours.blocks)
    assert seen["norm"] == 2 * blocks + 1 and seen["residual"] == 2 * blocks  # norm1, norm3 per block + norm_out
    assert seen["varlen"] == [(tuple(tokens), tuple(tokens)), (tuple(tokens), (16, 16, 16))] * blocks
