"""Gated residual add of the AdaLN blocks: out = x + y * gate, in float32, stored in x's dtype.

Wan writes it `(x.float() + y * gate).type_as(x)`, FLUX / Qwen-Image / HunyuanVideo `x + gate * y`
in the model dtype; `gated_residual` computes both in float32 and rounds once. The Triton kernel
reads x, y and gate once each and writes the result once (torch: three kernels, two temporaries).
Packed requests (mixed-shape batching) pass one gate row per request, (N, 1, D), and `index`, each
token's row ((B * L,) int), as the norm kernels take their modulation (kernels/norm.py).
"""

from __future__ import annotations

import torch

from diffserve.kernels.norm import check_index, modulation_rows, per_token, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def gated_residual_reference(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """(x.float() + y.float() * gate.float()) as x's dtype (with `index`, each token's gate row gathered)."""
    return (x.float() + y.float() * per_token(gate, index, x.shape).float()).to(x.dtype)


if triton is not None:

    @triton.jit
    def _gated_residual_kernel(
        x_ptr, y_ptr, g_ptr, idx_ptr, out_ptr,
        L, D,
        sx_b, sx_l, sy_b, sy_l, sg_b, sg_l,
        HAS_INDEX: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # token index in [0, B * L)
        b = row // L
        l = row % L
        gb, gl = b, l  # where the token's gate is: (b, l), or (its request's row, 0) when packed
        if HAS_INDEX:
            gb = tl.load(idx_ptr + row).to(tl.int64)
            gl = 0
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < D
        x = tl.load(x_ptr + b * sx_b + l * sx_l + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + b * sy_b + l * sy_l + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + gb * sg_b + gl * sg_l + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * D + cols, (x + y * g).to(out_ptr.dtype.element_ty), mask=mask)


def _view(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    t = t.expand(shape)
    return t if t.stride(-1) == 1 else t.contiguous()


def gated_residual_triton(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton path of `gated_residual`; x, y (B, L, D), gate broadcastable to them, or with
    `index` (N, 1, D) rows, token t reading row index[t]."""
    assert x.ndim == 3 and y.shape == x.shape, f"x {tuple(x.shape)} and y {tuple(y.shape)} must be the same (B, L, D)"
    if index is not None:
        check_index(index, x)
    x, y = _view(x, x.shape), _view(y, x.shape)
    gate, sg_b, sg_l = modulation_rows(gate, x, index is not None)
    b, l, d = x.shape
    out = torch.empty((b, l, d), dtype=x.dtype, device=x.device)
    block = min(triton.next_power_of_2(d), 1024)
    _gated_residual_kernel[(b * l, triton.cdiv(d, block))](
        x, y, gate, x if index is None else index, out, l, d,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), sg_b, sg_l,
        HAS_INDEX=index is not None, BLOCK=block, num_warps=4,
    )
    return out


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """x + y * gate in float32, returned in x's dtype.

    x, y: (B, L, D) (any dtypes); gate: broadcastable to them, e.g. (B, 1, D) or (B, L, D), or with
    `index` ((B * L,) int, packed requests) one row per request, (N, 1, D), token t reading row index[t].
    """
    if use_triton(x, y, gate) and x.ndim == 3 and y.shape == x.shape:
        return gated_residual_triton(x, y, gate, index)
    return gated_residual_reference(x, y, gate, index)
