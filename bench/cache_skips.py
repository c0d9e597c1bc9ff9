"""How many of a step cache's row-steps a model computes (CPU, in-process): the quality score of a
policy (demo/quality.py --cache) means little without it.

    python bench/cache_skips.py MODEL_PATH [--steps 20] [--cache SPEC ...] [--prompts N]
    python bench/cache_skips.py --tiny [--cache SPEC ...]      (the tiny Wan, 2 prompts, 4 steps: the script runs)

Runs the demo quality set's first N stills through our Wan pipeline (no service), each policy in
turn, and prints per policy the share of (request row, step) pairs that ran the model's blocks.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_path", nargs="?", default="")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--cache", action="append", default=[])
    args = p.parse_args(argv)
    if not args.tiny and not args.model_path:
        p.error("give MODEL_PATH (or --tiny)")
    with tempfile.TemporaryDirectory(prefix="cache-skips-") as folder, torch.no_grad():  # (not set_grad_enabled: tests run main in-process)
        if args.tiny:
            from service import build_checkpoint

            args.model_path, args.prompts, args.steps = build_checkpoint(Path(folder) / "tiny-wan", tiny=True), 2, 4
        return run(args)


def run(args) -> int:
    from diffserve.client import make_params
    from diffserve.client.client import step_cache
    from diffserve.demo.quality import scenes
    from diffserve.scheduler.requests import worker_request
    from diffserve.scheduler.validation import resolve_cache
    from diffserve.v1 import generation_pb2 as pb
    from diffserve.worker.registry import load_pipeline

    pipe = load_pipeline(Path(args.model_path), "m", torch.device("cpu"), torch.float32)
    card = pb.Model(cache_policies=pipe.cache_policies)  # what the scheduler checks the request against
    for spec in args.cache:
        computed = total = 0
        for i, scene in enumerate(scenes()[: args.prompts]):
            params = make_params(scene.caption, height=64, width=64, num_frames=1, num_inference_steps=args.steps,
                                 guidance_scale=5.0, seed=i + 1)
            params.cache.CopyFrom(step_cache(spec))
            problems = resolve_cache(params, params, card)  # the knobs the scheduler fills
            if problems:
                raise SystemExit(f"error: --cache {spec}: {problems}")
            request = worker_request(params, pipe.card)
            state = pipe.admit(f"r{i}", request)
            pipe.encode(state)
            pipe.prepare(state)
            for _ in range(args.steps):
                pipe.denoise_step([state])
            for cache in state.step_caches.values():
                computed, total = computed + cache.computed, total + len(cache.history)
        print(f"{spec}: {computed} of {total} row-steps computed ({computed / max(1, total):.0%})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
