"""FP8 (float8_e4m3fn) quantization and scaled matmul: the math behind `--quantization fp8` and
the `fa3-fp8` attention backend.

    quantize:   q = round_e4m3(clamp(x / s, -448, 448)),  s = max(amax(|x|), SCALE_FLOOR) / 448
    dequantize: x ≈ q * s

Two granularities:
- rows (`quantize_rows`): one scale per row (the last dim is the row). Weights (out, in) get one scale
  per output channel, activations (tokens, in) one per token, computed at run time (dynamic). A token's
  quantization then depends on that token alone: batching, packing or sequence-parallel sharding
  leave it unchanged, and one outlier token does not flatten every other token's precision.
- heads (`quantize_heads`): one scale per (batch row, head) over all its tokens and channels: q / k / v
  of FP8 attention, whose FA3 kernel takes one descale per (batch, kv head). A request's attention
  then depends on its own row alone, and Ulysses (which gives each rank whole heads) sees the scales
  a single GPU sees.

Activations for FP8 linears can come quantized out of the kernel that produces them (`FP8Rows`):
the norms with their AdaLN modulation (`layer_norm_fp8` / `rms_norm_fp8`, kernels/norm.py's row
math, packed requests' `index` included) and GELU(tanh) (`gelu_tanh_fp8`, kernels/activation.py's) write each row as e4m3 with its scale
from the float32 row in registers: the bf16 activation is never written. `quantize_rows` is the
stand-alone pass for the other inputs (attention outputs, concatenations). Each has a torch
reference (the CPU path, and what torch.compile traces): the producer's float32 math, then
`quantize_rows_reference`.

`quantize_heads` is two light kernels: a max over token blocks per (batch, head) into at most
MAX_PARTS partial maxima, then the quantization, each program reducing its head's partials to the
scale first (no host synchronisation, no third launch): two reads of the bf16 tensor, one e4m3 write.

`fp8_linear` is (q_x * s_x) @ (q_w * s_w).T + bias through `torch._scaled_mm` where it runs
(CUDA sm89+ with a bf16 output: row-wise scales; torch's CPU build), else `fp8_linear_reference`,
the same math dequantized in float32.

Rounding: e4m3 keeps 3 mantissa bits, so a normal value's rounding error is at most 1/16 of it
(2^-4 relative), and values below 2^-6 of the scale (subnormal) are off by at most s * 2^-10.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffserve.kernels import activation, norm
from diffserve.kernels.norm import MAX_TRITON_DIM, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(FP8).max
SCALE_FLOOR = 1e-12  # an all-zero row or tensor gets this scale (and quantizes to zeros) instead of 0
# cuBLASLt's fast FP8 accumulation (Hopper) trades some accumulation precision for speed; off until
# bench/fp8_forward.py --fast-accum measures what it buys.
FAST_ACCUM = False
# `quantize_heads`: at most this many partial maxima per (batch, head), a power of two. 128: Wan2.1-1.3B's
# 32,760 tokens make 1,536 max programs (~3 waves on 132 SMs), and a quantize program reads 512 bytes of them.
MAX_PARTS = 128


@dataclass(frozen=True)
class FP8Rows:
    """An activation quantized row-wise for an FP8 linear (worker/models/fp8.py FP8Linear takes it in
    place of the tensor): it stands for `data * scale` in `dtype`.

    data (N..., K) float8_e4m3fn, scale (N..., 1) float32, dtype: the activation's dtype (the linear's
    output dtype)."""

    data: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def dequantize(self) -> torch.Tensor:
        return (self.data.float() * self.scale).to(self.dtype)


# ---------------------------------------------------------------------------------------------
# Row-wise quantization, stand-alone and fused into its producers
# ---------------------------------------------------------------------------------------------


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N..., K) -> (q (N..., K) float8_e4m3fn, scale (N..., 1) float32), x ≈ q * scale per row."""
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True).clamp(min=SCALE_FLOOR) / FP8_MAX
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


if triton is not None:

    @triton.jit
    def _store_row_fp8(y, cols, mask, q_ptr, scale_ptr, row, K, FLOOR: tl.constexpr, QMAX: tl.constexpr):
        """Row `row` (float32 y, zero where masked) as e4m3 codes at q_ptr + row * K and its scale at
        scale_ptr + row, in the reference's order of operations."""
        scale = tl.maximum(tl.max(tl.abs(y), axis=0), FLOOR) / QMAX
        q = tl.minimum(tl.maximum(y / scale, -QMAX), QMAX)
        tl.store(q_ptr + row * K + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + row, scale)

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, K, stride_x, FLOOR: tl.constexpr, QMAX: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < K
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        _store_row_fp8(x, cols, mask, q_ptr, scale_ptr, row, K, FLOOR, QMAX)

    @triton.jit
    def _norm_fp8_kernel(
        x_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, idx_ptr, q_ptr, qscale_ptr,
        L, eps,
        sx_b, sx_l, ssh_b, ssh_l, ssc_b, ssc_l,
        D: tl.constexpr, RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
        HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INDEX: tl.constexpr, BLOCK_D: tl.constexpr,
        FLOOR: tl.constexpr, QMAX: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # token index in [0, B * L)
        cols = tl.arange(0, BLOCK_D)
        y = norm.norm_row(x_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, idx_ptr, row, cols, L, eps, sx_b, sx_l, ssh_b, ssh_l, ssc_b, ssc_l,
                          D, RMS, HAS_W, HAS_B, HAS_SHIFT, HAS_SCALE, HAS_INDEX)
        _store_row_fp8(y, cols, cols < D, q_ptr, qscale_ptr, row, D, FLOOR, QMAX)

    @triton.jit
    def _gelu_tanh_fp8_kernel(x_ptr, bias_ptr, q_ptr, scale_ptr, N, stride_x, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
                              FLOOR: tl.constexpr, QMAX: tl.constexpr):
        # The whole row in registers (its scale needs its maximum): one read of x, one e4m3 write.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            h = h + tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        _store_row_fp8(activation.gelu_tanh_f32(h), cols, mask, q_ptr, scale_ptr, row, N, FLOOR, QMAX)


def _row_warps(block: int) -> int:
    # Rows of 8k+ values: 16 warps hold them in ~100 registers a thread (8 warps took ~170-200, one
    # 8-warp program per SM; offline sm90 compile, cuobjdump).
    return 16 if block >= 8192 else min(max(block // 256, 1), 8)


def _rows_2d(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def quantize_rows_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path of `quantize_rows`; x (N..., K) with K <= MAX_TRITON_DIM."""
    k = x.shape[-1]
    x2 = _rows_2d(x)
    q = torch.empty(x2.shape, dtype=FP8, device=x.device)
    scale = torch.empty(x2.shape[0], 1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(k)
    _quantize_rows_kernel[(x2.shape[0],)](x2, q, scale, k, x2.stride(0), FLOOR=SCALE_FLOOR, QMAX=FP8_MAX, BLOCK=block,
                                          num_warps=_row_warps(block))
    return q.view(x.shape), scale.view(*x.shape[:-1], 1)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise (per token / per output channel) quantization: x (N..., K) -> (q (N..., K) float8_e4m3fn,
    scale (N..., 1) float32). The Triton kernel on CUDA, the reference elsewhere."""
    if use_triton(x) and x.shape[-1] <= MAX_TRITON_DIM:
        return quantize_rows_triton(x)
    return quantize_rows_reference(x)


def _rows_of(y: torch.Tensor, dtype: torch.dtype) -> FP8Rows:
    return FP8Rows(*quantize_rows_reference(y), dtype)


def norm_fp8_triton(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                    shift: torch.Tensor | None, scale: torch.Tensor | None, rms: bool, index: torch.Tensor | None = None) -> FP8Rows:
    """The Triton path of `layer_norm_fp8` / `rms_norm_fp8`: kernels/norm.py's row, quantized in registers
    (`index`: packed requests' modulation rows, as `norm.norm_triton` takes them)."""
    x3 = norm.norm_tokens(x, shift is not None or scale is not None)
    q = torch.empty(x3.shape, dtype=FP8, device=x.device)
    q_scale = torch.empty(*x3.shape[:-1], 1, dtype=torch.float32, device=x.device)
    norm.launch_norm(_norm_fp8_kernel, (q, q_scale), x3, weight, bias, eps, shift, scale, rms, index, FLOOR=SCALE_FLOOR, QMAX=FP8_MAX)
    return FP8Rows(q.view(x.shape), q_scale.view(*x.shape[:-1], 1), x.dtype)


def layer_norm_fp8(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5,
                   shift: torch.Tensor | None = None, scale: torch.Tensor | None = None, index: torch.Tensor | None = None) -> FP8Rows:
    """`norm.layer_norm` (modulation included) with its float32 rows quantized for an FP8 linear
    instead of rounded to x's dtype. Shapes (and `index`) as `norm.layer_norm`; FP8Rows of x's shape."""
    if use_triton(x, weight, bias, shift, scale) and norm.fits(x, weight, shift, scale):
        return norm_fp8_triton(x, weight, bias, eps, shift, scale, rms=False, index=index)
    return _rows_of(norm.layer_norm_reference(x.float(), weight, bias, eps, shift, scale, index), x.dtype)


def rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6,
                 shift: torch.Tensor | None = None, scale: torch.Tensor | None = None, index: torch.Tensor | None = None) -> FP8Rows:
    """`norm.rms_norm` with its float32 rows quantized for an FP8 linear (as `layer_norm_fp8`, `index` too)."""
    if use_triton(x, weight, shift, scale) and norm.fits(x, weight, shift, scale):
        return norm_fp8_triton(x, weight, None, eps, shift, scale, rms=True, index=index)
    return _rows_of(norm.rms_norm_reference(x.float(), weight, eps, shift, scale, index), x.dtype)


def gelu_tanh_fp8_triton(x: torch.Tensor, bias: torch.Tensor | None = None) -> FP8Rows:
    """The Triton path of `gelu_tanh_fp8`; x (N..., C) with C <= MAX_TRITON_DIM."""
    n = x.shape[-1]
    x2 = _rows_2d(x)
    q = torch.empty(x2.shape, dtype=FP8, device=x.device)
    q_scale = torch.empty(x2.shape[0], 1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(n)
    _gelu_tanh_fp8_kernel[(x2.shape[0],)](x2, x2 if bias is None else bias, q, q_scale, n, x2.stride(0), HAS_BIAS=bias is not None,
                                          BLOCK=block, FLOOR=SCALE_FLOOR, QMAX=FP8_MAX, num_warps=_row_warps(block))
    return FP8Rows(q.view(x.shape), q_scale.view(*x.shape[:-1], 1), x.dtype)


def gelu_tanh_fp8(x: torch.Tensor, bias: torch.Tensor | None = None) -> FP8Rows:
    """`activation.gelu_tanh(x, bias)` with its float32 rows quantized for an FP8 linear (the input of
    an MLP's second linear). x (N..., C); bias (C,) or None; FP8Rows of x's shape."""
    if use_triton(x, bias) and x.shape[-1] <= MAX_TRITON_DIM and (bias is None or bias.shape == x.shape[-1:]):
        return gelu_tanh_fp8_triton(x, bias if bias is None else bias.contiguous())
    return _rows_of(activation.gelu_tanh_reference(x.float(), bias.float() if bias is not None else None), x.dtype)


# ---------------------------------------------------------------------------------------------
# Per-(batch, head) quantization (FP8 attention)
# ---------------------------------------------------------------------------------------------


def quantize_heads_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, L, H, D) -> (q (B, L, H, D) float8_e4m3fn, scale (B, H) float32), x ≈ q * scale[:, None, :, None]:
    one scale per batch row and head, over its tokens and channels."""
    xf = x.float()
    scale = xf.abs().amax(dim=(1, 3)).clamp(min=SCALE_FLOOR) / FP8_MAX  # (B, H)
    return (xf / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


if triton is not None:

    @triton.jit
    def _amax_heads_kernel(x_ptr, part_ptr, L, sx_b, sx_l, sx_h, H: tl.constexpr, D: tl.constexpr, PARTS: tl.constexpr,
                           TILES_PER_PART: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
        # Program (part, h, b): the max of |x| over TILES_PER_PART blocks of BLOCK_L tokens of head h.
        # (A constexpr trip count, a power of two: few compiled variants, and triton's CPU interpreter
        # cannot loop to a run-time scalar.)
        part = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)
        b = tl.program_id(2).to(tl.int64)
        tokens = tl.arange(0, BLOCK_L)[:, None]  # (BLOCK_L, 1)
        d = tl.arange(0, BLOCK_D)[None, :]  # (1, BLOCK_D)
        in_tile = tokens * sx_l + d  # int32 offsets inside a tile; the tile's base is int64
        acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
        for i in range(0, TILES_PER_PART):
            first = (part * TILES_PER_PART + i) * BLOCK_L
            base = x_ptr + b * sx_b + first.to(tl.int64) * sx_l + h * sx_h
            x = tl.load(base + in_tile, mask=(first + tokens < L) & (d < D), other=0.0).to(tl.float32)
            acc = tl.maximum(acc, tl.abs(x))
        tl.store(part_ptr + (b * H + h) * PARTS + part, tl.max(tl.max(acc, axis=1), axis=0))

    @triton.jit
    def _quantize_heads_kernel(x_ptr, part_ptr, q_ptr, scale_ptr, L, parts, sx_b, sx_l, sx_h,
                               H: tl.constexpr, D: tl.constexpr, PARTS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                               FLOOR: tl.constexpr, QMAX: tl.constexpr):
        # Program (tile, h, b): head h's scale from its partial maxima, then BLOCK_L of its tokens as e4m3.
        tile = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)
        b = tl.program_id(2).to(tl.int64)
        p = tl.arange(0, PARTS)
        amax = tl.max(tl.load(part_ptr + (b * H + h) * PARTS + p, mask=p < parts, other=0.0), axis=0)
        scale = tl.maximum(amax, FLOOR) / QMAX  # the reference's order of operations
        if tile == 0:
            tl.store(scale_ptr + b * H + h, scale)
        first = tile * BLOCK_L
        tokens = tl.arange(0, BLOCK_L)[:, None]  # (BLOCK_L, 1)
        d = tl.arange(0, BLOCK_D)[None, :]  # (1, BLOCK_D)
        mask = (first + tokens < L) & (d < D)
        # int64 tile bases, int32 offsets inside the tile (int64 per element took ~150 registers a thread)
        x = tl.load(x_ptr + (b * sx_b + first.to(tl.int64) * sx_l + h * sx_h) + (tokens * sx_l + d), mask=mask, other=0.0)
        q = tl.minimum(tl.maximum(x.to(tl.float32) / scale, -QMAX), QMAX)
        q_base = q_ptr + ((b * L + first) * H + h) * D  # q: (B, L, H, D) contiguous
        tl.store(q_base + (tokens * (H * D) + d), q.to(q_ptr.dtype.element_ty), mask=mask)


HEADS_BLOCK_L = 32  # tokens per program of the `quantize_heads` kernels: (32, 128) tiles of a 128-wide head


def quantize_heads_triton(x: torch.Tensor, max_parts: int = MAX_PARTS) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path of `quantize_heads`: x (B, L, H, D), read through its strides (a view split out
    of a packed sequence is fine) with unit stride on D; q is written contiguous (what FA3 reads).
    max_parts: a power of two (tests lower it to loop over several tiles per partial maximum)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    b, l, h, d = x.shape
    tiles = triton.cdiv(l, HEADS_BLOCK_L)
    tiles_per_part = triton.next_power_of_2(triton.cdiv(tiles, max_parts))
    parts = triton.cdiv(tiles, tiles_per_part)  # <= max_parts
    partial = torch.empty(b, h, max_parts, dtype=torch.float32, device=x.device)
    q = torch.empty((b, l, h, d), dtype=FP8, device=x.device)
    scale = torch.empty(b, h, dtype=torch.float32, device=x.device)
    meta = dict(H=h, D=d, PARTS=max_parts, BLOCK_L=HEADS_BLOCK_L, BLOCK_D=triton.next_power_of_2(d), num_warps=4)
    strides = (x.stride(0), x.stride(1), x.stride(2))
    _amax_heads_kernel[(parts, h, b)](x, partial, l, *strides, TILES_PER_PART=tiles_per_part, **meta)
    _quantize_heads_kernel[(tiles, h, b)](x, partial, q, scale, l, parts, *strides, FLOOR=SCALE_FLOOR, QMAX=FP8_MAX, **meta)
    return q, scale


def quantize_heads(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(batch, head) quantization of attention inputs: x (B, L, H, D) -> (q (B, L, H, D) float8_e4m3fn,
    contiguous, scale (B, H) float32). The scale stays on x's device (no host synchronisation). The
    Triton kernels on CUDA, the reference elsewhere."""
    if use_triton(x) and x.ndim == 4 and x.shape[-1] <= 256 and x.shape[1] > 0:
        return quantize_heads_triton(x)
    return quantize_heads_reference(x)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q * scale in float32 (scale broadcast: (N..., 1) row-wise; per head: scale[:, None, :, None])."""
    return q.float() * scale


# ---------------------------------------------------------------------------------------------
# Scaled matmul
# ---------------------------------------------------------------------------------------------


def scaled_mm_runs(device: torch.device, out_dtype: torch.dtype) -> bool:
    """Whether `torch._scaled_mm` takes row-wise scales here: CUDA from sm89 (Ada, Hopper) with a bf16
    output, or torch's CPU build (any float output). Elsewhere `fp8_linear` runs the reference."""
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return out_dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 9)
    return False


def fp8_linear_reference(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                         bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """`fp8_linear` dequantized: (x_q * x_scale) @ (w_q * w_scale).T + bias in float32, cast to out_dtype."""
    w = w_q.float() * w_scale.reshape(-1, 1)  # (N, K)
    return F.linear(dequantize(x_q, x_scale), w, bias.float() if bias is not None else None).to(out_dtype)


def fp8_linear(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """x_q (M, K) float8 with x_scale (M, 1) per row, w_q (N, K) float8 with w_scale (1, N) per output
    channel, bias (N,) or None -> (M, N) in out_dtype. K and N must be multiples of 16 (cuBLASLt's
    FP8 GEMM; `worker/models/fp8.py` quantizes only such layers)."""
    if not scaled_mm_runs(x_q.device, out_dtype):
        return fp8_linear_reference(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    if bias is not None and bias.dtype != out_dtype:
        bias = bias.to(out_dtype)
    return torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale.reshape(1, -1), bias=bias, out_dtype=out_dtype,
                            use_fast_accum=FAST_ACCUM and x_q.is_cuda)
