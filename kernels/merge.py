"""Merge of two softmax-attention results over disjoint key sets (Ring attention's online softmax).

Given each side's output and per-row log-sum-exp of its scaled scores, the result over both key
sets is the outputs weighted by exp(lse_side - lse_both), with lse_both = logaddexp of the two.
The torch reference takes about ten float32 passes over the (B, L, H, D) output per merge (FLUX
1024² under ring 2: 21.6 of a 92 ms step, bench/NOTES.md); the Triton kernel reads the running
result, the part and both log-sum-exps once and writes the result and its log-sum-exp in place.
"""

from __future__ import annotations

import torch

from diffserve.kernels.norm import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def merge_reference(out: torch.Tensor, lse: torch.Tensor, part: torch.Tensor, part_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (merged float32 output, its log-sum-exp). Rows that saw no key yet (lse -inf) take
    the other side's result; rows with no key on either side stay 0 with lse -inf."""
    new = torch.logaddexp(lse, part_lse)
    a = torch.exp(lse - new).nan_to_num(0.0)[..., None]  # -inf - -inf = nan: weight 0
    b = torch.exp(part_lse - new).nan_to_num(0.0)[..., None]
    return out * a + part.float() * b, new


if triton is not None:

    @triton.jit
    def _merge_kernel(
        out_ptr, lse_ptr, part_ptr, plse_ptr,
        rows_total, L, H, D,
        s_b, s_l, s_h, p_b, p_l, p_h,
        ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # row = (b * L + l) * H + h
        in_rows = rows < rows_total
        h = rows % H
        l = (rows // H) % L
        b = rows // (H * L)
        lse = tl.load(lse_ptr + b * s_b + l * s_l + h * s_h, mask=in_rows, other=float("-inf"))
        plse = tl.load(plse_ptr + b * p_b + l * p_l + h * p_h, mask=in_rows, other=float("-inf"))
        m = tl.maximum(lse, plse)
        m = tl.where(m == float("-inf"), 0.0, m)
        wa = tl.exp(lse - m)  # exp(-inf) = 0
        wp = tl.exp(plse - m)
        total = wa + wp
        seen = total > 0
        total = tl.where(seen, total, 1.0)  # no key on either side: weights 0, lse -inf
        new = tl.where(seen, m + tl.log(total), float("-inf"))
        wa = wa / total
        wp = wp / total
        cols = tl.arange(0, BLOCK_D)
        mask = in_rows[:, None] & (cols[None, :] < D)
        offs = rows[:, None] * D + cols[None, :]
        o = tl.load(out_ptr + offs, mask=mask, other=0.0)
        p = tl.load(part_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, o * wa[:, None] + p * wp[:, None], mask=mask)
        tl.store(lse_ptr + b * s_b + l * s_l + h * s_h, new, mask=in_rows)


def merge_triton(out: torch.Tensor, lse: torch.Tensor, part: torch.Tensor, part_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path of `merge`: updates `out` (contiguous float32 (B, L, H, D)) and `lse`
    (float32 (B, L, H), any strides) in place and returns them."""
    assert out.dtype == torch.float32 and out.is_contiguous() and out.shape == part.shape, "out: contiguous float32 like part"
    assert lse.dtype == part_lse.dtype == torch.float32 and lse.shape == part_lse.shape == out.shape[:3]
    part = part.contiguous()
    b, l, h, d = out.shape
    rows = b * l * h
    block_d = triton.next_power_of_2(d)
    per_program = max(1, min(16, 4096 // block_d))
    _merge_kernel[(triton.cdiv(rows, per_program),)](
        out, lse, part, part_lse, rows, l, h, d, *lse.stride(), *part_lse.stride(),
        ROWS=per_program, BLOCK_D=block_d, num_warps=4,
    )
    return out, lse


def merge(out: torch.Tensor, lse: torch.Tensor, part: torch.Tensor, part_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combines two attention results over disjoint key sets into the result over both.

    out: (B, L, H, D) float32 running result, part: (B, L, H, D) any dtype; lse, part_lse: (B, L, H)
    float32. Returns the float32 result and its log-sum-exp (on CUDA: `out` and `lse`, updated in place).
    """
    if use_triton(out, lse, part, part_lse) and out.dtype == torch.float32 and out.is_contiguous() and lse.dtype == torch.float32:
        return merge_triton(out, lse, part, part_lse)
    return merge_reference(out, lse, part, part_lse)
