"""Attention dispatch: the CPU path equals plain softmax attention; masks drop padding keys;
a forced backend that cannot run is an error. (GPU backends are checked by bench/attention_check.py.)"""

from __future__ import annotations

import pytest
import torch

from diffserve.kernels import attention as attn


def reference(q, k, v, key_mask=None):
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double())


def test_auto_on_cpu_is_sdpa_and_exact():
    q, k, v = (torch.randn(2, 37, 3, 16) for _ in range(3))
    assert attn.backend_for(q) == "sdpa"
    torch.testing.assert_close(attn.attention(q, k, v).double(), reference(q, k, v), atol=1e-5, rtol=1e-5)


def test_key_mask_equals_unpadded_call():
    q, k, v = (torch.randn(2, 9, 2, 8) for _ in range(3))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False
    out = attn.attention(q, k, v, key_mask=mask)
    torch.testing.assert_close(out[1:], attn.attention(q[1:], k[1:, :5], v[1:, :5]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.double(), reference(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_forced_backend():
    q = torch.randn(1, 4, 1, 8)
    try:
        attn.configure("cudnn")
        with pytest.raises(RuntimeError, match="cudnn"):
            attn.attention(q, q, q)
        with pytest.raises(ValueError):
            attn.configure("no-such")
    finally:
        attn.configure("auto")
    assert attn.backend_for(q) == "sdpa"


def test_dispatch_does_not_break_a_compiled_graph():
    """torch.compile traces through the dispatch (no graph break per attention call)."""
    import torch._dynamo

    def two_calls(q, k, v):
        return attn.attention(attn.attention(q, k, v), k, v) * 2

    q, k, v = (torch.randn(1, 16, 2, 8) for _ in range(3))
    attn.attention(q, k, v)  # choose outside the traced region first, as a warmed-up worker has
    explanation = torch._dynamo.explain(two_calls)(q, k, v)
    assert explanation.graph_break_count == 0, explanation.break_reasons
