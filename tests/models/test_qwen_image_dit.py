"""Our Qwen-Image DiT equals diffusers' QwenImageTransformer2DModel on random inputs (float32)."""

from __future__ import annotations

import pytest
import torch

from diffserve.worker.models.qwen_image import QwenImageTransformer
from tests.fixtures.tiny.qwen_image import TINY_QWEN_TRANSFORMER

ATOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    ref = QwenImageTransformer2DModel(**TINY_QWEN_TRANSFORMER).eval()
    # Random (not zero-initialised) weights everywhere, so every path matters.
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    path = tmp_path_factory.mktemp("qwen-dit")
    ref.save_pretrained(path, safe_serialization=True)
    ours = QwenImageTransformer.from_pretrained(path, torch.float32, "cpu")
    return ref, ours


def reference(ref, latents, t, text, mask, shapes):
    """diffusers takes the sampler's timestep / 1000 in the model dtype (as its pipeline passes it); ours takes it as it is."""
    with torch.no_grad():
        return ref(hidden_states=latents, timestep=t.to(latents.dtype) / 1000, encoder_hidden_states=text, encoder_hidden_states_mask=mask,
                   img_shapes=[shapes] * latents.shape[0], return_dict=False)[0]


def test_loads_every_parameter(models):
    ref, ours = models
    assert set(ours.state_dict()) == set(ref.state_dict())


@pytest.mark.parametrize("shapes", [[(1, 4, 6)], [(1, 4, 6), (1, 3, 5)]], ids=["t2i", "edit"])
def test_batch_with_padding_equals_each_row_alone(models, shapes):
    """Rows at different timesteps with different text lengths (padded + masked) equal their solo runs."""
    ref, ours = models
    torch.manual_seed(1)
    tokens = sum(f * h * w for f, h, w in shapes)
    lengths = [7, 3, 5]
    b, s = len(lengths), max(lengths)
    latents = torch.randn(b, tokens, TINY_QWEN_TRANSFORMER["in_channels"])
    t = torch.tensor([900.0, 250.0, 500.0])
    text = torch.randn(b, s, TINY_QWEN_TRANSFORMER["joint_attention_dim"])
    mask = torch.arange(s)[None, :] < torch.tensor(lengths)[:, None]  # (B, S)
    text = text * mask[..., None]

    with torch.no_grad():
        batched = ours(latents, t, text, mask, shapes)
    assert batched.shape == (b, tokens, 4 * TINY_QWEN_TRANSFORMER["out_channels"])
    for i, n in enumerate(lengths):
        alone = reference(ref, latents[i : i + 1], t[i : i + 1], text[i : i + 1, :n], None, shapes)
        torch.testing.assert_close(batched[i : i + 1], alone, atol=ATOL, rtol=0)
    # The padded batch through diffusers (with its mask) agrees too.
    torch.testing.assert_close(batched, reference(ref, latents, t, text, mask, shapes), atol=ATOL, rtol=0)


def test_unmasked_batch_matches(models):
    ref, ours = models
    torch.manual_seed(2)
    shapes = [(1, 6, 4)]
    latents = torch.randn(2, 24, TINY_QWEN_TRANSFORMER["in_channels"])
    t = torch.tensor([1000.0, 100.0])
    text = torch.randn(2, 9, TINY_QWEN_TRANSFORMER["joint_attention_dim"])
    with torch.no_grad():
        ours_out = ours(latents, t, text, None, shapes)
    torch.testing.assert_close(ours_out, reference(ref, latents, t, text, None, shapes), atol=ATOL, rtol=0)


def test_bf16_as_close_to_float32_as_diffusers(models, tmp_path):
    """In bf16 our forward stays as close to the float32 reference as diffusers' bf16 forward does
    (a bf16-rounded timestep frequency once put ours 40x further off)."""
    from diffusers import QwenImageTransformer2DModel

    ref, _ = models
    ref.save_pretrained(tmp_path, safe_serialization=True)
    g = torch.Generator().manual_seed(3)
    latents, text, t = torch.randn(1, 24, 64, generator=g), torch.randn(1, 7, 32, generator=g), torch.tensor([700.0])
    fp32 = reference(ref, latents, t, text, None, [(1, 4, 6)])
    ref_bf16 = QwenImageTransformer2DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()
    ours_bf16 = QwenImageTransformer.from_pretrained(tmp_path, torch.bfloat16, "cpu")
    theirs = reference(ref_bf16, latents.bfloat16(), t, text.bfloat16(), None, [(1, 4, 6)]).float()
    with torch.no_grad():
        ours = ours_bf16(latents.bfloat16(), t, text.bfloat16(), None, [(1, 4, 6)]).float()

    def err(x):
        return float((x - fp32).norm() / fp32.norm())

    assert err(ours) < 2 * err(theirs), (err(ours), err(theirs))


def test_packed_requests_of_different_sizes_each_equal_their_own_forward(models, monkeypatch):
    """Mixed-shape batching: a text-to-image request, an edit request (two images) and another size,
    with different prompt lengths and timesteps, in one packed forward; each equals its solo run.
    Every block attends in one varlen call over each request's unpadded [text, image]."""
    from diffserve.worker.models import qwen_image

    _, ours = models
    g = torch.Generator().manual_seed(3)
    shapes = [[(1, 4, 6)], [(1, 4, 6), (1, 3, 5)], [(1, 6, 2)]]
    lengths = [7, 3, 5]
    latents = [torch.randn(sum(f * h * w for f, h, w in s), TINY_QWEN_TRANSFORMER["in_channels"], generator=g) for s in shapes]
    texts = [torch.randn(n, TINY_QWEN_TRANSFORMER["joint_attention_dim"], generator=g) for n in lengths]
    t = torch.tensor([900.0, 250.0, 500.0])
    calls, varlen = [], qwen_image.attention_varlen
    monkeypatch.setattr(qwen_image, "attention_varlen",
                        lambda q, k, v, ql, kl: calls.append((ql.lengths, kl.lengths)) or varlen(q, k, v, ql, kl))
    with torch.no_grad():
        packed = ours.forward_packed(latents, t, texts, shapes)
        joint = tuple(n + lat.shape[0] for n, lat in zip(lengths, latents))
        assert calls == [(joint, joint)] * len(ours.transformer_blocks)
        for i in range(3):
            alone = ours(latents[i][None], t[i:i + 1], texts[i][None], None, shapes[i])[0]
            assert packed[i].shape == alone.shape
            torch.testing.assert_close(packed[i], alone, atol=ATOL, rtol=0)
