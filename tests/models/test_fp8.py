"""FP8 (`--quantization fp8`, `--attention-backend fa3-fp8`) on the CPU: the quantization math against
its stated error bounds, the producers that write FP8 rows (norm + modulation, GELU) against their
float32 math quantized, the FP8 linear against the dequantized matmul, which linears each family
quantizes, whole tiny forwards within a stated error of the float forward (and, in float32, equal
to quantizing at each linear), and the worker's wiring.

When triton is installed, its CPU interpreter runs the FP8 kernels (row quantization, the fused
norm and GELU producers, the per-(batch, head) amax and quantization) against their references in a
subprocess (TRITON_INTERPRET=1 must be set before the kernels are defined). GPU speed and error at
full size: bench/fp8_forward.py.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from diffserve.kernels import activation, attention, fp8, norm
from diffserve.worker.models import layers
from diffserve.worker.models.fp8 import FP8Linear, keeps_precision, quantize_linears

# A forward with every block linear in FP8 stays within this relative error (||out - ref|| / ||ref||)
# of the float32 forward on the tiny random models (measured 0.4-0.8 %: e4m3's 2^-4 rounding per
# operand, averaged over the dot products, compounded over the blocks)...
FORWARD_REL_ERR = 0.03
# ...and on the tiny Wan within this multiple of the error of the whole model cast to bf16 (measured:
# fp8 0.82 %, bf16 0.54 %, 1.5x).
FP8_OVER_BF16 = 3.0


def _rows(seed: int = 0) -> torch.Tensor:
    """(6, 48): rows of very different magnitudes, one with an outlier, one all zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 48, generator=g) * torch.tensor([1.0, 1e-3, 1e3, 1.0, 1e-8, 0.0])[:, None]
    x[3, 5] = 500.0
    return x


def _bound(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Largest |x - q * scale| e4m3 rounding allows: |x| / 16 for normal values, scale * 2^-10 below
    2^-6 of the scale (subnormals), plus float32 rounding of x / scale."""
    return torch.maximum(x.abs() / 16, scale * 2.0**-10) * (1 + 1e-6)


# ---------------------------------------------------------------------------------------------
# Quantization math
# ---------------------------------------------------------------------------------------------


def test_row_quantization_error_is_within_e4m3_rounding_per_row():
    x = _rows()
    q, scale = fp8.quantize_rows(x)  # the reference on the CPU
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and scale.shape == (6, 1) and scale.dtype == torch.float32
    amax = x.abs().amax(-1, keepdim=True)
    torch.testing.assert_close(scale[:5], amax[:5] / 448.0, rtol=0, atol=0)
    assert scale[5].item() == pytest.approx(fp8.SCALE_FLOOR / 448.0, rel=1e-6) and (q[5].float() == 0).all()  # the zero row: zeros, no NaN
    assert (q[:5].float().abs().amax(-1) == 448.0).all()  # each row's largest value lands on e4m3's largest
    assert ((x - fp8.dequantize(q, scale)).abs() <= _bound(x, scale)).all()
    # each row on its own: the outlier of row 3 does not coarsen row 0 (the same values, its own scale)
    assert (fp8.quantize_rows(x[:1])[0].view(torch.uint8) == q[:1].view(torch.uint8)).all()
    # leading dims are kept: (2, 3, 48) -> scale (2, 3, 1), the same numbers
    q3, s3 = fp8.quantize_rows(x.reshape(2, 3, 48))
    assert s3.shape == (2, 3, 1) and torch.equal(s3.reshape(6, 1), scale) and torch.equal(q3.reshape(6, 48).float(), q.float())


def _heads_input(seed: int = 1) -> torch.Tensor:
    """(2, 5, 3, 16): heads of very different magnitudes, batch row 1 ten times row 0, one head all zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 3, 16, generator=g) * torch.tensor([7.0, 1e-3, 300.0])[None, None, :, None]
    x[1] *= 10
    x[0, :, 1] = 0.0
    return x


def test_head_quantization_has_one_scale_per_batch_row_and_head_within_e4m3_rounding():
    x = _heads_input()
    q, scale = fp8.quantize_heads(x)  # the reference on the CPU
    assert q.shape == x.shape and q.dtype == torch.float8_e4m3fn and q.is_contiguous()
    assert scale.shape == (2, 3) and scale.dtype == torch.float32
    torch.testing.assert_close(scale, (x.abs().amax(dim=(1, 3)) / 448.0).clamp(min=fp8.SCALE_FLOOR / 448.0), rtol=0, atol=0)
    assert (q[0, :, 1].float() == 0).all() and scale[0, 1].item() == pytest.approx(fp8.SCALE_FLOOR / 448.0, rel=1e-6)
    per = scale[:, None, :, None]
    assert ((x - fp8.dequantize(q, per)).abs() <= _bound(x, per)).all()
    # each batch row on its own: row 0 alone gets the codes and scales it got beside the larger row 1
    q0, s0 = fp8.quantize_heads(x[:1])
    assert torch.equal(s0, scale[:1]) and torch.equal(q0.view(torch.uint8), q[:1].view(torch.uint8))


def test_cpu_torch_runs_scaled_mm_with_row_wise_scales():
    """The CPU path of fp8_linear is torch._scaled_mm itself (not the reference): torch's CPU build
    takes (M, 1) and (1, N) float32 scales and a bias."""
    assert fp8.scaled_mm_runs(torch.device("cpu"), torch.float32)
    a, b = torch.ones(3, 16).to(fp8.FP8), torch.ones(32, 16).to(fp8.FP8)
    out = torch._scaled_mm(a, b.t(), scale_a=torch.full((3, 1), 2.0), scale_b=torch.full((1, 32), 3.0), bias=torch.ones(32),
                           out_dtype=torch.float32)
    assert torch.equal(out, torch.full((3, 32), 16 * 6.0 + 1))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fp8_linear_equals_dequantized_weight_times_dequantized_activation(out_dtype, with_bias):
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(7, 64, generator=g) * 4, torch.randn(48, 64, generator=g) / 8, torch.randn(48, generator=g)
    bias = b if with_bias else None
    x_q, x_s = fp8.quantize_rows(x)
    w_q, w_s = fp8.quantize_rows(w)
    out = fp8.fp8_linear(x_q, x_s, w_q, w_s.reshape(1, -1), bias.to(out_dtype) if with_bias else None, out_dtype)
    expected = fp8.dequantize(x_q, x_s) @ fp8.dequantize(w_q, w_s).T + (b if with_bias else 0)  # float32
    assert out.dtype == out_dtype and out.shape == (7, 48)
    tol = dict(rtol=1e-5, atol=1e-5) if out_dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)  # bf16: output rounding
    torch.testing.assert_close(out.float(), expected, **tol)
    torch.testing.assert_close(fp8.fp8_linear_reference(x_q, x_s, w_q, w_s.reshape(1, -1), bias, torch.float32), expected,
                               rtol=1e-5, atol=1e-5)


def test_fp8_linear_module_against_the_float_layer():
    g = torch.Generator().manual_seed(3)
    linear = nn.Linear(64, 32)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(32, 64, generator=g) / 8)
    layer = FP8Linear.from_linear(linear)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (1, 32)
    x = torch.randn(2, 5, 64, generator=g)  # (B, L, in): every token gets its own scale
    out = layer(x)
    x_q, x_s = fp8.quantize_rows(x.reshape(10, 64))
    w = layer.weight.float() * layer.weight_scale.reshape(-1, 1)
    torch.testing.assert_close(out, (fp8.dequantize(x_q, x_s) @ w.T + linear.bias).reshape(2, 5, 32), rtol=1e-5, atol=1e-5)
    ref = linear(x)
    assert out.shape == ref.shape and (out - ref).norm() / ref.norm() < 0.05
    # one token's output does not depend on the others it is batched with (per-token scales)
    torch.testing.assert_close(layer(x[1:, 2:3]), out[1:, 2:3], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Producers that write FP8 rows (the norms with modulation, GELU) and the FP8 linear reading them
# ---------------------------------------------------------------------------------------------


def _norm_input(dtype=torch.float32):
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(2, 7, 48, generator=g) * 3 + 1).to(dtype)
    table = torch.randn(2, 7, 6, 48, generator=g) * 0.5  # per-token modulation, strided views as Wan's
    return x, table[:, :, 0], table[:, :, 1], torch.randn(48, generator=g), torch.randn(48, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_fp8_is_the_float32_norm_quantized_per_row(dtype):
    """The fused producers quantize the norm's float32 rows (not rows first rounded to x's dtype)."""
    x, shift, scale, w, b = _norm_input(dtype)
    cases = [
        (fp8.layer_norm_fp8(x, w, b, 1e-6, shift, scale), norm.layer_norm_reference(x.float(), w, b, 1e-6, shift, scale)),
        (fp8.layer_norm_fp8(x, eps=1e-6, shift=shift[:, :1], scale=scale[:, :1]),  # broadcast over tokens
         norm.layer_norm_reference(x.float(), eps=1e-6, shift=shift[:, :1], scale=scale[:, :1])),
        (fp8.rms_norm_fp8(x, w, 1e-6, shift, scale), norm.rms_norm_reference(x.float(), w, 1e-6, shift, scale)),
        (fp8.rms_norm_fp8(x.reshape(14, 48), w, 1e-6), norm.rms_norm_reference(x.float().reshape(14, 48), w, 1e-6)),
    ]
    for rows, y in cases:
        assert isinstance(rows, fp8.FP8Rows) and rows.dtype == dtype and rows.shape == y.shape and rows.scale.shape == (*y.shape[:-1], 1)
        q, s = fp8.quantize_rows_reference(y)
        assert torch.equal(rows.scale, s) and torch.equal(rows.data.view(torch.uint8), q.view(torch.uint8))
        assert ((y - fp8.dequantize(rows.data, rows.scale)).abs() <= _bound(y, rows.scale)).all()


def _packed_norm_input(dtype=torch.float32):
    """Packed requests (mixed-shape batching): x (1, 3 + 1 + 4, 48), one modulation row per request as
    strided (3, 1, 48) views of a (3, 1, 6, 48) table, each token's row index, and those rows copied
    onto every token ((1, 8, 48), what the index stands for)."""
    g = torch.Generator().manual_seed(8)
    counts = (3, 1, 4)
    x = (torch.randn(1, sum(counts), 48, generator=g) * 3 + 1).to(dtype)
    table = torch.randn(len(counts), 1, 6, 48, generator=g) * 0.5
    shift, scale = table[:, :, 0], table[:, :, 1]
    index = torch.repeat_interleave(torch.arange(len(counts), dtype=torch.int32), torch.tensor(counts))

    def spread(rows):
        return rows[:, 0].index_select(0, index)[None]

    return x, shift, scale, index, spread


def test_norm_fp8_with_an_index_reads_each_requests_row():
    """The FP8 norms take packed requests' modulation as the plain norms do (kernels/norm.py `index`):
    the same FP8 rows as the per-request rows copied onto every token, and through norm_modulate's
    `into=` seam too."""
    x, shift, scale, index, spread = _packed_norm_input()
    w, b = torch.randn(48), torch.randn(48)
    pairs = [
        (fp8.layer_norm_fp8(x, w, b, 1e-6, shift, scale, index), fp8.layer_norm_fp8(x, w, b, 1e-6, spread(shift), spread(scale))),
        (fp8.rms_norm_fp8(x, w, 1e-6, shift, scale, index), fp8.rms_norm_fp8(x, w, 1e-6, spread(shift), spread(scale))),
        (fp8.layer_norm_fp8(x, eps=1e-6, scale=scale, index=index), fp8.layer_norm_fp8(x, eps=1e-6, scale=spread(scale))),
    ]
    quantized = FP8Linear.from_linear(nn.Linear(48, 32))
    pairs.append((layers.norm_modulate(x, shift, scale, index=index, into=(quantized, quantized)),
                  layers.norm_modulate(x, spread(shift), spread(scale), into=quantized)))
    for indexed, spread_rows in pairs:
        assert isinstance(indexed, fp8.FP8Rows) and indexed.shape == x.shape
        assert torch.equal(indexed.scale, spread_rows.scale)
        assert torch.equal(indexed.data.view(torch.uint8), spread_rows.data.view(torch.uint8))


def test_gelu_fp8_is_the_float32_gelu_quantized_per_row():
    g = torch.Generator().manual_seed(5)
    x, bias = torch.randn(3, 4, 80, generator=g) * 3, torch.randn(80, generator=g)
    for b in (None, bias):
        rows = fp8.gelu_tanh_fp8(x, b)
        y = F.gelu(x + (b if b is not None else 0), approximate="tanh")
        assert rows.shape == x.shape and rows.dtype == torch.float32
        q, s = fp8.quantize_rows_reference(y)
        assert torch.equal(rows.scale, s) and torch.equal(rows.data.view(torch.uint8), q.view(torch.uint8))
        torch.testing.assert_close(rows.dequantize(), y, rtol=1 / 16, atol=float(s.max()) * 2**-9)


def test_fp8_linear_takes_pre_quantized_rows_as_its_own_quantization():
    g = torch.Generator().manual_seed(6)
    linear = nn.Linear(48, 32)
    layer = FP8Linear.from_linear(linear)
    x = torch.randn(2, 7, 48, generator=g) * 2
    rows = fp8.FP8Rows(*fp8.quantize_rows(x), x.dtype)
    assert torch.equal(layer(rows), layer(x))
    # a norm's FP8 rows in float32: the same as the norm's output quantized by the linear itself
    x, shift, scale, w, b = _norm_input()
    assert torch.equal(layer(fp8.layer_norm_fp8(x, w, b, 1e-6, shift, scale)), layer(norm.layer_norm(x, w, b, 1e-6, shift, scale)))


def test_producers_write_fp8_rows_only_when_every_linear_they_feed_takes_them():
    x, shift, scale, _, _ = _norm_input()
    plain, quantized = nn.Linear(48, 32), FP8Linear.from_linear(nn.Linear(48, 32))
    assert isinstance(layers.norm_modulate(x, shift, scale, into=(quantized, quantized)), fp8.FP8Rows)
    for into in (None, plain, (quantized, plain)):
        assert isinstance(layers.norm_modulate(x, shift, scale, into=into), torch.Tensor)
    ff = layers.FeedForward(48, 96)
    ff.net[0].proj, ff.net[2] = FP8Linear.from_linear(ff.net[0].proj), FP8Linear.from_linear(ff.net[2])
    hidden = ff.net[0](x, into=ff.net[2])
    assert isinstance(hidden, fp8.FP8Rows) and hidden.shape == (2, 7, 96)
    with torch.no_grad():  # the GELU's FP8 rows in float32: what net.2 computed from the float GELU output
        assert torch.equal(ff(x), ff.net[2](F.gelu(ff.net[0].proj(x), approximate="tanh")))


# ---------------------------------------------------------------------------------------------
# Which linears each family quantizes
# ---------------------------------------------------------------------------------------------


def _tiny_models() -> dict[str, nn.Module]:
    from diffserve.worker.models.flux import FluxConfig, FluxTransformer
    from diffserve.worker.models.hunyuan_video import HunyuanVideoConfig, HunyuanVideoTransformer
    from diffserve.worker.models.qwen_image import QwenImageConfig, QwenImageTransformer
    from diffserve.worker.models.wan import WanConfig, WanTransformer
    from tests.fixtures.tiny.flux import TINY_FLUX_TRANSFORMER
    from tests.fixtures.tiny.hunyuan_video import TINY_HUNYUAN_TRANSFORMER
    from tests.fixtures.tiny.qwen_image import TINY_QWEN_TRANSFORMER
    from tests.fixtures.tiny.wan import TINY_WAN_TRANSFORMER

    torch.manual_seed(0)
    return {
        "wan": WanTransformer(WanConfig.from_dict(TINY_WAN_TRANSFORMER)).eval(),
        "flux": FluxTransformer(FluxConfig.from_dict(TINY_FLUX_TRANSFORMER)).eval(),
        "qwen-image": QwenImageTransformer(QwenImageConfig.from_dict(TINY_QWEN_TRANSFORMER)).eval(),
        "hunyuan-video": HunyuanVideoTransformer(HunyuanVideoConfig.from_dict(TINY_HUNYUAN_TRANSFORMER)).eval(),
    }


@pytest.fixture(scope="module")
def tiny_models():
    return _tiny_models()


# Per family, block 0's quantized linears (relative names); every block has the same.
QUANTIZED_IN_BLOCK_0 = {
    "wan": {"blocks.0." + n for n in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                                       "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")},
    "flux": {"transformer_blocks.0." + n for n in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                                                    "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                                                    "ff_context.net.0.proj", "ff_context.net.2")}
            | {"single_transformer_blocks.0." + n for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")},
    "qwen-image": {"transformer_blocks.0." + n for n in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
                                                         "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj",
                                                         "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")},
    "hunyuan-video": {"transformer_blocks.0." + n for n in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
                                                            "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj",
                                                            "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")}
                     | {"single_transformer_blocks.0." + n for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")},
}


@pytest.mark.parametrize("family", sorted(QUANTIZED_IN_BLOCK_0))
def test_block_linears_are_quantized_and_embedders_modulation_and_head_are_not(family, tiny_models):
    model = copy.deepcopy(tiny_models[family])
    before = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    counts = quantize_linears(model)
    after = {name for name, m in model.named_modules() if isinstance(m, FP8Linear)}
    assert {n for n in after if ".0." in n and n.split(".")[1] == "0"} == QUANTIZED_IN_BLOCK_0[family]
    assert counts == {"fp8": len(after), "kept": len(before) - len(after)}
    kept = {n: keeps_precision(n, before[n]) for n in before if n not in after}
    assert all(reason in ("outside the transformer blocks", "AdaLN modulation") for reason in kept.values()), kept
    assert any(reason == "outside the transformer blocks" for reason in kept.values())  # embedders, output projection
    if family != "wan":  # Wan's blocks take their modulation from the condition embedder (outside the blocks)
        assert any(reason == "AdaLN modulation" for reason in kept.values())


def test_linears_whose_features_are_not_multiples_of_16_stay():
    assert keeps_precision("blocks.0.attn1.to_q", nn.Linear(24, 32)) == "features not a multiple of 16"
    assert keeps_precision("blocks.0.attn1.to_q", nn.Linear(32, 32)) is None


# ---------------------------------------------------------------------------------------------
# Whole forwards
# ---------------------------------------------------------------------------------------------


def _forward_inputs(family: str) -> tuple:
    g = torch.Generator().manual_seed(5)
    if family == "wan":
        return torch.randn(2, 16, 2, 8, 8, generator=g), torch.tensor([500.0, 300.0]), torch.randn(2, 16, 32, generator=g)
    if family == "flux":
        h, w, s = 4, 6, 12
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(h * w, 3).float()
        return (torch.randn(2, h * w, 64, generator=g), torch.tensor([500.0, 300.0]), torch.randn(2, s, 32, generator=g),
                torch.randn(2, 32, generator=g), img_ids, torch.zeros(s, 3), torch.tensor([3.5, 3.5]))
    if family == "qwen-image":
        return torch.randn(1, 24, 64, generator=g), torch.tensor([500.0]), torch.randn(1, 7, 32, generator=g), None, [(1, 4, 6)]
    return (torch.randn(1, 4, 2, 8, 8, generator=g), torch.tensor([500.0]), torch.randn(1, 12, 32, generator=g), [12],
            torch.randn(1, 24, generator=g), torch.tensor([6.0]))


@pytest.mark.parametrize("family", sorted(QUANTIZED_IN_BLOCK_0))
def test_tiny_forward_with_fp8_linears_is_within_stated_error_of_the_float_forward(family, tiny_models):
    model = tiny_models[family]
    quantized = copy.deepcopy(model)
    quantize_linears(quantized)
    inputs = _forward_inputs(family)
    with torch.no_grad():
        ref, out = model(*inputs), quantized(*inputs)
    err = ((out - ref).norm() / ref.norm()).item()
    assert 0 < err < FORWARD_REL_ERR, err


@pytest.mark.parametrize("family", sorted(QUANTIZED_IN_BLOCK_0))
def test_fp8_rows_from_the_producers_equal_quantizing_at_each_linear_in_float32(family, tiny_models, monkeypatch):
    """The `into=` seam changes where rows are quantized, not the numbers: in float32 the norms' and
    GELU's FP8 rows are exactly what each linear computed for itself before."""
    model = copy.deepcopy(tiny_models[family])
    quantize_linears(model)
    inputs = _forward_inputs(family)
    with torch.no_grad():
        fused = model(*inputs)
        monkeypatch.setattr(layers, "reads_fp8", lambda into: False)
        per_linear = model(*inputs)
    assert torch.equal(fused, per_linear)


def test_tiny_wan_fp8_error_is_within_a_few_times_the_bf16_error(tiny_models):
    model = tiny_models["wan"]
    quantized, bf16 = copy.deepcopy(model), copy.deepcopy(model).to(torch.bfloat16)
    quantize_linears(quantized)
    latents, t, context = _forward_inputs("wan")
    with torch.no_grad():
        ref = model(latents, t, context)
        fp8_err = (quantized(latents, t, context) - ref).norm() / ref.norm()
        bf16_err = (bf16(latents.bfloat16(), t, context.bfloat16()).float() - ref).norm() / ref.norm()
    assert fp8_err < FP8_OVER_BF16 * bf16_err, (fp8_err, bf16_err)


def test_fp8_wan_batch_rows_equal_their_solo_forwards(tiny_models):
    """Per-token activation scales: a request's FP8 forward does not depend on what it is batched with."""
    model = copy.deepcopy(tiny_models["wan"])
    quantize_linears(model)
    latents, t, context = _forward_inputs("wan")
    with torch.no_grad():
        both = model(latents, t, context)
        solo = model(latents[1:], t[1:], context[1:])
    torch.testing.assert_close(both[1:], solo, rtol=1e-5, atol=1e-5)


def test_fp8_packed_wan_requests_equal_their_own_fp8_forwards(tiny_models, monkeypatch):
    """--quantization fp8 with mixed-shape batching (independent worker features): requests of
    different sizes in one packed forward give each request's own FP8 forward. The norms feeding FP8
    linears write FP8 rows reading each request's modulation row through the packed index."""
    model = copy.deepcopy(tiny_models["wan"])
    quantize_linears(model)
    g = torch.Generator().manual_seed(7)
    shapes = [(16, 1, 8, 8), (16, 3, 6, 10), (16, 2, 12, 8)]
    latents = [torch.randn(*shape, generator=g) for shape in shapes]
    context = torch.randn(3, 16, 32, generator=g)
    t = torch.tensor([999.0, 500.0, 12.5])
    fp8_norm, indexed = layers.layer_norm_fp8, []

    def layer_norm_fp8(*args, index=None, **kwargs):
        indexed.append(index is not None)
        return fp8_norm(*args, index=index, **kwargs)

    monkeypatch.setattr(layers, "layer_norm_fp8", layer_norm_fp8)
    with torch.no_grad():
        packed = model.forward_packed(latents, t, context)
        assert indexed == [True] * 2 * len(model.blocks)  # norm1 (into q / k / v) and norm3 (into the MLP) per block
        for i, lat in enumerate(latents):
            alone = model(lat[None], t[i:i + 1], context[i:i + 1])[0]
            assert packed[i].shape == lat.shape
            torch.testing.assert_close(packed[i], alone, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# FP8 attention (fa3-fp8)
# ---------------------------------------------------------------------------------------------


def _qkv(seed: int = 6, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(2, 40, 3, 16, generator=g) * s).to(dtype) for s in (1.0, 1.0, 2.0))  # (B, L, H, D)


def test_fa3_fp8_is_reported_unavailable_on_cpu():
    q, k, v = _qkv()
    problem = attention.cannot_run("fa3-fp8", q.device, q.dtype, 16)
    assert problem and "fa3-fp8" in problem and "Hopper" in problem
    assert "fa3-fp8" not in attention.available(q.device, torch.bfloat16, 16)  # never an automatic choice
    attention.configure("fa3-fp8")
    try:
        with pytest.raises(RuntimeError, match="attention backend fa3-fp8 cannot run on cpu.*Hopper"):
            attention.attention(q, k, v)
    finally:
        attention.configure("auto")
    with pytest.raises(RuntimeError, match="fa3-fp8 cannot run on cpu"):
        attention.run_backend("fa3-fp8", q, k, v)


def test_fp8_attention_reference_is_close_to_exact_attention_and_each_batch_row_is_its_own():
    q, k, v = _qkv()
    exact = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    out = attention.attention_fp8_reference(q, k, v)
    assert out.shape == exact.shape and out.dtype == q.dtype
    assert 0 < ((out - exact).norm() / exact.norm()).item() < 0.06  # measured 4.4 %: 3 mantissa bits per operand
    # per-(batch, head) scales: a row's result does not depend on the row batched with it, even a larger one
    big = tuple(torch.cat([t[:1], t[1:] * 50], dim=0) for t in (q, k, v))
    torch.testing.assert_close(attention.attention_fp8_reference(*big)[:1], out[:1], rtol=0, atol=0)


class _FakeFA3:
    """Stands in for fa3_fwd_interface on the CPU: checks what the fa3-fp8 backend passes (float8
    q/k/v in FA3's layout, one descale per (batch, kv head)) and applies the descales as FA3 does."""

    def __init__(self):
        self.calls = 0

    def flash_attn_func(self, q, k, v, q_descale=None, k_descale=None, v_descale=None):
        self.calls += 1
        assert q.dtype == k.dtype == v.dtype == torch.float8_e4m3fn
        assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()  # no copies left for FA3 to make
        for d in (q_descale, k_descale, v_descale):
            assert d.shape == (q.shape[0], k.shape[2]) and d.dtype == torch.float32 and d.is_contiguous()  # one per (b, kv head)
        q, k, v = (t.float() * d[:, None, :, None] for t, d in ((q, q_descale), (k, k_descale), (v, v_descale)))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        return out.to(torch.bfloat16), None  # FA3 returns (out, lse), bf16 for FP8 inputs


def test_fa3_fp8_backend_passes_fp8_tensors_with_their_descales(monkeypatch):
    fake = _FakeFA3()
    monkeypatch.setattr(attention, "_fa3_interface", lambda: fake)
    run = attention._load_fa3_fp8()
    q, k, v = _qkv(dtype=torch.bfloat16)
    out = run(q, k, v)
    assert fake.calls == 1 and out.dtype == torch.bfloat16 and out.shape == q.shape
    torch.testing.assert_close(out, attention.attention_fp8_reference(q, k, v), rtol=1e-2, atol=1e-2)
    # views split out of a packed sequence (strided along L) are read in place
    q2, k2, v2 = (t[:, 5:30] for t in (q, k, v))
    torch.testing.assert_close(run(q2, k2, v2), attention.attention_fp8_reference(q2, k2, v2), rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------------------------


def _worker_args(**overrides) -> argparse.Namespace:
    from diffserve.worker.__main__ import parse_args

    args = parse_args(["--scheduler", "tcp://127.0.0.1:1", "--model-path", "/m"])
    return argparse.Namespace(**{**vars(args), **overrides})


def test_worker_quantizes_the_loaded_pipeline_and_its_card_says_so(tiny_wan):
    from diffserve.worker.__main__ import quantize
    from diffserve.worker.card import model_card
    from diffserve.worker.parallel import ParallelState
    from diffserve.worker.registry import load_pipeline

    cpu = torch.device("cpu")
    pipeline = load_pipeline(tiny_wan, "tiny", cpu, torch.float32)
    assert list(model_card(pipeline).quantizations) == []
    assert quantize(_worker_args(quantization="fp8"), pipeline, ParallelState.single(), cpu, torch.float32) is None
    assert list(model_card(pipeline).quantizations) == ["fp8"]
    assert isinstance(pipeline.transformer.blocks[0].ffn.net[2], FP8Linear)
    # FA3-FP8 cannot run on this CPU: the worker refuses to start, naming why
    problem = quantize(_worker_args(attention_backend="fa3-fp8"), pipeline, ParallelState.single(), cpu, torch.float32)
    assert problem and "fa3-fp8 cannot run on cpu" in problem


def test_fp8_with_tensor_parallelism_is_refused():
    from diffserve.worker.__main__ import quantize
    from diffserve.worker.parallel import ParallelState
    from diffserve.worker.parallel.state import ParallelDims

    problem = quantize(_worker_args(quantization="fp8"), object(), ParallelState(ParallelDims(tp=2)), torch.device("cpu"), torch.float32)
    assert "tensor parallelism" in problem


# ---------------------------------------------------------------------------------------------
# Triton's CPU interpreter
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_fp8_kernels_match_their_references_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr


def _codes_agree(name: str, q, s, q_ref, s_ref, exact, float_math_differs: bool = False) -> bool:
    """Scales equal (or within float32 rounding where the kernel's float32 math differs from torch's:
    a norm's sums in another order, GELU's tanh), codes equal, except where the interpreter's float32 ->
    e4m3 cast (numpy) differs from a hardware one: it rounds exact ties away from zero (336 -> 352, not
    320), fails to carry a rounding into the next power of two (126.9 -> 64, not 128) and rounds some
    subnormals (below 2^-6) one step toward zero (0.00174 -> 0, not 2^-9). Those are counted apart, and
    so are neighbouring codes where the float32 math differs. On the GPU the cast is the hardware's
    round-to-nearest-even, and bench/fp8_forward.py's check rows compare bit for bit."""
    same_scale = torch.equal(s, s_ref) if not float_math_differs else torch.allclose(s, s_ref, rtol=1e-5, atol=0)
    got, want = q.float(), q_ref.float()
    differ = got != want
    tie = exact == (got + want) / 2
    carry = (got * 2 == want) & (torch.log2(want.abs()) == torch.log2(want.abs()).round())
    carry |= (exact.abs() < 2**-6) & ((got - want).abs() == 2**-9)  # a subnormal one step off
    codes, codes_ref = q.view(torch.uint8).int(), q_ref.view(torch.uint8).int()
    neighbour = ((codes ^ codes_ref) < 128) & ((codes - codes_ref).abs() == 1) if float_math_differs else torch.zeros_like(differ)
    mismatch = int((differ & ~tie & ~carry & ~neighbour).sum())
    ok = same_scale and mismatch == 0 and q.shape == q_ref.shape and q.dtype == q_ref.dtype == fp8.FP8
    print(f"{'ok  ' if ok else 'FAIL'} {name}: scales {'equal' if same_scale else 'DIFFER'}, codes differing {mismatch} "
          f"(interpreter casts: {int((differ & tie).sum())} ties, {int((differ & carry).sum())} carries or subnormals; "
          f"{int((differ & neighbour & ~tie & ~carry).sum())} neighbours of {q.numel()})")
    return ok


def _interpreter_check() -> int:
    """Each FP8 launcher against its reference on CPU tensors; prints one line per case."""
    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        tag = str(dtype).removeprefix("torch.")
        x = _rows().to(dtype)[:, :40]  # 40: a row narrower than its power-of-two block
        x = torch.cat([x, x[:, :3] * 1.3], dim=1)[:, 1:]  # a strided view: rows are read through their stride
        q, s = fp8.quantize_rows_triton(x)
        q_ref, s_ref = fp8.quantize_rows_reference(x)
        ok &= _codes_agree(f"quantize_rows {tag}", q, s, q_ref, s_ref, x.float() / s_ref)

        # the norms with modulation (per token, broadcast, none), quantized in registers
        x, shift, scale, w, b = _norm_input(dtype)
        for name, args, rms in (("layer_norm affine+mod per token", (x, w, b, 1e-6, shift, scale), False),
                                ("layer_norm+mod broadcast", (x, None, None, 1e-6, shift[:, :1], scale[:, :1]), False),
                                ("rms_norm weight+mod", (x, w, None, 1e-6, shift, scale), True),
                                ("rms_norm plain", (x, w, None, 1e-6, None, None), True)):
            rows = fp8.norm_fp8_triton(*args, rms=rms)
            y = (norm.rms_norm_reference(x.float(), w, 1e-6, *args[4:]) if rms
                 else norm.layer_norm_reference(x.float(), *args[1:]))
            q_ref, s_ref = fp8.quantize_rows_reference(y)
            ok &= rows.dtype == dtype and _codes_agree(f"{name} {tag}", rows.data, rows.scale, q_ref, s_ref, y / s_ref, True)

        # packed requests: one modulation row per request, picked per token by an index (int32, int64)
        xp, p_shift, p_scale, index, spread = _packed_norm_input(dtype)
        for name, idx, rms in (("layer_norm+mod indexed", index, False), ("rms_norm+mod indexed", index, True),
                               ("layer_norm+mod indexed, int64 index", index.long(), False)):
            rows = fp8.norm_fp8_triton(xp, w, None, 1e-6, p_shift, p_scale, rms=rms, index=idx)
            y = (norm.rms_norm_reference(xp.float(), w, 1e-6, spread(p_shift), spread(p_scale)) if rms
                 else norm.layer_norm_reference(xp.float(), w, None, 1e-6, spread(p_shift), spread(p_scale)))
            q_ref, s_ref = fp8.quantize_rows_reference(y)
            ok &= rows.dtype == dtype and _codes_agree(f"{name} {tag}", rows.data, rows.scale, q_ref, s_ref, y / s_ref, True)

        # GELU(tanh) with and without bias, 80 wide (a 128 block)
        g = torch.Generator().manual_seed(9)
        h, bias = (torch.randn(5, 80, generator=g) * 3).to(dtype), torch.randn(80, generator=g).to(dtype)
        for bb in (None, bias):
            rows = fp8.gelu_tanh_fp8_triton(h, bb)
            y = activation.gelu_tanh_reference(h.float(), bb.float() if bb is not None else None)
            q_ref, s_ref = fp8.quantize_rows_reference(y)
            ok &= _codes_agree(f"gelu_tanh {'+bias ' if bb is not None else ''}{tag}", rows.data, rows.scale, q_ref, s_ref, y / s_ref, True)

    # per-(batch, head) amax + quantization: a strided view (split out of a longer sequence, a head
    # dropped), magnitudes per head, a zero head; 2080 tokens: 65 tiles of 32, at most 32 partial maxima,
    # so 4 tiles per partial and a last one past the end
    g = torch.Generator().manual_seed(10)
    big = torch.randn(2, 2100, 4, 16, generator=g) * torch.tensor([1.0, 7.0, 1e-3, 300.0])[None, None, :, None]
    big[1, :, 2] = 0.0
    for dtype, x in ((torch.bfloat16, big.to(torch.bfloat16)[:, 10:2090, 1:]), (torch.float32, _heads_input())):
        q, s = fp8.quantize_heads_triton(x, max_parts=32)
        q_ref, s_ref = fp8.quantize_heads_reference(x)
        ok &= s.shape == s_ref.shape and q.is_contiguous()
        ok &= _codes_agree(f"quantize_heads {tuple(x.shape)} {str(dtype).removeprefix('torch.')}", q, s, q_ref, s_ref,
                           x.float() / s_ref[:, None, :, None])
    return 0 if ok else 1


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through test_triton_fp8_kernels_match_their_references_in_interpreter"
    sys.exit(_interpreter_check())
