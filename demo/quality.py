"""Prompt adherence of a model that draws demo scenes, through the real service (issue 16):

    python -m diffserve.demo.quality [--model-path DIR] [--steps 20] [--guidance 5] [--cache SPEC] [--json OUT]

A fixed set of scenes (PROMPTS stills and CLIPS clips, drawn by data.sample from fixed seeds) is
generated at SEEDS through `diffserve.Engine` (a private `diffserve serve` on the CPU), and
evaluate.judge reads each picture back. Printed and returned: the share right per attribute —
"colour+background", "shape", "place" (stills), "size" (stills), "motion" (clips). The issue's
bars: colour+background >= 0.9, shape and place >= 0.8, motion >= 0.8. Accelerations report their
score beside the exact path's (issue 17): `--cache SPEC` gives every job that step cache (the
client's syntax, e.g. `taylorseer:interval=3`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np

from diffserve.demo.data import Scene, sample
from diffserve.demo.evaluate import judge, score

PROMPTS = 30  # stills
CLIPS = 12
SEEDS = (1, 2)
CLIP_FRAMES = 9
BARS = {"colour+background": 0.9, "shape": 0.8, "place": 0.8, "motion": 0.8}


def scenes() -> list[Scene]:
    """The fixed evaluation set (seeds far from the training run's draws)."""
    return [sample(900_000 + i) for i in range(PROMPTS)] + [sample(950_000 + i, frames=CLIP_FRAMES) for i in range(CLIPS)]


def evaluate(generate: Callable[[Scene, int], np.ndarray], concurrency: int = 1) -> dict:
    """generate(scene, seed) -> uint8 (F, H, W, 3) pixels for the scene's caption; `concurrency` calls at
    once (a server batches them into shared steps)."""
    from concurrent.futures import ThreadPoolExecutor

    cases = [(scene, seed) for scene in scenes() for seed in SEEDS]
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        pictures = list(pool.map(lambda case: generate(*case), cases))
    verdicts = [judge(scene, picture) for (scene, _), picture in zip(cases, pictures)]
    result = score(verdicts)
    result["passed"] = all(result.get(k, 0.0) >= bar for k, bar in BARS.items())
    result["judged"] = len(verdicts)
    return result


def run(model_path, steps: int = 20, guidance: float = 5.0, concurrency: int = 8, cache: str = "") -> dict:
    """The prompt set through a private `diffserve serve` of `model_path` on the CPU, scored; `cache`:
    every job's step cache ("": exact)."""
    from diffserve import Engine

    started = time.perf_counter()
    extra = {"cache": cache} if cache else {}
    with Engine(str(model_path), device="cpu", max_batch_size=concurrency) as engine:
        def generate(scene: Scene, seed: int) -> np.ndarray:
            return engine.generate(scene.caption, height=64, width=64, num_frames=scene.frames, seed=seed,
                                   num_inference_steps=steps, guidance_scale=guidance, output_format="npy", **extra).frames

        result = evaluate(generate, concurrency=concurrency)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffserve.demo.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", default="", help="a pipeline folder (default: the built-in model)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--cache", default="", help="every job's step cache, e.g. taylorseer:interval=3 (default: exact)")
    p.add_argument("--json", default="", help="also write the scores here")
    args = p.parse_args(argv)
    from diffserve.demo import builtin_model

    path = args.model_path or builtin_model()
    if not path:
        p.error("this install has no built-in model: give --model-path DIR")
    result = run(path, args.steps, args.guidance, cache=args.cache)
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
