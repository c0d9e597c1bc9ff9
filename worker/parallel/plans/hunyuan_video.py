"""HunyuanVideo (worker/models/hunyuan_video.py): FLUX's dual / single block layout plus a token
refiner, all split over tp; the video tokens over ulysses × ring, sharded at the first dual block's
input with their RoPE tables, gathered after the output projection. The text stays whole on every
rank; its padding (the model's per-row key lengths) becomes a key mask (B, S), built once per forward."""

from __future__ import annotations

import torch

from diffserve.worker.parallel.plans import Plan
from diffserve.worker.parallel.sequence import SequenceParallel, Tokens, gather_after, shard_before, shard_output
from diffserve.worker.parallel.tensor import MLP, Heads, ParallelBlock

TP = {
    "context_embedder.token_refiner.refiner_blocks.*.attn": Heads(),
    "context_embedder.token_refiner.refiner_blocks.*.ff": MLP(),
    "transformer_blocks.*.attn": Heads(),  # per-head q/k norms: local as they are
    "transformer_blocks.*.ff": MLP(),
    "transformer_blocks.*.ff_context": MLP(),
    "single_transformer_blocks.*": ParallelBlock(),
}


def sequence(model, sp: SequenceParallel) -> None:
    tokens = Tokens()

    def shard(args):
        x, text, temb, rope, key_lengths = args  # DualStreamBlock(x, text, temb, rope, key_lengths)
        length, s = x.shape[1], text.shape[1]
        lengths = [n - length for n in key_lengths]  # valid text tokens per row
        tokens.length = length
        tokens.text_mask = None
        if any(n < s for n in lengths):
            tokens.text_mask = torch.arange(s, device=x.device)[None, :] < torch.tensor(lengths, device=x.device)[:, None]
        return sp.shard(x), text, temb, rope, key_lengths

    def shard_rope(rope, args):
        return tuple(sp.shard(r) for r in rope)

    def attend(q, k, v, text, key_lengths):
        video_out, text_out = sp.attention(q, k, v, tokens.length, text=text, text_mask=tokens.text_mask)
        return torch.cat([video_out, text_out], 1)

    shard_before(model.transformer_blocks[0], shard)
    shard_output(model.rope, shard_rope)
    gather_after(model.proj_out, sp, tokens)
    for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
        block.attn.attend = attend


PLAN = Plan(tp=TP, sequence=sequence)


def parallelize(model, state):
    return PLAN.apply(model, state)
