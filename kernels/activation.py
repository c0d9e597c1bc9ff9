"""GELU with the tanh approximation (diffusers' "gelu-approximate"), optionally after a bias add.

    gelu_tanh(x, bias) = 0.5 * h * (1 + tanh(sqrt(2 / pi) * (h + 0.044715 * h^3))),  h = x + bias

in float32, stored in x's dtype: torch's formula, constant for constant. The bias form is for
a GEMM run without its bias (saves one read and write of the activation over `linear` + `gelu`).
`linear_gelu_tanh` goes one step further on CUDA: the GEMM's epilogue applies bias and GELU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from diffserve.kernels.norm import use_triton

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:
    triton = None

BETA = math.sqrt(2.0 / math.pi)
KAPPA = 0.044715


def gelu_tanh_reference(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.gelu(x + bias, approximate="tanh"), in x's dtype."""
    if bias is not None:
        x = x + bias
    return F.gelu(x, approximate="tanh")


if triton is not None:
    # The CPU interpreter runs tl.math only; on the GPU libdevice's tanhf is CUDA's (what torch uses).
    _INTERPRET = tl.constexpr(bool(triton.knobs.runtime.interpret))
    _BETA, _KAPPA = tl.constexpr(BETA), tl.constexpr(KAPPA)  # jit code reads only constexpr globals

    @triton.jit
    def _tanh(u):
        if _INTERPRET:
            return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)
        else:
            return libdevice.tanh(u)

    @triton.jit
    def gelu_tanh_f32(h):
        """GELU(tanh) of a float32 block (the formula of this module's docstring). Shared with
        kernels/fp8.py's `_gelu_tanh_fp8_kernel`."""
        inner = _BETA * (h + _KAPPA * (h * h * h))
        return 0.5 * h * (1.0 + _tanh(inner))

    @triton.jit
    def _gelu_tanh_kernel(x_ptr, bias_ptr, out_ptr, N, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        h = tl.load(x_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            h = h + tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * N + cols, gelu_tanh_f32(h).to(out_ptr.dtype.element_ty), mask=mask)


def gelu_tanh_triton(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton path of `gelu_tanh`; x (N..., C), bias (C,) or None."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    out = torch.empty_like(x2)
    block = min(triton.next_power_of_2(n), 1024)
    _gelu_tanh_kernel[(x2.shape[0], triton.cdiv(n, block))](
        x2, x2 if bias is None else bias, out, n, HAS_BIAS=bias is not None, BLOCK=block, num_warps=4
    )
    return out.view(x.shape)


def gelu_tanh(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """GELU(tanh) of x (+ bias over the last dim), float32 inside, x's shape and dtype out.

    x: (N..., C); bias: (C,) or None.
    """
    if use_triton(x, bias) and (bias is None or bias.shape == x.shape[-1:]):
        return gelu_tanh_triton(x, bias if bias is None else bias.contiguous())
    return gelu_tanh_reference(x, bias)


def _epilogue_fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """cuBLASLt's GELU epilogue: CUDA half / bf16 GEMMs with a bias, not under autograd or torch.compile
    (inductor fuses the reference itself)."""
    if bias is None or not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16) or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, bias)):
        return False
    return x.numel() > x.shape[-1] and weight.dtype == bias.dtype == x.dtype


def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """gelu_tanh(x @ weight.T + bias), the first half of a GELU MLP. x: (N..., C_in); weight (C_out, C_in).

    On CUDA (half / bf16, with a bias) one cuBLASLt GEMM applies bias and GELU(tanh) to the float32
    accumulator in its epilogue and rounds once, so the (N, C_out) activation is written once instead
    of written, read and written again. Elsewhere: `linear`, then `gelu_tanh`.
    """
    if _epilogue_fits(x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1])
        out = torch._addmm_activation(bias, x2, weight.t(), use_gelu=True)
        return out.view(*x.shape[:-1], weight.shape[0])
    return gelu_tanh(F.linear(x, weight, bias))
