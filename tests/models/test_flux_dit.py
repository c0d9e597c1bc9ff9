"""Our FluxTransformer against diffusers' FluxTransformer2DModel on the tiny random checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file

from diffserve.worker.models.flux import FluxConfig, FluxTransformer, flux_rope

from tests.fixtures.tiny.flux import TINY_FLUX_TRANSFORMER, build_tiny_flux

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("tiny_flux"))


@pytest.fixture(scope="module")
def ours(ckpt):
    return FluxTransformer.from_pretrained(ckpt / "transformer", torch.float32, "cpu")


@pytest.fixture(scope="module")
def ref(ckpt):
    return FluxTransformer2DModel.from_pretrained(ckpt / "transformer", torch_dtype=torch.float32).eval()


def _ids(h: int, w: int, text_len: int):
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] += torch.arange(h)[:, None]
    img_ids[..., 2] += torch.arange(w)[None, :]
    return img_ids.reshape(h * w, 3), torch.zeros(text_len, 3)


def _inputs(batch: int, seed: int = 0, h: int = 4, w: int = 6, text_len: int = 12):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, h * w, TINY_FLUX_TRANSFORMER["in_channels"], generator=g)  # (B, N, 64)
    context = torch.randn(batch, text_len, TINY_FLUX_TRANSFORMER["joint_attention_dim"], generator=g)  # (B, S, J)
    pooled = torch.randn(batch, TINY_FLUX_TRANSFORMER["pooled_projection_dim"], generator=g)  # (B, P)
    img_ids, txt_ids = _ids(h, w, text_len)
    return latents, context, pooled, img_ids, txt_ids


def _ref(ref, latents, timestep, context, pooled, img_ids, txt_ids, guidance):
    """diffusers takes the sampler's timestep / 1000 (as its pipeline passes it); ours takes it as it is."""
    with torch.no_grad():
        return ref(hidden_states=latents, encoder_hidden_states=context, pooled_projections=pooled, timestep=timestep / 1000,
                   img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]


def _ours(model, latents, timestep, context, pooled, img_ids, txt_ids, guidance):
    with torch.no_grad():
        return model(latents, timestep, context, pooled, img_ids, txt_ids, guidance)


def test_loads_strict(ckpt, ours, ref):
    state_dict = load_file(ckpt / "transformer" / "diffusion_pytorch_model.safetensors")
    fresh = FluxTransformer(FluxConfig.from_dict(json.loads((ckpt / "transformer" / "config.json").read_text())))
    result = fresh.load_state_dict(state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in ours.parameters())


def test_loads_sharded_checkpoint(tmp_path, ours, ref):
    ref.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists()
    sharded = FluxTransformer.from_pretrained(tmp_path, torch.float32, "cpu")
    expected = ours.state_dict()
    for name, tensor in sharded.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], atol=0, rtol=0)


def test_rope_tables_match(ref):
    img_ids, txt_ids = _ids(3, 5, 7)
    ids = torch.cat([txt_ids, img_ids])
    cos, sin = flux_rope(ids, TINY_FLUX_TRANSFORMER["axes_dims_rope"])
    ref_cos, ref_sin = ref.pos_embed(ids)
    torch.testing.assert_close(cos[0, :, 0], ref_cos, atol=0, rtol=0)
    torch.testing.assert_close(sin[0, :, 0], ref_sin, atol=0, rtol=0)


def test_batch_matches_diffusers(ours, ref):
    latents, context, pooled, img_ids, txt_ids = _inputs(2)
    t = torch.tensor([700.0, 700.0])
    g = torch.tensor([3.5, 3.5])
    expected = _ref(ref, latents, t, context, pooled, img_ids, txt_ids, g)
    got = _ours(ours, latents, t, context, pooled, img_ids, txt_ids, g)
    assert got.shape == (2, 24, 64)
    torch.testing.assert_close(got, expected, **TOL)


def test_per_sample_timestep_and_guidance(ours, ref):
    """A batch whose rows have different timesteps and guidance equals each row run alone (in
    diffusers, which only ever sees one timestep per batch)."""
    latents, context, pooled, img_ids, txt_ids = _inputs(3, seed=1)
    t = torch.tensor([950.0, 500.0, 120.0])
    g = torch.tensor([3.5, 1.0, 6.0])
    batched = _ours(ours, latents, t, context, pooled, img_ids, txt_ids, g)
    for i in range(3):
        rows = slice(i, i + 1)
        alone_ref = _ref(ref, latents[rows], t[rows], context[rows], pooled[rows], img_ids, txt_ids, g[rows])
        alone_ours = _ours(ours, latents[rows], t[rows], context[rows], pooled[rows], img_ids, txt_ids, g[rows])
        torch.testing.assert_close(batched[rows], alone_ref, **TOL)
        torch.testing.assert_close(batched[rows], alone_ours, **TOL)
    assert not torch.allclose(batched[0], batched[1])


def test_guidance_changes_output(ours):
    latents, context, pooled, img_ids, txt_ids = _inputs(1, seed=2)
    t = torch.tensor([500.0])
    a = _ours(ours, latents, t, context, pooled, img_ids, txt_ids, torch.tensor([1.0]))
    b = _ours(ours, latents, t, context, pooled, img_ids, txt_ids, torch.tensor([5.0]))
    assert not torch.allclose(a, b)


def test_bfloat16_close_to_diffusers(ckpt, ref):
    """Same dtype handling as diffusers: in bfloat16 both agree to bf16 rounding."""
    ours16 = FluxTransformer.from_pretrained(ckpt / "transformer", torch.bfloat16, "cpu")
    ref16 = FluxTransformer2DModel.from_pretrained(ckpt / "transformer", torch_dtype=torch.bfloat16).eval()
    latents, context, pooled, img_ids, txt_ids = _inputs(2, seed=3)
    t, g = torch.tensor([800.0, 300.0]), torch.tensor([3.5, 2.0])
    latents, context, pooled = latents.bfloat16(), context.bfloat16(), pooled.bfloat16()
    got = _ours(ours16, latents, t, context, pooled, img_ids, txt_ids, g)
    expected = torch.cat([
        _ref(ref16, latents[i : i + 1], t[i : i + 1], context[i : i + 1], pooled[i : i + 1], img_ids, txt_ids, g[i : i + 1])
        for i in range(2)
    ])
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_packed_requests_of_different_sizes_each_equal_their_own_forward(ours, monkeypatch):
    """Mixed-shape batching: three images of different sizes (and timesteps, guidance, prompts) in
    one packed forward; each output equals the request's forward alone. Every block attends in one
    varlen call over each request's [text, image]."""
    from diffserve.worker.models import flux

    g = torch.Generator().manual_seed(5)
    sizes, text_len = [(4, 6), (2, 2), (6, 4)], 12
    latents = [torch.randn(h * w, TINY_FLUX_TRANSFORMER["in_channels"], generator=g) for h, w in sizes]
    context = torch.randn(3, text_len, TINY_FLUX_TRANSFORMER["joint_attention_dim"], generator=g)
    pooled = torch.randn(3, TINY_FLUX_TRANSFORMER["pooled_projection_dim"], generator=g)
    ids = [_ids(h, w, text_len) for h, w in sizes]
    t, guidance = torch.tensor([1000.0, 520.0, 7.5]), torch.tensor([3.5, 1.0, 6.0])
    calls, varlen = [], flux.attention_varlen
    monkeypatch.setattr(flux, "attention_varlen", lambda q, k, v, ql, kl: calls.append((ql.lengths, kl.lengths)) or varlen(q, k, v, ql, kl))
    with torch.no_grad():
        packed = ours.forward_packed(latents, t, context, pooled, [i for i, _ in ids], ids[0][1], guidance)
    joint = tuple(text_len + h * w for h, w in sizes)
    assert calls == [(joint, joint)] * (len(ours.transformer_blocks) + len(ours.single_transformer_blocks))
    for i, lat in enumerate(latents):
        alone = _ours(ours, lat[None], t[i:i + 1], context[i:i + 1], pooled[i:i + 1], ids[i][0], ids[i][1], guidance[i:i + 1])[0]
        assert packed[i].shape == alone.shape
        torch.testing.assert_close(packed[i], alone, **TOL)
