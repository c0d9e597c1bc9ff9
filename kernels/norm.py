"""LayerNorm and RMSNorm over the last dim in float32, optionally fused with AdaLN modulation.

    y = norm(x) * (1 + scale) + shift        (each part optional; result in x's dtype)

`layer_norm` / `rms_norm` are the dispatch functions: a Triton kernel (one program per token, the
whole row in registers) for CUDA tensors, else the torch reference, which is also the math the
models ran before the kernel existed. shift/scale broadcast over tokens, (B, 1, D), or come per
token, (B, L, D); they are read through their strides, so the views the models slice out of one
modulation tensor are used in place. Packed requests (mixed-shape batching) give one row per request,
(N, 1, D), and `index`, each token's row ((B * L,) int): the kernel reads that row for the token,
so no per-token copy of the modulation is made (the reference gathers one).

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


def per_token(t: torch.Tensor | None, index: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """Per-request rows (N, 1, D) -> each token's row as (B, L, D) (`shape`), by `index` ((B * L,) int,
    token -> row). The references' way to read packed modulation; without index, t as it is."""
    if t is None or index is None:
        return t
    assert t.ndim == 3 and t.shape[1] == 1, f"with an index, one row per request (N, 1, D), got {tuple(t.shape)}"
    return t[:, 0].index_select(0, index).view(shape)


def check_index(index: torch.Tensor, x: torch.Tensor) -> None:
    """What the kernels read through an index: one contiguous integer row number per token of x (B, L, D)."""
    ok = index.shape == (x.shape[0] * x.shape[1],) and index.is_contiguous() and not index.is_floating_point()
    assert x.ndim == 3 and ok, (
        f"index must hold one row number per token of x {tuple(x.shape)}, got {tuple(index.shape)} {index.dtype}")


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
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """F.layer_norm on x.float() with float32 weight/bias (FP32LayerNorm), then modulation, as x's dtype."""
    weight = weight.float() if weight is not None else None
    bias = bias.float() if bias is not None else None
    y = F.layer_norm(x.float(), x.shape[-1:], weight, bias, eps)
    return _modulated(y, per_token(shift, index, x.shape), per_token(scale, index, x.shape)).to(x.dtype)


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight in float32, then modulation, as x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return _modulated(y, per_token(shift, index, x.shape), per_token(scale, index, x.shape)).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def norm_row(
        x_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, idx_ptr, row, cols,
        L, eps,
        sx_b, sx_l, ssh_b, ssh_l, ssc_b, ssc_l,
        D: tl.constexpr, RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
        HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INDEX: tl.constexpr,
    ):
        """Token `row` (in [0, B * L)) normalized and modulated in float32: (BLOCK_D,), zero past D; with
        HAS_INDEX its modulation is row idx[row] of (N, 1, D) (packed requests). `_norm_kernel` stores it
        in x's dtype; kernels/fp8.py's `_norm_fp8_kernel` quantizes it to FP8."""
        b = row // L
        l = row % L
        mb, ml = b, l  # where the token's modulation is: (b, l), or (its request's row, 0) when packed
        if HAS_INDEX:
            mb = tl.load(idx_ptr + row).to(tl.int64)
            ml = 0
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
            y = y * (1.0 + tl.load(scale_ptr + mb * ssc_b + ml * ssc_l + cols, mask=mask, other=0.0).to(tl.float32))
        if HAS_SHIFT:
            y = y + tl.load(shift_ptr + mb * ssh_b + ml * ssh_l + cols, mask=mask, other=0.0).to(tl.float32)
        return tl.where(mask, y, 0.0)

    @triton.jit
    def _norm_kernel(
        x_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, idx_ptr, out_ptr,
        L, eps,
        sx_b, sx_l, ssh_b, ssh_l, ssc_b, ssc_l,
        D: tl.constexpr, RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
        HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INDEX: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # token index in [0, B * L)
        cols = tl.arange(0, BLOCK_D)
        y = norm_row(x_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, idx_ptr, row, cols, L, eps, sx_b, sx_l, ssh_b, ssh_l, ssc_b, ssc_l,
                     D, RMS, HAS_W, HAS_B, HAS_SHIFT, HAS_SCALE, HAS_INDEX)
        tl.store(out_ptr + row * D + cols, y.to(out_ptr.dtype.element_ty), mask=cols < D)


def modulation_rows(t: torch.Tensor | None, x: torch.Tensor, indexed: bool = False) -> tuple[torch.Tensor | None, int, int]:
    """t broadcast to x (B, L, D) as a view with unit stride on D -> (view, stride_b, stride_l).
    `indexed`: t holds one row per request, (N, 1, D), picked per token by an index; stride_b steps rows."""
    if t is None:
        return None, 0, 0
    if indexed:
        assert t.ndim == 3 and t.shape[1] == 1 and t.shape[2] == x.shape[2], f"with an index, (N, 1, D) rows, got {tuple(t.shape)}"
    else:
        t = t.expand(x.shape)
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t, t.stride(0), t.stride(1)


def norm_tokens(x: torch.Tensor, modulated: bool) -> torch.Tensor:
    """x as the (B, L, D) view the norm kernels read: (1, N, D) unless modulated, unit stride on D."""
    if modulated:
        assert x.ndim == 3, f"modulated norm wants x as (B, L, D), got {tuple(x.shape)}"
        x3 = x
    else:
        x3 = x.reshape(1, -1, x.shape[-1])
    return x3 if x3.stride(-1) == 1 else x3.contiguous()


def launch_norm(kernel, outputs: tuple[torch.Tensor, ...], x3: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                eps: float, shift: torch.Tensor | None, scale: torch.Tensor | None, rms: bool, index: torch.Tensor | None = None,
                **constexprs) -> None:
    """One program per token of x3 (B, L, D): `_norm_kernel`, or a kernel with the same arguments whose
    output pointers are `outputs` and that adds `constexprs` (kernels/fp8.py's `_norm_fp8_kernel`).
    With `index` (packed requests) shift / scale are (N, 1, D) rows, token t reading row index[t];
    an unmodulated norm ignores it."""
    d = x3.shape[-1]
    if shift is None and scale is None:
        index = None
    if index is not None:
        check_index(index, x3)
    shift, ssh_b, ssh_l = modulation_rows(shift, x3, index is not None)
    scale, ssc_b, ssc_l = modulation_rows(scale, x3, index is not None)
    block = triton.next_power_of_2(d)
    kernel[(x3.shape[0] * x3.shape[1],)](
        x3, x3 if weight is None else weight, x3 if bias is None else bias,
        x3 if shift is None else shift, x3 if scale is None else scale, x3 if index is None else index, *outputs,
        x3.shape[1], eps,
        x3.stride(0), x3.stride(1), ssh_b, ssh_l, ssc_b, ssc_l,
        D=d, RMS=rms, HAS_W=weight is not None, HAS_B=bias is not None,
        HAS_SHIFT=shift is not None, HAS_SCALE=scale is not None, HAS_INDEX=index is not None, BLOCK_D=block,
        num_warps=min(max(block // 256, 1), 8), **constexprs,
    )


def norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    rms: bool,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton path of `layer_norm` / `rms_norm` (any device triton can launch on, incl. its
    CPU interpreter). x is (B, L, D) when modulated, else any (N..., D); with `index`, shift / scale
    are (N, 1, D) rows and index ((B * L,) int) each token's row."""
    x3 = norm_tokens(x, shift is not None or scale is not None)
    out = torch.empty(x3.shape, dtype=x.dtype, device=x.device)
    launch_norm(_norm_kernel, (out,), x3, weight, bias, eps, shift, scale, rms, index)
    return out.view(x.shape)


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------


def fits(x: torch.Tensor, weight: torch.Tensor | None, shift: torch.Tensor | None, scale: torch.Tensor | None) -> bool:
    """Shapes the norm kernels take (the rest runs the references)."""
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
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm over the last dim in float32 (affine optional), then `* (1 + scale) + shift` if given.

    x: (N..., D), or (B, L, D) when modulated; weight/bias: (D,); shift/scale broadcastable to x,
    e.g. (B, 1, D) or (B, L, D), or with `index` ((B * L,) int, packed requests) one row per request,
    (N, 1, D), token t reading row index[t]. Returns x's shape and dtype.
    """
    if use_triton(x, weight, bias, shift, scale) and fits(x, weight, shift, scale):
        return norm_triton(x, weight, bias, eps, shift, scale, rms=False, index=index)
    return layer_norm_reference(x, weight, bias, eps, shift, scale, index)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """RMSNorm over the last dim in float32 (weight optional), then `* (1 + scale) + shift` if given.
    Shapes (and `index`) as `layer_norm`."""
    if use_triton(x, weight, shift, scale) and fits(x, weight, shift, scale):
        return norm_triton(x, weight, None, eps, shift, scale, rms=True, index=index)
    return rms_norm_reference(x, weight, eps, shift, scale, index)
