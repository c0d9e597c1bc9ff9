"""--compile / --warmup wiring: compiled DiTs give the same output; warm-up leaves no state behind."""

from __future__ import annotations

import pytest
import torch

from diffserve.scheduler.requests import worker_request
from diffserve.v1 import generation_pb2 as pb
from diffserve.worker.registry import load_pipeline
from diffserve.worker.models import dits
from diffserve.worker.warmup import compile_dits, parse_shape, warm_up


def run(pipeline, seed=1):
    params = pb.GenerationParams(prompt="a cat", negative_prompt="", height=32, width=32, num_frames=1,
                                 num_inference_steps=2, guidance_scale=5.0, seed=seed)
    state = pipeline.admit("r", worker_request(params, pipeline.card))
    pipeline.encode(state)
    pipeline.prepare(state)
    while state.step < 2:
        pipeline.denoise_step([state])
    return pipeline.decode(state)


def test_compiled_dit_same_output_and_warmup(tiny_wan):
    pipeline = load_pipeline(tiny_wan, "tiny", torch.device("cpu"), torch.float32)
    assert len(dits(pipeline)) == 1
    before = run(pipeline)
    # The eager backend checks the wiring fast on CPU; the worker uses inductor (measured on GPU).
    assert compile_dits(pipeline, backend="eager") == 1
    warm_up(pipeline, [(32, 32, 1), (32, 48, 5)])
    assert (run(pipeline) == before).all()


def test_compiled_dit_does_not_recompile_on_its_second_step(tiny_wan):
    """compile_dits resolves the attention backend first: filling the dispatch cache inside the first
    compiled call would fail its guards and recompile the whole DiT on the next step."""
    import torch._dynamo as dynamo

    from diffserve.kernels import attention

    pipeline = load_pipeline(tiny_wan, "tiny", torch.device("cpu"), torch.float32)
    dynamo.reset()
    attention.configure("auto")  # empties the dispatch cache, as in a fresh worker
    compile_dits(pipeline, backend="eager")
    with dynamo.config.patch(error_on_recompile=True):
        run(pipeline)  # two steps, same shapes: the second must reuse the first one's graph


def test_parse_shape():
    assert parse_shape("480x832x81") == (480, 832, 81) and parse_shape("1024x1024") == (1024, 1024, 1)
    with pytest.raises(ValueError):
        parse_shape("480by832")
