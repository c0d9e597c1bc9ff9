"""Qwen-Image (worker/models/qwen_image.py): heads and MLP widths over tp; the image tokens (target
and Edit's conditioning image) over ulysses × ring, sharded at the first block's input with their
RoPE tables, gathered after the output projection. The text stays whole on every rank; its padding
is the text part of the model's key mask."""

from __future__ import annotations

from diffserve.worker.parallel.plans import Plan
from diffserve.worker.parallel.sequence import SequenceParallel, Tokens, gather_after, shard_before, shard_output
from diffserve.worker.parallel.tensor import MLP, Heads

TP = {
    "transformer_blocks.*.attn": Heads(),
    "transformer_blocks.*.img_mlp": MLP(),
    "transformer_blocks.*.txt_mlp": MLP(),
}


def sequence(model, sp: SequenceParallel) -> None:
    tokens = Tokens()

    def shard(args):
        img, *rest = args  # QwenImageBlock(img, txt, temb, img_rope, txt_rope, key_mask)
        tokens.length = img.shape[1]
        return sp.shard(img), *rest

    def shard_rope(out, args):
        img_rope, txt_rope = out  # QwenPosEmbed: the text's tables stay whole
        return tuple(sp.shard(r) for r in img_rope), txt_rope

    def attend(q, k, v, text, key_mask):
        text_mask = key_mask[:, : text[0].shape[1]] if key_mask is not None else None
        return sp.attention(q, k, v, tokens.length, text=text, text_mask=text_mask)

    shard_before(model.transformer_blocks[0], shard)
    shard_output(model.pos_embed, shard_rope)
    gather_after(model.proj_out, sp, tokens)
    for block in model.transformer_blocks:
        block.attn.attend = attend


PLAN = Plan(tp=TP, sequence=sequence)


def parallelize(model, state):
    return PLAN.apply(model, state)
