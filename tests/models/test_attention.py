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


# ---------------------------------------------------------------------------------------------
# attention_varlen: packed sequences of different lengths (mixed-shape batching)
# ---------------------------------------------------------------------------------------------


def _packed(q_lens, k_lens, heads=2, dim=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, sum(q_lens), heads, dim, generator=g).to(dtype)
    k, v = (torch.randn(1, sum(k_lens), heads, dim, generator=g).to(dtype) for _ in range(2))
    return q, k, v


def _each_alone(q, k, v, q_lens, k_lens):
    pairs = zip(q.split(q_lens, dim=1), k.split(k_lens, dim=1), v.split(k_lens, dim=1))
    return torch.cat([attn.attention(qi, ki, vi) for qi, ki, vi in pairs], dim=1)


@pytest.mark.parametrize("q_lens,k_lens", [((5, 11, 3), (5, 11, 3)), ((5, 11, 3), (4, 4, 4)), ((7,), (7,))])
def test_varlen_equals_each_sequence_alone(q_lens, k_lens):
    """Self-attention spans (q_lens = k_lens) and cross-attention to each request's own prompt."""
    q, k, v = _packed(q_lens, k_lens)
    out = attn.attention_varlen(q, k, v, attn.SeqLens(q_lens), attn.SeqLens(k_lens))
    assert out.shape == q.shape
    assert torch.equal(out, _each_alone(q, k, v, q_lens, k_lens))
    assert torch.equal(attn.attention_varlen(q, k, v, q_lens, k_lens), out)  # plain tuples too
    for i, start in enumerate((0, *torch.tensor(q_lens).cumsum(0)[:-1].tolist())):  # and the math, per sequence
        ks = sum(k_lens[:i])
        sl, kl = slice(start, start + q_lens[i]), slice(ks, ks + k_lens[i])
        torch.testing.assert_close(out[:, sl].double(), reference(q[:, sl], k[:, kl], v[:, kl]), atol=1e-5, rtol=1e-5)


def test_varlen_refuses_lengths_that_do_not_add_up():
    q, k, v = _packed((3, 4), (3, 4))
    with pytest.raises(AssertionError):
        attn.attention_varlen(q, k, v, (3, 5), (3, 4))
    with pytest.raises(AssertionError):
        attn.attention_varlen(q, k, v, (3, 4), (7,))


def test_seq_lens_offsets_are_int32_cumulative_and_built_once():
    lens = attn.SeqLens((3, 1, 5))
    cu = lens.offsets(torch.device("cpu"))
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 4, 9] and (lens.max, lens.total) == (5, 9)
    assert lens.offsets(torch.device("cpu")) is cu  # every layer reads the same tensor


class _FakeFA3Varlen:
    """Stands in for fa3_fwd_interface on the CPU: `flash_attn_varlen_func` in torch, checking what
    the varlen path passes (tokens without the batch dim, int32 cumulative lengths, host maxima)."""

    def __init__(self):
        self.calls = []

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        self.calls.append((cu_seqlens_q.tolist(), cu_seqlens_k.tolist(), max_seqlen_q, max_seqlen_k))
        assert q.ndim == k.ndim == v.ndim == 3 and cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
        assert isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int)
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        outs = []
        for i in range(len(cq) - 1):
            qi, ki, vi = q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]]
            outs.append(attn.attention(qi[None].float(), ki[None].float(), vi[None].float())[0].to(q.dtype))
        return torch.cat(outs), None  # FA3 returns (out, lse) in some versions: the path takes out


def test_varlen_runs_fa3_once_where_fa3_would_run(monkeypatch):
    """The FA3 branch, on the CPU through a stand-in: one call with the cumulative lengths; where FA3
    is not the backend (another one forced) the per-sequence loop runs."""
    fake = _FakeFA3Varlen()
    monkeypatch.setattr(attn, "_fa3_interface", lambda: fake)
    monkeypatch.setattr(attn, "_hopper_bf16", lambda device, dtype, head_dim: dtype == torch.bfloat16)
    monkeypatch.delitem(attn._LOADED, "fa3-varlen", raising=False)
    monkeypatch.setattr(attn, "_varlen_choices", {})  # decided afresh, and forgotten after the test
    q_lens, k_lens = (5, 11, 3), (4, 4, 4)
    q, k, v = _packed(q_lens, k_lens, dtype=torch.bfloat16)
    out = attn.attention_varlen(q, k, v, attn.SeqLens(q_lens), attn.SeqLens(k_lens))
    assert fake.calls == [([0, 5, 16, 19], [0, 4, 8, 12], 11, 4)]
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _each_alone(q.float(), k.float(), v.float(), q_lens, k_lens), atol=1e-2, rtol=1e-2)
    try:
        attn.configure("sdpa")
        attn.attention_varlen(q, k, v, q_lens, k_lens)
        assert len(fake.calls) == 1  # forced sdpa: the loop
    finally:
        attn.configure("auto")
        attn._LOADED.pop("fa3-varlen", None)
    attn.attention_varlen(q.float(), k.float(), v.float(), q_lens, k_lens)  # float32: not FA3's
    assert len(fake.calls) == 1
