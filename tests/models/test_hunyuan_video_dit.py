"""Our HunyuanVideoTransformer against diffusers' HunyuanVideoTransformer3DModel on the tiny checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel
from safetensors.torch import load_file

from diffserve.worker.models.hunyuan_video import HunyuanVideoConfig, HunyuanVideoTransformer

from tests.fixtures.tiny.hunyuan_video import TINY_HUNYUAN_TRANSFORMER, build_tiny_hunyuan_video

TOL = dict(atol=1e-5, rtol=1e-5)
C = TINY_HUNYUAN_TRANSFORMER["in_channels"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_hunyuan_video(tmp_path_factory.mktemp("tiny_hunyuan"))


@pytest.fixture(scope="module")
def ours(ckpt):
    return HunyuanVideoTransformer.from_pretrained(ckpt / "transformer", torch.float32, "cpu")


@pytest.fixture(scope="module")
def ref(ckpt):
    return HunyuanVideoTransformer3DModel.from_pretrained(ckpt / "transformer", torch_dtype=torch.float32).eval()


def _inputs(batch: int, seed: int = 0, frames: int = 2, size: int = 8, text_len: int = 12):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, C, frames, size, size, generator=g)
    text = torch.randn(batch, text_len, TINY_HUNYUAN_TRANSFORMER["text_embed_dim"], generator=g)
    pooled = torch.randn(batch, TINY_HUNYUAN_TRANSFORMER["pooled_projection_dim"], generator=g)
    return latents, text, pooled


def _mask(lengths, text_len):
    return (torch.arange(text_len)[None, :] < torch.tensor(lengths)[:, None]).float()  # right padding


def _ref(ref, latents, t, text, lengths, pooled, guidance):
    """diffusers takes the guidance scale in its dtype x 1000 (as its pipeline makes it); ours takes it as it is."""
    with torch.no_grad():
        return ref(latents, t, text, _mask(lengths, text.shape[1]), pooled, guidance.to(ref.dtype) * 1000.0, return_dict=False)[0]


def test_loads_strict(ckpt, ours, ref):
    state_dict = load_file(ckpt / "transformer" / "diffusion_pytorch_model.safetensors")
    fresh = HunyuanVideoTransformer(HunyuanVideoConfig.from_dict(json.loads((ckpt / "transformer" / "config.json").read_text())))
    result = fresh.load_state_dict(state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_full_length_text_matches(ours, ref):
    latents, text, pooled = _inputs(2)
    t, g = torch.tensor([700.0, 700.0]), torch.tensor([6.0, 6.0])
    with torch.no_grad():
        out = ours(latents, t, text, [12, 12], pooled, g)
    assert out.shape == latents.shape
    torch.testing.assert_close(out, _ref(ref, latents, t, text, [12, 12], pooled, g), **TOL)


def test_padded_text_per_sample_timesteps_match_single_runs(ours, ref):
    """Batch with different timesteps, guidance and text lengths: each row equals the reference run
    alone with the reference's own (padded + masked) text, and our solo run on its valid tokens only."""
    latents, text, pooled = _inputs(3, seed=1, frames=3, size=6)
    lengths = [12, 5, 1]
    t = torch.tensor([999.0, 437.25, 3.0])
    g = torch.tensor([6.0, 1.0, 3.5])
    with torch.no_grad():
        out = ours(latents, t, text, lengths, pooled, g)
    for i, n in enumerate(lengths):
        rows = slice(i, i + 1)
        alone_ref = _ref(ref, latents[rows], t[rows], text[rows], [n], pooled[rows], g[rows])
        torch.testing.assert_close(out[rows], alone_ref, **TOL)
        with torch.no_grad():
            alone_trimmed = ours(latents[rows], t[rows], text[rows, :n], [n], pooled[rows], g[rows])
        torch.testing.assert_close(out[rows], alone_trimmed, **TOL)
    # The whole padded batch also equals the reference's batched call.
    torch.testing.assert_close(out, _ref(ref, latents, t, text, lengths, pooled, g), **TOL)


def test_padding_values_do_not_leak(ours):
    latents, text, pooled = _inputs(1, seed=2)
    noisy = text.clone()
    noisy[:, 4:] = torch.randn_like(noisy[:, 4:]) * 10
    t, g = torch.tensor([500.0]), torch.tensor([6.0])
    with torch.no_grad():
        torch.testing.assert_close(ours(latents, t, text, [4], pooled, g), ours(latents, t, noisy, [4], pooled, g), **TOL)


def test_bf16_close_to_diffusers(ckpt):
    ours = HunyuanVideoTransformer.from_pretrained(ckpt / "transformer", torch.bfloat16, "cpu")
    ref = HunyuanVideoTransformer3DModel.from_pretrained(ckpt / "transformer", torch_dtype=torch.bfloat16).eval()
    latents, text, pooled = (x.bfloat16() for x in _inputs(2, seed=4))
    t = torch.tensor([900.0, 20.0])
    g = torch.tensor([6.0, 6.0])
    with torch.no_grad():
        out = ours(latents, t, text, [12, 7], pooled, g)
    expected = _ref(ref, latents, t, text, [12, 7], pooled, g)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, atol=3e-2, rtol=3e-2)
