"""FLUX.1 (worker/models/flux.py): heads and MLP widths over tp (single-stream blocks: attention and
MLP side by side, one fused output linear); the image tokens over ulysses × ring, sharded at the
first double block's input with their part of the [text, image] RoPE tables, gathered after the
output projection. The text stays whole on every rank and joins every attention as one more key block."""

from __future__ import annotations

import torch

from diffserve.worker.parallel.plans import Plan
from diffserve.worker.parallel.sequence import SequenceParallel, Tokens, gather_after, shard_before, shard_output
from diffserve.worker.parallel.tensor import MLP, Heads, ParallelBlock

TP = {
    "transformer_blocks.*.attn": Heads(),  # per-head q/k norms: local as they are
    "transformer_blocks.*.ff": MLP(),
    "transformer_blocks.*.ff_context": MLP(),
    "single_transformer_blocks.*": ParallelBlock(),
}


def sequence(model, sp: SequenceParallel) -> None:
    tokens = Tokens()

    def shard(args):
        x, *rest = args  # FluxDoubleBlock(x, context, temb, rope)
        tokens.length = x.shape[1]
        return sp.shard(x), *rest

    def shard_rope(rope, args):
        s = args[0].shape[0]  # FluxPosEmbed(txt_ids, img_ids): tables laid out [text, image]
        tokens.text_len = s
        return tuple(torch.cat([r[:, :s], sp.shard(r[:, s:])], dim=1) for r in rope)

    def attend(q, k, v, text=None):
        if text is not None:  # double stream: image shard and whole text apart
            return sp.attention(q, k, v, tokens.length, text=text)
        s = tokens.text_len  # single stream: [text, image shard] in one tensor, handed back the same way
        return sp.attention(q[:, s:], k[:, s:], v[:, s:], tokens.length, text=(q[:, :s], k[:, :s], v[:, :s]), text_first=True)[0]

    shard_before(model.transformer_blocks[0], shard)
    shard_output(model.pos_embed, shard_rope)
    gather_after(model.proj_out, sp, tokens)
    for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
        block.attn.attend = attend


PLAN = Plan(tp=TP, sequence=sequence)


def parallelize(model, state):
    return PLAN.apply(model, state)
