"""The Wan prompt encoder (worker/pipelines/stages.T5PromptEncoder) against diffusers' own
WanPipeline._get_t5_prompt_embeds: encoding on the prompts' tokens only (padding cut) and the
per-prompt cache give the reference's embeddings (one command for several requests:
test_batched_stages.py)."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanPipeline

from diffserve.worker.pipelines.stages import T5PromptEncoder
from diffserve.worker.pipelines.wan import TEXT_LENGTH

PROMPTS = ["a cat", "a red fox jumping over a lazy dog in the snow at dusk", ""]


@pytest.fixture(scope="module")
def ref(tiny_wan):
    return WanPipeline.from_pretrained(tiny_wan, torch_dtype=torch.float32)


def reference(ref, prompts):
    return ref._get_t5_prompt_embeds(prompts, max_sequence_length=TEXT_LENGTH, device=torch.device("cpu"), dtype=torch.float32)


def encoder(ref, **kw) -> T5PromptEncoder:
    return T5PromptEncoder(ref.tokenizer, ref.text_encoder, TEXT_LENGTH, torch.device("cpu"), torch.float32, **kw)


def test_trimmed_encoding_equals_the_reference(ref):
    enc = encoder(ref, cache_prompts=0)
    calls = []
    hook = ref.text_encoder.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[1]))
    try:
        ours = enc(PROMPTS)
    finally:
        hook.remove()
    assert calls == [T5PromptEncoder.TRIM_TO]  # one call, on the prompts' tokens only (not 512)
    torch.testing.assert_close(ours, reference(ref, PROMPTS), atol=1e-5, rtol=1e-5)
    assert ours.shape == (3, TEXT_LENGTH, ref.text_encoder.config.d_model)


def test_cached_prompts_are_not_encoded_again(ref):
    enc = encoder(ref, cache_prompts=2)
    batches = []
    hook = ref.text_encoder.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        first = enc(PROMPTS[:2])
        again = enc([PROMPTS[1], PROMPTS[0], PROMPTS[1]])  # both cached, in another order, one twice
        third = enc([PROMPTS[2], PROMPTS[1]])  # one new: encoded alone; the cache keeps the last 2
        evicted = enc([PROMPTS[0]])  # PROMPTS[0] was the least recently used: encoded again
    finally:
        hook.remove()
    assert batches == [2, 1, 1]
    torch.testing.assert_close(again, torch.stack([first[1], first[0], first[1]]), atol=0, rtol=0)
    torch.testing.assert_close(third, reference(ref, [PROMPTS[2], PROMPTS[1]]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(evicted, first[:1], atol=1e-6, rtol=1e-6)

