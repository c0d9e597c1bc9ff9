"""--cuda-graphs through real pipelines: batches that grow and shrink between steps give the eager output.

python bench/graphs_check.py             (GPU: tiny FLUX and Wan2.1 checkpoints, bf16, CUDA graphs)
python bench/graphs_check.py --device cpu (checks the script: GraphedForward runs eagerly off the GPU)

Each model runs the same schedule twice, eager and with every DiT wrapped by --cuda-graphs'
GraphedForward: three requests of two sizes admitted at different steps, so the step batches change
(1 row, 2 rows, 3 rows of one size plus a group of another, then shrinking as requests finish), and
a graph is captured for each new batch signature. Every request's decoded frames must match the eager
run's: identical is expected (a replayed graph runs the same kernels on the same inputs); up to
2 uint8 levels are let through in case a library picks another kernel under capture.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.fixtures.tiny

# (request id, height, width, frames, seed, first step it joins)
SCHEDULE = [("a", 64, 64, 5, 1, 0), ("b", 64, 64, 5, 2, 1), ("c", 64, 96, 5, 3, 1), ("d", 64, 64, 5, 4, 2)]
STEPS = 4


def run(pipeline, graphs: bool) -> tuple[dict[str, np.ndarray], int]:
    from diffserve.scheduler.requests import worker_request
    from diffserve.v1 import generation_pb2 as pb
    from diffserve.worker.cuda_graphs import graph_dits
    from diffserve.worker.models import dits

    models = dits(pipeline)
    originals = [m.forward for m in models]
    if graphs:
        graph_dits(pipeline)
    try:
        d = pipeline.card.defaults
        active, done, step = [], {}, 0
        while len(done) < len(SCHEDULE):
            for rid, h, w, f, seed, join in SCHEDULE:
                if join == step:
                    params = pb.GenerationParams(prompt=f"a photo of a cat {rid}", height=h, width=w, num_frames=f if d.num_frames > 1 else 1,
                                                 num_inference_steps=STEPS, guidance_scale=d.guidance_scale, seed=seed)
                    state = pipeline.admit(rid, worker_request(params, pipeline.card))
                    pipeline.encode(state)
                    pipeline.prepare(state)
                    active.append(state)
            for size in sorted({(s.request.height, s.request.width) for s in active}):  # one size per command, as the scheduler sends
                pipeline.denoise_step([s for s in active if (s.request.height, s.request.width) == size])
            for s in [s for s in active if s.step == STEPS]:
                done[s.request_id] = pipeline.decode(s)
                active.remove(s)
            step += 1
        captures = sum(getattr(m.forward, "captures", 0) for m in models)
    finally:
        for m, forward in zip(models, originals):
            m.forward = forward
    return done, captures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    from tests.fixtures.tiny.flux import build_tiny_flux
    from tests.fixtures.tiny.wan import build_tiny_wan

    from diffserve.worker.registry import load_pipeline

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.set_grad_enabled(False)
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in (("tiny-flux", build_tiny_flux), ("tiny-wan", build_tiny_wan)):
            pipeline = load_pipeline(build(Path(tmp) / name), name, device, dtype)
            eager, _ = run(pipeline, graphs=False)
            graphed, captures = run(pipeline, graphs=True)
            worst = max(int(np.abs(eager[r].astype(int) - graphed[r].astype(int)).max()) for r in eager)
            ok = worst <= 2 and (captures > 0 or device.type != "cuda")
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name}: {len(eager)} requests, {captures} graphs captured, "
                  f"max frame difference graphs vs eager {worst} (uint8 levels)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
