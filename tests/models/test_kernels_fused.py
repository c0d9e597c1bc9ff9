"""Fused memory-bound ops (diffserve.kernels norm / residual / rope / activation / timestep).

Each reference (the CPU / CI path) is checked against the math it replaces: diffusers' modules and
functions where they exist, the models' own expressions otherwise, in float32 and bfloat16, with
modulation broadcast over tokens and per token. Where the fused op rounds once instead of after
every step (bf16 models that ran norm, modulation or residual in bf16), it must be at least as close
to a float64 truth as the old chain. The layers helpers are pinned to the same math. When triton is
installed, its CPU interpreter runs the Triton kernels against the references in a subprocess
(TRITON_INTERPRET=1 must be set before the kernels are defined). GPU accuracy and speed:
bench/kernels_check.py.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from diffserve.kernels import activation, merge, norm, residual, rope, timestep

B, L, D = 2, 9, 48
HEADS, HEAD_DIM = 3, 16


def _mods(kind: str, dtype=torch.float32, seed: int = 1, length: int = L) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale) broadcast over tokens (B, 1, D), or per token as the strided views Wan slices
    out of one (B, L, 6, D) modulation tensor."""
    g = torch.Generator().manual_seed(seed)
    if kind == "broadcast":
        return (torch.randn(B, 1, D, generator=g) * 0.5).to(dtype), (torch.randn(B, 1, D, generator=g) * 0.5).to(dtype)
    table = (torch.randn(B, length, 6, D, generator=g) * 0.5).to(dtype)
    shift, scale, *_ = table.unbind(2)
    return shift, scale


def _x(dtype, *shape, seed: int = 0, offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*(shape or (B, L, D)), generator=g) * 2 + offset).to(dtype)


def _no_worse(fused: torch.Tensor, old: torch.Tensor, truth: torch.Tensor) -> None:
    """Fused is at least as close to the float64 truth as the old chain (mean abs error), and near it."""
    err_fused = (fused.double() - truth).abs().mean()
    err_old = (old.double() - truth).abs().mean()
    assert err_fused <= err_old * 1.05 + 1e-12, (float(err_fused), float(err_old))
    torch.testing.assert_close(fused.float(), old.float(), rtol=3e-2, atol=3e-2)


DTYPES = [torch.float32, torch.bfloat16]
MODS = ["broadcast", "per_token"]
COUNTS = (4, 1, 3)  # packed requests' token counts (mixed-shape batching): x is (1, 8, D)


def _packed_mods(dtype=torch.float32, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One modulation row per request as the models hold them, strided (R, 1, D) views of an (R, 1, 6, D)
    table (shift, scale, gate), and each token's row index ((sum counts,) int32)."""
    g = torch.Generator().manual_seed(seed)
    table = (torch.randn(len(COUNTS), 1, 6, D, generator=g) * 0.5).to(dtype)
    shift, scale, gate = table.unbind(2)[:3]
    index = torch.repeat_interleave(torch.arange(len(COUNTS), dtype=torch.int32), torch.tensor(COUNTS))
    return shift, scale, gate, index


def _spread(rows: torch.Tensor) -> torch.Tensor:
    """(R, 1, D) -> (1, sum counts, D): each request's row copied onto its tokens (what the packed
    forward materialized before the kernels took an index)."""
    return torch.cat([rows[i].expand(n, -1) for i, n in enumerate(COUNTS)])[None]


# ---------------------------------------------------------------------------------------------
# norm.py
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mods", MODS)
def test_layer_norm_modulate_is_wans_fp32_norm_then_modulation(dtype, mods):
    from diffusers.models.normalization import FP32LayerNorm

    x = _x(dtype, offset=3.0)
    shift, scale = _mods(mods)  # float32, as Wan's (table + modulation.float())
    wan = (FP32LayerNorm(D, 1e-6, elementwise_affine=False)(x.float()) * (1 + scale) + shift).type_as(x)
    out = norm.layer_norm(x, eps=1e-6, shift=shift, scale=scale)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, wan)
    assert torch.equal(norm.layer_norm_reference(x, eps=1e-6, shift=shift, scale=scale), wan)


@pytest.mark.parametrize("dtype", DTYPES)
def test_affine_layer_norm_is_diffusers_fp32_layer_norm(dtype):
    from diffusers.models.normalization import FP32LayerNorm

    ln = FP32LayerNorm(D, 1e-6, elementwise_affine=True)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = _x(dtype, 2, 3, 5, D)  # any leading dims without modulation
    assert torch.equal(norm.layer_norm(x, ln.weight, ln.bias, 1e-6), ln(x))


@pytest.mark.parametrize("mods", MODS)
def test_bf16_layer_norm_modulate_is_no_worse_than_flux_bf16_chain(mods):
    x = _x(torch.bfloat16, offset=3.0)
    shift, scale = _mods(mods, torch.bfloat16)
    flux = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)(x) * (1 + scale) + shift  # all bf16, as FLUX / Qwen
    truth = F.layer_norm(x.double(), (D,), eps=1e-6) * (1 + scale.double()) + shift.double()
    _no_worse(norm.layer_norm(x, eps=1e-6, shift=shift, scale=scale), flux, truth)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_is_diffusers_rms_norm(dtype):
    from diffusers.models.normalization import RMSNorm

    rms = RMSNorm(D, eps=1e-6).to(dtype)
    with torch.no_grad():
        rms.weight.copy_(torch.rand(D) + 0.5)
    x = _x(dtype)
    out = norm.rms_norm(x, rms.weight, 1e-6)
    assert out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, rms(x), rtol=1e-6, atol=1e-6)
    else:
        truth = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * rms.weight.double()
        _no_worse(out, rms(x), truth)


@pytest.mark.parametrize("mods", MODS)
def test_rms_norm_modulate_is_rms_norm_then_modulation(mods):
    x = _x(torch.float32)
    weight = torch.rand(D) + 0.5
    shift, scale = _mods(mods)
    expected = nn.functional.rms_norm(x, (D,), weight, 1e-6) * (1 + scale) + shift
    torch.testing.assert_close(norm.rms_norm(x, weight, 1e-6, shift=shift, scale=scale), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_norms_with_an_index_read_each_requests_row(dtype):
    """Packed requests: (R, 1, D) rows and each token's index give what the same rows copied onto
    every token give, bit for bit."""
    x = _x(dtype, 1, sum(COUNTS), D, offset=3.0)
    shift, scale, _, index = _packed_mods()
    w = torch.rand(D) + 0.5
    assert torch.equal(norm.layer_norm(x, w, None, 1e-6, shift, scale, index),
                       norm.layer_norm(x, w, None, 1e-6, _spread(shift), _spread(scale)))
    assert torch.equal(norm.rms_norm(x, w, 1e-6, shift, scale, index), norm.rms_norm(x, w, 1e-6, _spread(shift), _spread(scale)))
    assert torch.equal(norm.layer_norm(x, eps=1e-6, scale=scale, index=index), norm.layer_norm(x, eps=1e-6, scale=_spread(scale)))


# ---------------------------------------------------------------------------------------------
# residual.py
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_residual_with_an_index_reads_each_requests_gate(dtype):
    x, y = _x(dtype, 1, sum(COUNTS), D), _x(dtype, 1, sum(COUNTS), D, seed=5)
    *_, gate, index = _packed_mods()
    assert torch.equal(residual.gated_residual(x, y, gate, index), residual.gated_residual(x, y, _spread(gate)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mods", MODS)
def test_gated_residual_is_wans_fp32_residual(dtype, mods):
    x, y = _x(dtype), _x(dtype, seed=5)
    _, gate = _mods(mods)  # float32 gate
    out = residual.gated_residual(x, y, gate)
    assert out.dtype == dtype
    assert torch.equal(out, (x.float() + y * gate).type_as(x))


@pytest.mark.parametrize("mods", MODS)
def test_gated_residual_in_fp32_is_fluxs_and_in_bf16_no_worse(mods):
    x, y = _x(torch.float32), _x(torch.float32, seed=5)
    _, gate = _mods(mods)
    assert torch.equal(residual.gated_residual(x, y, gate), x + gate * y)
    xb, yb, gb = x.bfloat16(), y.bfloat16(), gate.bfloat16()
    truth = xb.double() + gb.double() * yb.double()
    _no_worse(residual.gated_residual(xb, yb, gb), xb + gb * yb, truth)


# ---------------------------------------------------------------------------------------------
# rope.py
# ---------------------------------------------------------------------------------------------


def _tables(length: int = L) -> tuple[torch.Tensor, torch.Tensor]:
    from diffserve.worker.models.rope import rotary_tables

    cos, sin = rotary_tables(HEAD_DIM, length + 3)
    return cos[3:][None, :, None], sin[3:][None, :, None]  # (1, L, 1, Dh), positions 3.. (nonzero angles)


def _diffusers_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, (cos[0, :, 0], sin[0, :, 0]), sequence_dim=1)  # FLUX's call


@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_rotary_is_diffusers_rotary(dtype):
    x = _x(dtype, B, L, HEADS, HEAD_DIM)
    cos, sin = _tables()
    out = rope.apply_rotary(x, cos, sin)
    assert out.dtype == dtype
    assert torch.equal(out, _diffusers_rotary(x, cos, sin))


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_head_rms_norm_rope_is_diffusers_rms_norm_then_rotary(dtype):
    """FLUX / Qwen-Image / HunyuanVideo: diffusers' RMSNorm(head_dim) on (B, L, H, Dh), then RoPE."""
    from diffusers.models.normalization import RMSNorm

    rms = RMSNorm(HEAD_DIM, eps=1e-6).to(dtype)
    with torch.no_grad():
        rms.weight.copy_(torch.rand(HEAD_DIM) + 0.5)
    x = _x(dtype, B, L, HEADS, HEAD_DIM)
    cos, sin = _tables()
    old = _diffusers_rotary(rms(x), cos, sin)
    out = rope.rms_norm_rope(x, rms.weight, 1e-6, cos, sin)
    if dtype == torch.float32:
        torch.testing.assert_close(out, old, rtol=1e-6, atol=1e-6)
    else:
        xd = x.double()
        truth = rope.apply_rotary_reference(xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * rms.weight.double(),
                                            cos.double(), sin.double())
        _no_worse(out, old, truth)


@pytest.mark.parametrize("dtype", DTYPES)
def test_across_heads_rms_norm_rope_is_wans_norm_then_rotary(dtype):
    """Wan: torch.nn.RMSNorm(H * Dh) on (B, L, H * Dh) before the heads are split, then RoPE."""
    rms = nn.RMSNorm(HEADS * HEAD_DIM, eps=1e-6).to(dtype)
    with torch.no_grad():
        rms.weight.copy_(torch.rand(HEADS * HEAD_DIM) + 0.5)
    x = _x(dtype, B, L, HEADS * HEAD_DIM)
    cos, sin = _tables()
    old = rope.apply_rotary_reference(rms(x).unflatten(2, (HEADS, -1)), cos, sin)
    heads = x.unflatten(2, (HEADS, -1))
    out = rope.rms_norm_rope(heads, rms.weight, 1e-6, cos, sin, across_heads=True)
    assert out.shape == (B, L, HEADS, HEAD_DIM)
    if dtype == torch.float32:
        torch.testing.assert_close(out, old, rtol=1e-6, atol=1e-6)
        no_rope = rope.rms_norm_rope(heads, rms.weight, 1e-6, across_heads=True)  # cross-attention: norm only
        torch.testing.assert_close(no_rope, rms(x).unflatten(2, (HEADS, -1)), rtol=1e-6, atol=1e-6)
    else:
        xd = x.double()
        normed = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * rms.weight.double()
        truth = rope.apply_rotary_reference(normed.unflatten(2, (HEADS, -1)), cos.double(), sin.double())
        _no_worse(out, old, truth)


# ---------------------------------------------------------------------------------------------
# activation.py and timestep.py
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_tanh_is_diffusers_gelu_approximate(dtype):
    from diffusers.models.activations import GELU

    layer = GELU(D, 2 * D, approximate="tanh").to(dtype)
    x = _x(dtype)
    fused = activation.gelu_tanh(F.linear(x, layer.proj.weight), layer.proj.bias)  # bias add in the activation
    torch.testing.assert_close(fused, layer(x), **({} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)))
    assert torch.equal(activation.gelu_tanh(x), F.gelu(x, approximate="tanh"))


@pytest.mark.parametrize("dim", [256, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_timestep_embedding_is_diffusers_get_timestep_embedding(dim, dtype):
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.0, 17.25, 500.0, 999.5]).to(dtype)
    expected = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    out = timestep.timestep_embedding(t, dim)
    assert out.dtype == torch.float32
    assert torch.equal(out, expected)
    per_token = timestep.timestep_embedding(t.view(1, -1).expand(2, -1), dim)  # Wan2.2: (B, L) timesteps
    assert per_token.shape == (2, 5, dim) and torch.equal(per_token[1], expected)


# ---------------------------------------------------------------------------------------------
# layers.py routes through the fused ops
# ---------------------------------------------------------------------------------------------


def test_layers_helpers_match_module_math():
    from diffserve.worker.models import layers
    from diffserve.worker.models.qwen_image import RMSNorm as DiffusersStyleRMSNorm

    x = _x(torch.bfloat16, offset=1.0)
    shift, scale = _mods("per_token")
    ln = layers.FP32LayerNorm(D, 1e-6, elementwise_affine=False)
    assert torch.equal(layers.norm_modulate(x, shift, scale, ln), layers.modulate(ln(x.float()), shift, scale).type_as(x))
    assert torch.equal(layers.norm_modulate(x.float(), shift, scale), layers.modulate(ln(x.float()), shift, scale))
    rms = nn.RMSNorm(D, eps=1e-6)
    torch.testing.assert_close(layers.norm_modulate(x.float(), shift, scale, rms),
                               layers.modulate(rms(x.float()), shift, scale), rtol=1e-6, atol=1e-6)
    assert torch.equal(layers.gated_residual(x, x, scale), (x.float() + x * scale).type_as(x))

    q = _x(torch.float32, B, L, HEADS, HEAD_DIM)
    cos, sin = _tables()
    per_head = DiffusersStyleRMSNorm(HEAD_DIM)
    torch.testing.assert_close(layers.qk_norm_rope(q, per_head, (cos, sin)), layers.apply_rotary(per_head(q), cos, sin),
                               rtol=1e-6, atol=1e-6)
    across = nn.RMSNorm(HEADS * HEAD_DIM, eps=1e-6)
    torch.testing.assert_close(layers.qk_norm_rope(q, across, None), across(q.flatten(2)).unflatten(2, (HEADS, -1)),
                               rtol=1e-6, atol=1e-6)

    ff = layers.FeedForward(D, 2 * D, approximate="tanh")
    assert torch.equal(ff(x.float()), ff.net[2](F.gelu(ff.net[0].proj(x.float()), approximate="tanh")))
    assert layers.timestep_embedding is timestep.timestep_embedding and layers.apply_rotary is rope.apply_rotary


def test_cpu_and_autograd_take_the_reference():
    x = _x(torch.float32).requires_grad_()
    assert not norm.use_triton(x)
    norm.layer_norm(x, eps=1e-6).sum().backward()  # the reference is differentiable
    assert x.grad is not None


# ---------------------------------------------------------------------------------------------
# Triton kernels in triton's CPU interpreter
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_match_references_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr


def _interpreter_checks() -> int:
    """Each Triton launcher against its reference on CPU tensors; prints one line per case."""
    cases = []

    def case(name, out, ref, **tol):
        cases.append(name)
        try:
            assert out.dtype == ref.dtype and out.shape == ref.shape, (out.dtype, ref.dtype, out.shape, ref.shape)
            torch.testing.assert_close(out, ref, **tol)
            print(f"ok   {name}  max abs err {(out.double() - ref.double()).abs().max():.2e}")
            return True
        except AssertionError as e:
            print(f"FAIL {name}: {e}")
            return False

    # The interpreter runs one program at a time in numpy (~10 ms each): few tokens (l), wide rows.
    # bf16: it rounds float32 -> bf16 toward zero where the GPU rounds to nearest, hence one-ulp
    # differences there (assert_close's bf16 tolerance); float32 results agree to float rounding.
    ok = True
    l = 3
    cos, sin = _tables(l)
    for dtype in DTYPES:
        tag = str(dtype).removeprefix("torch.")
        x = _x(dtype, B, l, D, offset=3.0)
        for mods in MODS:
            shift, scale = _mods(mods, length=l)
            ok &= case(f"layer_norm+mod {mods} {tag}", norm.norm_triton(x, None, None, 1e-6, shift, scale, rms=False),
                       norm.layer_norm_reference(x, eps=1e-6, shift=shift, scale=scale))
            w = torch.rand(D) + 0.5
            ok &= case(f"rms_norm+mod {mods} {tag}", norm.norm_triton(x, w, None, 1e-6, shift, scale, rms=True),
                       norm.rms_norm_reference(x, w, 1e-6, shift, scale))
            y = _x(dtype, B, l, D, seed=5)
            ok &= case(f"gated_residual {mods} {tag}", residual.gated_residual_triton(x, y, scale),
                       residual.gated_residual_reference(x, y, scale))
        # packed requests: one modulation row per request, picked per token by an index
        xp, yp = _x(dtype, 1, sum(COUNTS), D, offset=3.0), _x(dtype, 1, sum(COUNTS), D, seed=5)
        p_shift, p_scale, p_gate, index = _packed_mods(torch.float32 if dtype == torch.float32 else dtype)
        w = torch.rand(D) + 0.5
        ok &= case(f"layer_norm+mod indexed {tag}", norm.norm_triton(xp, w, None, 1e-6, p_shift, p_scale, rms=False, index=index),
                   norm.layer_norm_reference(xp, w, None, 1e-6, _spread(p_shift), _spread(p_scale)))
        ok &= case(f"rms_norm+mod indexed {tag}", norm.norm_triton(xp, w, None, 1e-6, p_shift, p_scale, rms=True, index=index),
                   norm.rms_norm_reference(xp, w, 1e-6, _spread(p_shift), _spread(p_scale)))
        ok &= case(f"layer_norm+scale indexed, int64 index {tag}",
                   norm.norm_triton(xp, None, None, 1e-6, None, p_scale, rms=False, index=index.long()),
                   norm.layer_norm_reference(xp, eps=1e-6, scale=_spread(p_scale)))
        ok &= case(f"gated_residual indexed {tag}", residual.gated_residual_triton(xp, yp, p_gate, index),
                   residual.gated_residual_reference(xp, yp, _spread(p_gate)))
        w, b = torch.randn(40), torch.randn(40)
        x4 = _x(dtype, 2, 1, 2, 40)
        ok &= case(f"affine layer_norm (N..., D) {tag}", norm.norm_triton(x4, w, b, 1e-5, None, None, rms=False),
                   norm.layer_norm_reference(x4, w, b, 1e-5))
        wide = _x(dtype, 1, 2, 1100)  # more than one column block
        bias = torch.randn(1100).to(dtype)
        ok &= case(f"gated_residual D=1100 {tag}", residual.gated_residual_triton(wide, wide, bias),
                   residual.gated_residual_reference(wide, wide, bias))
        ok &= case(f"gelu_tanh {tag}", activation.gelu_tanh_triton(wide), activation.gelu_tanh_reference(wide))
        # with a bias the kernel adds in float32; the reference adds in x's dtype first
        ok &= case(f"gelu_tanh + bias {tag}", activation.gelu_tanh_triton(wide, bias),
                   activation.gelu_tanh_reference(wide.float(), bias.float()).to(dtype))

        q = _x(dtype, B, l + 4, HEADS, HEAD_DIM)[:, 2:-2]  # a strided slice, as HunyuanVideo's video part
        ok &= case(f"apply_rotary {tag}", rope.rms_norm_rope_triton(q, None, 0.0, cos, sin, False, norm=False),
                   rope.apply_rotary_reference(q, cos, sin))
        w_head, w_all = torch.rand(HEAD_DIM) + 0.5, (torch.rand(HEADS * HEAD_DIM) + 0.5).to(dtype)
        ok &= case(f"rms_norm_rope per head {tag}", rope.rms_norm_rope_triton(q, w_head, 1e-6, cos, sin, False),
                   rope.rms_norm_rope_reference(q, w_head, 1e-6, cos, sin))
        ok &= case(f"rms_norm_rope across heads {tag}", rope.rms_norm_rope_triton(q, w_all, 1e-6, cos, sin, True),
                   rope.rms_norm_rope_reference(q, w_all, 1e-6, cos, sin, True))
        ok &= case(f"rms_norm across heads, no rope {tag}", rope.rms_norm_rope_triton(q, w_all, 1e-6, None, None, True),
                   rope.rms_norm_rope_reference(q, w_all, 1e-6, None, None, True))

    # Ring attention's merge: in place, lse strided like FA3's (B, H, L) transposed; rows with no key
    # yet on one side (-inf) and on both sides (stay 0, -inf).
    for dtype in DTYPES:
        g = torch.Generator().manual_seed(3)
        out, part = torch.randn(B, l, HEADS, HEAD_DIM, generator=g), torch.randn(B, l, HEADS, HEAD_DIM, generator=g).to(dtype)
        lse, part_lse = torch.randn(B, HEADS, l, generator=g).transpose(1, 2), torch.randn(B, l, HEADS, generator=g)
        lse[0, 0, 0] = part_lse[0, 1, 1] = lse[1, 2, 2] = part_lse[1, 2, 2] = float("-inf")
        ref_out, ref_lse = merge.merge_reference(out, lse, part, part_lse)
        got_out, got_lse = merge.merge_triton(out.clone(), lse.clone(), part, part_lse)
        tag = str(dtype).removeprefix("torch.")
        ok &= case(f"ring merge out, part {tag}", got_out, ref_out)
        ok &= case(f"ring merge lse, part {tag}", got_lse, ref_lse)

    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        t = torch.tensor([[0.0, 1.0, 17.25], [500.0, 999.5, 3.0]]).to(dtype)
        for dim in (256, 7):
            # numpy's float32 exp / cos / sin stand in for CUDA's here: ulp-level differences at angles ~1e3
            ok &= case(f"timestep dim={dim} t={dtype}", timestep.timestep_embedding_triton(t, dim),
                       timestep.timestep_embedding_reference(t, dim), rtol=0, atol=2e-4)
    print(f"{len(cases)} cases, {'all ok' if ok else 'FAILURES'}")
    return 0 if ok else 1


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through test_triton_kernels_match_references_in_interpreter"
    sys.exit(_interpreter_checks())
