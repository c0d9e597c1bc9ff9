"""`diffserve serve --quantization fp8`: the local worker gets the flag, loads the tiny Wan with its
block linears in FP8, says so in ListModels (`quantizations`), and a job draws what diffusers' float32
WanPipeline draws to within a few levels. (On the tiny model the FP8 error barely reaches the decoded
picture; tests/models/test_fp8.py measures it at the transformer's output, bench/fp8_forward.py at
full size.)"""

from __future__ import annotations

import numpy as np

from jobs_util import npy_output
from reference import wan_reference

PARAMS = dict(prompt="a cat in the snow", negative_prompt="", height=32, width=32, num_frames=1, num_inference_steps=10,
              guidance_scale=5.0, seed=7, output_format="npy")
# Levels of 255; measured on this job: max 1, mean 0.0007 (the exact path's parity tests allow 1-2).
MEAN_LEVELS, MAX_LEVELS = 0.05, 4


def test_a_worker_serving_fp8_says_so_and_draws_close_to_the_float_pipeline(tiny_wan, start_server):
    server = start_server(tiny_wan, "--quantization", "fp8")
    client = server.client
    (model,) = client.list_models()
    assert list(model.quantizations) == ["fp8"]
    ours = npy_output(client, client.submit(**PARAMS).id)
    ref = wan_reference(tiny_wan, prompt=PARAMS["prompt"], height=32, width=32, num_frames=1, steps=10, guidance=5.0, seed=7)
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    assert diff.max() <= MAX_LEVELS and diff.mean() <= MEAN_LEVELS, (diff.max(), diff.mean())
