"""Attention dispatch for every model in diffserve.

This module is the single dispatch point for attention. Every model calls
`attention(q, k, v)` instead of touching a backend directly, so that faster
backends (FlashAttention-3 on Hopper, flash-attn 2, cuDNN SDPA, ...) can be added
here later, chosen by device, dtype and head dim, without editing the models.

Today the only backend is PyTorch's `scaled_dot_product_attention`.

Layout convention: tensors are (batch, seq, heads, head_dim) — the layout the
projections produce after `unflatten` — and the result comes back in the same layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal, unmasked softmax attention with the default 1/sqrt(head_dim) scale.

    q: (B, Lq, H, D), k: (B, Lk, H, D), v: (B, Lk, H, Dv) -> (B, Lq, H, Dv)
    """
    # SDPA wants the heads before the sequence: (B, H, L, D).
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=None,
        dropout_p=0.0,
        is_causal=False,
    )  # (B, H, Lq, Dv)
    return out.transpose(1, 2)  # (B, Lq, H, Dv)
