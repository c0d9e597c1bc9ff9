"""Per-request LoRA in one batched step (issue 17), on the tiny Wan checkpoint, against diffusers'
own LoRA (WanPipeline.load_lora_weights + set_adapters, PEFT layers): requests with adapter a,
adapter b, both and none share each denoising step (one forward, one base GEMM per linear), and
each draws what diffusers draws with that request's adapters and scales. Bad adapter files are
refused naming the adapter, without touching the other requests."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffserve.scheduler.requests import worker_request
from diffserve.v1 import generation_pb2 as pb
from diffserve.worker.registry import load_pipeline
from tests.fixtures.tiny.lora import WAN_ATTENTION_AND_FFN, activate, lora_pipeline, reference_with_all, write_lora
from tests.fixtures.tiny.wan import build_tiny_wan

STEPS = 6
SIZE = dict(height=32, width=32, num_frames=1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("tiny_wan"))


@pytest.fixture(scope="module")
def loras(ckpt, tmp_path_factory):
    """Adapter a: rank 4 on every attention and FFN linear. Adapter b: rank 4 on a few of them and
    the output projection, with an alpha of 8 in its header (scaling 2)."""
    folder = tmp_path_factory.mktemp("loras")
    write_lora(folder / "a.safetensors", ckpt / "transformer", WAN_ATTENTION_AND_FFN, seed=1)
    write_lora(folder / "b.safetensors", ckpt / "transformer",
               (r"blocks\.\d+\.attn1\.(to_q|to_v)", r"blocks\.1\.ffn\.net\.2", r"proj_out"), seed=2, alpha=8.0)
    return folder


@pytest.fixture(scope="module")
def pipe(ckpt, loras):
    return lora_pipeline(ckpt, loras)


def state(pipe, rid: str, prompt: str, seed: int, adapters: list[tuple[str, float]], **size):
    params = pb.GenerationParams(prompt=prompt, negative_prompt="", **(size or SIZE), num_inference_steps=STEPS,
                                 guidance_scale=5.0, seed=seed)
    request = worker_request(params, pipe.card)
    request.loras.extend(pb_lora(name, scale) for name, scale in adapters)
    s = pipe.admit(rid, request)
    pipe.encode(s)
    pipe.prepare(s)
    return s


def pb_lora(name: str, scale: float):
    from diffserve.worker.v1 import worker_pb2 as wpb

    return wpb.LoraAdapter(name=name, scale=scale)


def run(pipe, states, steps: int = STEPS) -> None:
    for _ in range(steps):
        pipe.denoise_step(states)


def frames(pipe, s) -> np.ndarray:
    return pipe.decode(s).astype(np.int16)


@pytest.fixture(scope="module")
def ref(ckpt, loras):
    """diffusers' WanPipeline with every test adapter loaded once; `reference` activates a case's."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(ckpt)
    pipe.set_progress_bar_config(disable=True)
    return reference_with_all(pipe, loras, ("a", "b"))


def reference(ref, prompt: str, seed: int, adapters: list[tuple[str, float]], **size) -> tuple[np.ndarray, torch.Tensor]:
    """diffusers' WanPipeline with `adapters` loaded and set (none: the plain pipeline): (frames, latents)."""
    activate(ref, adapters)
    kwargs = dict(negative_prompt="", **(size or SIZE), num_inference_steps=STEPS, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(seed))
    latents = ref(prompt, output_type="latent", **kwargs).frames
    kwargs["generator"] = torch.Generator().manual_seed(seed)
    out = ref(prompt, output_type="np", **kwargs).frames[0]
    return (out * 255).round().astype(np.int16), latents


MIX = [  # (request id, prompt, seed, adapters): one batch, every row of it in each step's one forward
    ("a", "a cat in the snow", 7, [("a", 0.8)]),
    ("b", "a dog on the beach", 8, [("b", 1.0)]),
    ("none", "a red car", 9, []),
    ("ab", "a bird over the sea", 10, [("a", 0.5), ("b", 1.5)]),
]


def test_a_batch_mixing_adapters_matches_diffusers_lora_row_by_row(ref, pipe, monkeypatch):
    states = [state(pipe, rid, prompt, seed, adapters) for rid, prompt, seed, adapters in MIX]
    forwards = []
    eager = pipe._eager
    monkeypatch.setattr(pipe, "_eager", lambda *a: forwards.append(a[1].shape[0]) or eager(*a))
    run(pipe, states)
    assert forwards == [8] * STEPS, "each step is one forward of all 8 rows (4 requests, CFG)"
    for s, (rid, prompt, seed, adapters) in zip(states, MIX):
        expected, latents = reference(ref, prompt, seed, adapters)
        torch.testing.assert_close(s.latents, latents, atol=2e-4, rtol=1e-4, msg=f"request {rid}")
        assert np.abs(frames(pipe, s) - expected).max() <= 2, rid
    # The adapters must change the result for the test to mean anything.
    plain = state(pipe, "plain", "a cat in the snow", 7, [])
    run(pipe, [plain])
    assert (plain.latents - states[0].latents).abs().max() > 0.05


def test_adapters_held_by_a_batch_with_step_cache_and_mixed_sizes_equal_solo_runs(pipe):
    """Rows of different sizes (which then do not pack) and a First-Block-cached request with an
    adapter beside an exact one with another: each equals its own run alone."""
    cases = [("a", "a cat", 7, [("a", 1.0)], {}, 0.2), ("b", "a dog", 8, [("b", 0.7)], {}, None),
             ("c", "a tree", 9, [("a", 1.0)], dict(height=48, width=32, num_frames=1), None)]

    def make(rid, prompt, seed, adapters, size, threshold):
        s = state(pipe, rid, prompt, seed, adapters, **size)
        if threshold is not None:
            s.request.cache.policy, s.request.cache.threshold = "first-block", threshold
        return s

    solo = [make(*c) for c in cases]
    for s in solo:
        run(pipe, [s])
    together = [make(*c) for c in cases]
    run(pipe, together)
    for a, b in zip(solo, together):
        torch.testing.assert_close(b.latents, a.latents, atol=1e-5, rtol=1e-5, msg=a.request_id)
    assert sum(c.skipped for c in together[0].step_caches.values()) > 0


def test_adapters_load_on_first_use_and_stay_within_the_budget(ckpt, loras):
    pipe = lora_pipeline(ckpt, loras)
    cache = pipe.lora.cache
    assert pipe.lora_adapters == ("a", "b") and cache.loads == 0
    a = cache.get("a")
    assert cache.get("a") is a and cache.loads == 1
    b = cache.get("b")
    cache.max_bytes = a.nbytes + b.nbytes - 1  # room for one: the least recently used (a) goes
    cache.get("b")
    assert list(cache.kept) == ["b"]
    assert cache.get("a") is a and cache.loads == 2, "held by someone (here: the test), it is taken back, not read again"
    del a
    cache.kept.clear()
    cache.get("a")
    assert cache.loads == 3


def bad_file(folder, name: str, tensors: dict | bytes) -> None:
    path = folder / f"{name}.safetensors"
    if isinstance(tensors, bytes):
        path.write_bytes(tensors)
    else:
        save_file(tensors, str(path))


def test_bad_adapter_files_are_refused_naming_the_adapter_and_other_requests_go_on(ckpt, loras, tmp_path):
    folder = tmp_path / "loras"
    shutil.copytree(loras, folder)
    good = load_file(str(folder / "a.safetensors"))
    q = "transformer.blocks.0.attn1.to_q"
    bad_file(folder, "junk", b"this is not a safetensors file")
    bad_file(folder, "shapes", {**good, f"{q}.lora_B.weight": torch.zeros(5, 4)})
    bad_file(folder, "unknown", {**good, "transformer.blocks.0.attn9.to_q.lora_A.weight": torch.zeros(4, 32),
                                 "transformer.blocks.0.attn9.to_q.lora_B.weight": torch.zeros(32, 4)})
    bad_file(folder, "outside", {**good, "text_encoder.encoder.lora_A.weight": torch.zeros(4, 32)})
    bad_file(folder, "half", {k: v for k, v in good.items() if k != f"{q}.lora_B.weight"})
    bad_file(folder, "dora", {**good, f"{q}.lora_magnitude_vector": torch.ones(32)})
    bad_file(folder, "nan", {**good, f"{q}.lora_A.weight": torch.full((4, 32), float("nan"))})
    bad_file(folder, "gone", good)
    pipe = lora_pipeline(ckpt, folder)
    (folder / "gone.safetensors").unlink()  # listed at start, removed since
    why = {"junk": "not a readable safetensors file", "shapes": "to_q.lora_B.weight has shape (5, 4); the module (32 -> 32) needs (32, 4)",
           "unknown": "no linear layer for: blocks.0.attn9.to_q", "outside": "keys outside the transformer (text_encoder.encoder.lora_A.weight)",
           "half": "blocks.0.attn1.to_q has lora_B.weight missing", "dora": "DoRA and LoKr adapters are not supported",
           "nan": "must hold finite", "gone": "no file gone.safetensors", "zzz": "on this worker", "../a": "on this worker"}
    ok = state(pipe, "ok", "a cat", 7, [("a", 1.0)])
    for name, message in why.items():
        with pytest.raises(ValueError, match=f"LoRA adapter {re.escape(repr(name))}.*{re.escape(message)}"):
            state(pipe, name, "a cat", 7, [(name, 1.0)])
    with pytest.raises(ValueError, match="'a' named twice"):
        state(pipe, "twice", "a cat", 7, [("a", 1.0), ("a", 0.5)])
    small = lora_pipeline(ckpt, folder, 1000)
    with pytest.raises(ValueError, match="'a': .* bytes resident, more than the LoRA memory budget"):
        state(small, "big", "a cat", 7, [("a", 1.0)])
    run(pipe, [ok], 2)  # the good request is unaffected
    assert ok.step == 2


def test_a_worker_without_lora_refuses_a_request_that_names_one(ckpt):
    pipe = load_pipeline(ckpt, "m", torch.device("cpu"), torch.float32)
    assert pipe.lora_adapters == ()
    with pytest.raises(ValueError, match="serves no LoRA adapters"):
        state(pipe, "x", "a cat", 7, [("a", 1.0)])
