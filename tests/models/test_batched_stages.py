"""Stage commands for several requests (scheduler/policy.py batches them; worker/runtime.py runs
them) on the tiny Wan: one ENCODE encodes every prompt in one text-encoder call, one DECODE the images
of a shape in one VAE call, and each request gets what its own stage would give; a request that is not
resident fails alone; if the batched call fails, each request runs alone and only the one that fails
again fails."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import WanPipeline

from test_prompt_encoder import reference


@pytest.fixture(scope="module")
def ref(tiny_wan):
    return WanPipeline.from_pretrained(tiny_wan, torch_dtype=torch.float32)


@pytest.fixture
def runtime(tiny_wan):
    from diffserve.worker.registry import load_pipeline
    from diffserve.worker.runtime import Runtime

    return Runtime(load_pipeline(tiny_wan, "m", torch.device("cpu"), torch.float32))


def admit(runtime, rid: str, prompt: str, guidance: float = 5.0, height: int = 32, width: int = 32, frames: int = 1) -> None:
    from diffserve.scheduler.requests import worker_request
    from diffserve.v1 import generation_pb2 as pb
    from diffserve.worker.v1 import worker_pb2 as wpb

    params = pb.GenerationParams(prompt=prompt, negative_prompt="blurry", height=height, width=width, num_frames=frames,
                                 num_inference_steps=2, guidance_scale=guidance, seed=len(rid) + ord(rid[0]))
    runtime.admit(wpb.Admit(request_id=rid, request=worker_request(params, runtime.pipeline.card)))


def test_one_encode_command_for_several_requests(runtime, ref, monkeypatch):
    from diffserve.worker.v1 import worker_pb2 as wpb

    pipe = runtime.pipeline
    cases = {"a": ("a cat", 5.0), "b": ("a red fox jumping over a lazy dog", 5.0), "c": ("a cat", 1.0)}  # c: no CFG
    for rid, (prompt, guidance) in cases.items():
        admit(runtime, rid, prompt, guidance)
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


def test_one_decode_command_for_several_images(runtime, monkeypatch):
    from diffserve.worker.v1 import worker_pb2 as wpb

    pipe = runtime.pipeline
    sizes = {"a": (32, 32, 1), "b": (32, 32, 1), "c": (32, 48, 1), "d": (32, 32, 5), "e": (32, 32, 1)}
    for rid, (h, w, f) in sizes.items():
        admit(runtime, rid, f"a cat {rid}", height=h, width=w, frames=f)
    ids = list(sizes)
    runtime.run_stage(wpb.RunStage(stage=wpb.WORKER_STAGE_ENCODE, request_ids=ids))
    runtime.run_stage(wpb.RunStage(stage=wpb.WORKER_STAGE_PREPARE, request_ids=ids))
    for _ in range(2):
        runtime.denoise(wpb.DenoiseStep(entries=[wpb.StepEntry(request_id=r, step_index=runtime.states[r].step) for r in ids]))
    alone = {rid: pipe.decode(runtime.states[rid]) for rid in ids}
    calls = []
    decode = pipe.vae.decode
    monkeypatch.setattr(pipe.vae, "decode", lambda latents, **kw: calls.append(latents.shape[0]) or decode(latents, **kw))
    monkeypatch.setattr("diffserve.worker.pipelines.wan.DECODE_BATCH_PIXELS", 2 * 32 * 32)  # two 32x32 images a call
    results, frames = runtime.run_stage(wpb.RunStage(stage=wpb.WORKER_STAGE_DECODE, request_ids=["a", "gone", *ids[1:]]))
    assert sorted(calls) == [1, 1, 1, 2]  # a + b, then e; c (another shape) and d (five frames) alone
    assert [(r.request_id, r.status.code) for r in results] == [("a", 0), ("gone", 5), *((rid, 0) for rid in ids[1:])]
    for r in results:
        if r.status.code == 0:
            video = np.frombuffer(frames[r.frames.frame], dtype=np.uint8).reshape(r.frames.shape)
            assert video.shape == (sizes[r.request_id][2], *sizes[r.request_id][:2], 3)
            assert np.abs(video.astype(np.int16) - alone[r.request_id]).max() <= 1, r.request_id
            assert alone[r.request_id].std() > 5  # pictures that a wrong pairing would show

    def broken(states):
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(pipe, "decode_batch", broken)
    results, frames = runtime.run_stage(wpb.RunStage(stage=wpb.WORKER_STAGE_DECODE, request_ids=["a", "b"]))
    assert [r.status.code for r in results] == [0, 0] and len(frames) == 2
    assert np.array_equal(np.frombuffer(frames[results[1].frames.frame], dtype=np.uint8).reshape(alone["b"].shape), alone["b"])
