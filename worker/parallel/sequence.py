"""Sequence parallelism inside one DiT forward: Ulysses (all-to-all over heads) and Ring (K/V passed
around with a log-sum-exp merge), alone or combined (USP).

A family's plan (worker/parallel/plans/) shards the image/video tokens over the U × R ranks of the
sequence group once before the first block (`shard`, with what follows the tokens: RoPE tables,
per-token modulation) and gathers them once after the last block or the output projection
(`gather`); everything per-token in between runs on the shard. Only self-attention needs the whole
sequence, and the plan swaps the model's attention seams for `attention` below:

1. Ulysses: an all-to-all inside the ulysses group swaps the shard from tokens to heads: each rank
   goes from (B, L/(U·R), H, D) to (B, L/R, H/U, D) — the R-th block of the sequence, H/U heads.
   The sequence index of a rank is r·U + u, so the U shards of one ring block are consecutive.
2. Ring: the R ranks of the ring group each hold one block of keys/values; they pass them around
   R - 1 times; every block's partial attention is merged with the running result by its
   log-sum-exp (exact online softmax).
3. Ulysses swaps back from heads to tokens.

Joint-attention models (FLUX, Qwen-Image, HunyuanVideo) pass their text tokens' q/k/v whole on
every rank: the text is attended as one more key block (each rank takes its own heads of it) and
the text's output rides back in the same all-to-all as the image output, so every rank has it whole.
One all-to-all carries q, k and v; one carries the output back (few launches: FLUX's eager step
was bound by the CPU launching kernels, bench/NOTES.md). Token counts that
do not divide by U·R are padded at the end; padded keys are cut off before attending (they only
ever sit at the end of the sequence), padded queries give rows the gather drops.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist

from diffserve.kernels.attention import attention, attention_lse
from diffserve.kernels.merge import merge
from diffserve.worker.parallel.state import SequenceGroup

Text = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class SequenceParallel(SequenceGroup):
    """Ulysses / Ring attention over a sequence group (worker/parallel/state.py holds the groups)."""

    @classmethod
    def of(cls, group: SequenceGroup) -> "SequenceParallel":
        return cls(**{f.name: getattr(group, f.name) for f in dataclasses.fields(SequenceGroup)})

    # ---- shard / gather (once per forward) ----

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's contiguous share of `x` along `dim`, padded with zeros to equal shares."""
        length = x.shape[dim]
        share = math.ceil(length / self.size)
        pad = share * self.size - length
        if pad:
            shape = list(x.shape)
            shape[dim] = pad
            x = torch.cat([x, x.new_zeros(shape)], dim=dim)
        return x.narrow(dim, self.rank * share, share)

    def gather(self, x: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
        """Inverse of shard: every rank gets the full tensor (padding dropped)."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim).narrow(dim, 0, length)

    # ---- attention ----

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        length: int,
        text: Text | None = None,
        text_mask: torch.Tensor | None = None,
        text_first: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Self-attention over the whole `length`-token sequence from this rank's token shards.

        q, k, v: (B, L/(U·R), H, D) shards; text: optional whole (q, k, v) of the text tokens,
        (B, S, H, D) each, attended jointly with the sequence; text_mask: optional bool (B, S),
        False for padding text keys. Returns (output shard (B, L/(U·R), H, D), text output
        (B, S, H, D) or None); with text_first, (one (B, S + L/(U·R), H, D) tensor, text rows
        first, None): what a single-stream block goes on with, without concatenating the two.
        """
        text_len = text[0].shape[1] if text is not None else 0
        if self.ulysses > 1:
            q, k, v = self._to_heads(q, k, v, text).unbind(0)  # (B, S + L/R, H/U, D), text first
        elif text is not None:
            q, k, v = (torch.cat([t, x], dim=1) for t, x in zip(text, (q, k, v)))
        block = k.shape[1] - text_len  # tokens per ring block (padded)
        if self.ring == 1:
            valid = min(length, block)
            k, v = k[:, : text_len + valid], v[:, : text_len + valid]  # padded keys sit at the end
            mask = None
            if text is not None and text_mask is not None:
                mask = torch.cat([text_mask.bool(), text_mask.new_ones(text_mask.shape[0], valid, dtype=torch.bool)], dim=1)
            out = attention(q, k, v, key_mask=mask)
        else:
            text_kv = (k[:, :text_len], v[:, :text_len]) if text is not None else None
            out = self._ring(q, k[:, text_len:], v[:, text_len:], length, block, text_kv, text_mask)
        if self.ulysses > 1:
            return self._to_tokens(out, text_len, text_first and text is not None)
        if text_first and text is not None:
            return out, None
        text_out, out = out[:, :text_len], out[:, text_len:]
        return out, (text_out if text is not None else None)

    def _ring(self, q, k, v, length, block, text_kv, text_mask) -> torch.Tensor:
        """Ring attention of q against every ring rank's K/V block (and the text's K/V)."""
        out = lse = None
        if text_kv is not None:
            out, lse = attention_lse(q, *text_kv, key_mask=text_mask)
            out = out.float()
        n = self.ring
        nxt, prv = self.ring_peers[(self.ring_rank + 1) % n], self.ring_peers[(self.ring_rank - 1) % n]
        kv = torch.stack([k, v]).contiguous()  # one buffer to pass: (2, B, L/R, H', D)
        for step in range(n):
            pending = None
            if step < n - 1:  # start passing our current block on while we attend to it
                incoming = torch.empty_like(kv)
                ops = [dist.P2POp(dist.isend, kv, nxt, self.ring_group), dist.P2POp(dist.irecv, incoming, prv, self.ring_group)]
                pending = dist.batch_isend_irecv(ops)
            source = (self.ring_rank - step) % n  # whose block we hold now
            valid = max(0, min(block, length - source * block))  # padded keys sit at the end of the sequence
            if valid:
                part, part_lse = attention_lse(q, kv[0, :, :valid], kv[1, :, :valid])
                out, lse = (part.float(), part_lse) if out is None else merge(out, lse, part, part_lse)
            if pending is not None:
                for work in pending:
                    work.wait()
                kv = incoming
        return out.to(q.dtype)

    # ---- Ulysses all-to-all ----

    def _to_heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text: Text | None) -> torch.Tensor:
        """Token shards (B, n, H, D) of q, k, v -> (3, B, S + U·n, H/U, D): our head group of the U
        consecutive shards, after the text's S tokens (whole on every rank: we take our heads of it).
        One all-to-all carries q, k and v."""
        b, n, heads, d = q.shape
        u, hu = self.ulysses, heads // self.ulysses
        # (U, 3, B, n, H/U, D) by destination head group, built by one stacking copy
        send = torch.stack([t.reshape(b, n, u, hu, d).permute(2, 0, 1, 3, 4) for t in (q, k, v)], dim=1)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.ulysses_group)  # dim 0 now: source = token shard
        s = text[0].shape[1] if text is not None else 0
        out = q.new_empty(3, b, s + u * n, hu, d)
        out[:, :, s:].view(3, b, u, n, hu, d).copy_(recv.permute(1, 2, 0, 3, 4, 5))
        if text is not None:
            lo = self.ulysses_rank * hu
            out[:, :, :s].copy_(torch.stack([t[:, :, lo : lo + hu] for t in text]))
        return out

    def _to_tokens(self, x: torch.Tensor, text_len: int, text_first: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inverse of _to_heads for the attention output: (B, S + U·n, H/U, D) -> our token shard
        (B, n, H, D) and the whole text output (B, S, H, D), or with text_first both in one
        (B, S + n, H, D) tensor (text first, None). The text (its rows for our heads) rides along
        to every rank in the same all-to-all."""
        b, total, hu, d = x.shape
        u = self.ulysses
        n = (total - text_len) // u
        send = x.new_empty(u, b, n + text_len, hu, d)  # by destination token shard
        send[:, :, :n].copy_(x[:, text_len:].view(b, u, n, hu, d).transpose(0, 1))
        if text_len:
            send[:, :, n:].copy_(x[:, :text_len].unsqueeze(0).expand(u, -1, -1, -1, -1))
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.ulysses_group)  # dim 0 now: source = head group
        if text_first:  # each part permuted straight into its place: no concatenation afterwards
            joint = x.new_empty(b, text_len + n, u * hu, d)
            joint[:, text_len:].view(b, n, u, hu, d).copy_(recv[:, :, :n].permute(1, 2, 0, 3, 4))
            joint[:, :text_len].view(b, text_len, u, hu, d).copy_(recv[:, :, n:].permute(1, 2, 0, 3, 4))
            return joint, None
        out = recv[:, :, :n].permute(1, 2, 0, 3, 4).reshape(b, n, u * hu, d)
        text_out = recv[:, :, n:].permute(1, 2, 0, 3, 4).reshape(b, text_len, u * hu, d)
        return out, text_out



# ---- what a family's plan (worker/parallel/plans/) installs on a model ----


class Tokens:
    """Per-forward facts the swapped attention seams read, written once per forward by the hook that
    shards the tokens (before the first block): the whole sequence's token count, the count of text
    tokens leading a joint sequence, and the text padding as a key mask (B, S) (None: no padding)."""

    def __init__(self) -> None:
        self.length = 0
        self.text_len = 0
        self.text_mask: torch.Tensor | None = None


def shard_before(block: torch.nn.Module, shard) -> None:
    """Runs `shard(args) -> args` on the positional arguments of `block` (the first block: the
    tokens) each forward."""
    block.register_forward_pre_hook(lambda module, args: shard(args))


def shard_output(module: torch.nn.Module, shard) -> None:
    """Runs `shard(output, args) -> output` on what `module` returns (what follows the tokens:
    RoPE tables, per-token modulation) each forward."""
    module.register_forward_hook(lambda m, args, out: shard(out, args))


def gather_after(module: torch.nn.Module, sp: SequenceParallel, tokens: Tokens) -> None:
    """Gathers the token shards of `module`'s output (dim 1) into the whole sequence each forward."""
    module.register_forward_hook(lambda m, args, out: sp.gather(out, tokens.length))
