"""Wan2.1 / Wan2.2 (worker/models/wan.py): heads and MLP widths over tp; the video tokens over
ulysses × ring, sharded at the first block's input with their RoPE tables and (Wan2.2 TI2V) their
per-token modulation, gathered after the last block (before the output norm). Only the
self-attention (attn1) needs the whole sequence; cross-attention reads the text, whole on every rank."""

from __future__ import annotations

from diffserve.worker.parallel.plans import Plan
from diffserve.worker.parallel.sequence import SequenceParallel, Tokens, gather_after, shard_before, shard_output
from diffserve.worker.parallel.tensor import MLP, Heads

TP = {
    "blocks.*.attn1": Heads(norms=("norm_q", "norm_k")),
    "blocks.*.attn2": Heads(norms=("norm_q", "norm_k", "norm_added_k")),
    "blocks.*.ffn": MLP(),
}


def sequence(model, sp: SequenceParallel) -> None:
    tokens = Tokens()

    def shard(args):
        x, *rest = args  # WanBlock(x, context, modulation, rope, context_image)
        tokens.length = x.shape[1]
        return sp.shard(x), *rest

    def shard_rope(rope, args):
        return tuple(sp.shard(r) for r in rope)

    def shard_modulation(out, args):
        temb, modulation, text, image = out  # WanConditionEmbedder: temb stays whole for the output head
        if modulation.shape[1] > 1:  # one modulation per token (Wan2.2 TI2V)
            modulation = sp.shard(modulation)
        return temb, modulation, text, image

    def attend(q, k, v):
        return sp.attention(q, k, v, tokens.length)[0]

    shard_before(model.blocks[0], shard)
    shard_output(model.rope, shard_rope)
    shard_output(model.condition_embedder, shard_modulation)
    gather_after(model.blocks[-1], sp, tokens)
    for block in model.blocks:
        block.attn1.attend = attend


PLAN = Plan(tp=TP, sequence=sequence)


def parallelize(model, state):
    return PLAN.apply(model, state)
