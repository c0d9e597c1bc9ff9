"""LayerNorm and RMSNorm over the last dim in float32, optionally fused with AdaLN modulation.

    y = norm(x) * (1 + scale) + shift        (each part optional; result in x's dtype)

`layer_norm` / `rms_norm` are the dispatch functions: a Triton kernel (one program per token, the
whole row in registers) for CUDA tensors, else the torch reference, which is also the math the
models ran before the kernel existed. shift/scale broadcast over tokens, (B, 1, D), or come per
token, (B, L, D); they are read through their strides, so the views the models slice out of one
modulation tensor are used in place.

This module also holds `use_triton`, the dispatch rule every fused op in diffserve.kernels shares.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # CI and CPU-only machines have no triton: the references run there.
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MAX_TRITON_DIM = 16384  # the norm kernel holds a whole row in registers


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether a fused op runs its Triton kernel for these tensors (the first is the main input).

    Needs CUDA tensors and an importable triton. Inside torch.compile the references run instead:
    inductor fuses them into its own Triton kernels, and its graph stays free of opaque calls.
    The kernels are forward-only, so anything that needs a gradient takes the reference as well.
    """
    x = tensors[0]
    if triton is None or not x.is_cuda or x.numel() == 0 or torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------


def _modulated(y: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor | None) -> torch.Tensor:
    if scale is not None:
        y = y * (1 + scale.float())
    if shift is not None:
        y = y + shift.float()
    return y


def layer_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """F.layer_norm on x.float() with float32 weight/bias (FP32LayerNorm), then modulation, as x's dtype."""
    weight = weight.float() if weight is not None else None
    bias = bias.float() if bias is not None else None
    y = F.layer_norm(x.float(), x.shape[-1:], weight, bias, eps)
    return _modulated(y, shift, scale).to(x.dtype)


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight in float32, then modulation, as x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return _modulated(y, shift, scale).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _norm_kernel(
        x_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, out_ptr,
        L, eps,
        sx_b, sx_l, ssh_b, ssh_l, ssc_b, ssc_l,
        D: tl.constexpr, RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
        HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # token index in [0, B * L)
        b = row // L
        l = row % L
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        x = tl.load(x_ptr + b * sx_b + l * sx_l + cols, mask=mask, other=0.0).to(tl.float32)
        if RMS:
            y = x * tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        else:
            centred = tl.where(mask, x - tl.sum(x, axis=0) / D, 0.0)
            y = centred * tl.rsqrt(tl.sum(centred * centred, axis=0) / D + eps)
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            y = y * (1.0 + tl.load(scale_ptr + b * ssc_b + l * ssc_l + cols, mask=mask, other=0.0).to(tl.float32))
        if HAS_SHIFT:
            y = y + tl.load(shift_ptr + b * ssh_b + l * ssh_l + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * D + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor | None, x: torch.Tensor) -> tuple[torch.Tensor | None, int, int]:
    """t broadcast to x (B, L, D) as a view with unit stride on D -> (view, stride_b, stride_l)."""
    if t is None:
        return None, 0, 0
    t = t.expand(x.shape)
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t, t.stride(0), t.stride(1)


def norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    rms: bool,
) -> torch.Tensor:
    """The Triton path of `layer_norm` / `rms_norm` (any device triton can launch on, incl. its
    CPU interpreter). x is (B, L, D) when modulated, else any (N..., D)."""
    d = x.shape[-1]
    if shift is None and scale is None:
        x3 = x.reshape(1, -1, d)
    else:
        assert x.ndim == 3, f"modulated norm wants x as (B, L, D), got {tuple(x.shape)}"
        x3 = x
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    shift, ssh_b, ssh_l = _rows(shift, x3)
    scale, ssc_b, ssc_l = _rows(scale, x3)
    out = torch.empty(x3.shape, dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(d)
    _norm_kernel[(x3.shape[0] * x3.shape[1],)](
        x3, x3 if weight is None else weight, x3 if bias is None else bias,
        x3 if shift is None else shift, x3 if scale is None else scale, out,
        x3.shape[1], eps,
        x3.stride(0), x3.stride(1), ssh_b, ssh_l, ssc_b, ssc_l,
        D=d, RMS=rms, HAS_W=weight is not None, HAS_B=bias is not None,
        HAS_SHIFT=shift is not None, HAS_SCALE=scale is not None, BLOCK_D=block,
        num_warps=min(max(block // 256, 1), 8),
    )
    return out.view(x.shape)


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------


def _fits(x: torch.Tensor, weight: torch.Tensor | None, shift: torch.Tensor | None, scale: torch.Tensor | None) -> bool:
    d = x.shape[-1]
    modulated_ok = (shift is None and scale is None) or x.ndim == 3
    return d <= MAX_TRITON_DIM and modulated_ok and (weight is None or weight.shape == (d,))


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm over the last dim in float32 (affine optional), then `* (1 + scale) + shift` if given.

    x: (N..., D), or (B, L, D) when modulated; weight/bias: (D,); shift/scale broadcastable to x,
    e.g. (B, 1, D) or (B, L, D). Returns x's shape and dtype.
    """
    if use_triton(x, weight, bias, shift, scale) and _fits(x, weight, shift, scale):
        return norm_triton(x, weight, bias, eps, shift, scale, rms=False)
    return layer_norm_reference(x, weight, bias, eps, shift, scale)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """RMSNorm over the last dim in float32 (weight optional), then `* (1 + scale) + shift` if given.
    Shapes as `layer_norm`."""
    if use_triton(x, weight, shift, scale) and _fits(x, weight, shift, scale):
        return norm_triton(x, weight, None, eps, shift, scale, rms=True)
    return rms_norm_reference(x, weight, eps, shift, scale)
