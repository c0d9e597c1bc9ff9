"""The Wan prompt encoder (worker/pipelines/stages.T5PromptEncoder) against diffusers' own
WanPipeline._get_t5_prompt_embeds: encoding on the prompts' tokens only (padding cut) and the
per-prompt cache give the reference's embeddings; one ENCODE command for several requests
(worker/runtime.py) encodes their prompts in one call and gives each what its own would."""

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


def test_one_encode_command_for_several_requests(tiny_wan, ref, monkeypatch):
    """A RunStage ENCODE of several requests (scheduler/policy.py batches them) encodes their prompts
    in one text-encoder call and leaves each request what its own encode would; a request that is
    not resident fails alone; if the batched call fails, each request is encoded alone and only the
    one that fails again fails."""
    from diffserve.scheduler.requests import worker_request
    from diffserve.v1 import generation_pb2 as pb
    from diffserve.worker.registry import load_pipeline
    from diffserve.worker.runtime import Runtime
    from diffserve.worker.v1 import worker_pb2 as wpb

    pipe = load_pipeline(tiny_wan, "m", torch.device("cpu"), torch.float32)
    runtime = Runtime(pipe)
    cases = {"a": ("a cat", 5.0), "b": ("a red fox jumping over a lazy dog", 5.0), "c": ("a cat", 1.0)}  # c: no CFG
    for rid, (prompt, guidance) in cases.items():
        params = pb.GenerationParams(prompt=prompt, negative_prompt="blurry", height=32, width=32, num_frames=1,
                                     num_inference_steps=2, guidance_scale=guidance)
        runtime.admit(wpb.Admit(request_id=rid, request=worker_request(params, pipe.card)))
    calls = []
    hook = pipe.encoder.text_encoder.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        results, _ = runtime.run_stage(wpb.RunStage(stage=wpb.WORKER_STAGE_ENCODE, request_ids=["a", "gone", "b", "c"]))
    finally:
        hook.remove()
    assert calls == [3]  # "a cat", "blurry" and the fox, each once
    assert [(r.request_id, r.status.code) for r in results] == [("a", 0), ("gone", 5), ("b", 0), ("c", 0)]  # 5: NOT_FOUND
    for rid, (prompt, guidance) in cases.items():
        state = runtime.states[rid]
        expected = reference(ref, [prompt, "blurry"])
        torch.testing.assert_close(state.cond[0], expected[0], atol=1e-5, rtol=1e-5)
        if guidance > 1:
            torch.testing.assert_close(state.uncond[0], expected[1], atol=1e-5, rtol=1e-5)
        else:
            assert state.uncond is None

    def broken(states):
        raise RuntimeError("out of memory, say")

    one_at_a_time = pipe.encode_batch

    def encode(state):
        if state.request_id == "b":
            raise ValueError("this one cannot be encoded")
        one_at_a_time([state])

    monkeypatch.setattr(pipe, "encode_batch", broken)
    monkeypatch.setattr(pipe, "encode", encode)
    results, _ = runtime.run_stage(wpb.RunStage(stage=wpb.WORKER_STAGE_ENCODE, request_ids=["a", "b"]))
    assert [r.status.code for r in results] == [0, 3]  # INVALID_ARGUMENT for the ValueError
    assert "this one cannot be encoded" in results[1].status.message
