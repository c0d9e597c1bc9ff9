"""MagCache calibration: a checkpoint's magnitude ratios, for StepCache.mag_ratios (docs/acceleration.md).

python bench/mag_calibrate.py MODEL_PATH --steps 50 --prompt "a cat walking in the snow"
    [--height H --width W --num-frames F --guidance-scale G --seed S] [--device cuda --dtype bfloat16]

One request runs exactly through our pipeline; at every step each row records the mean over tokens
of |r_s| / |r_{s-1}|, r the residual the whole block stack adds (1.0 at the first step): what
diffusers' MagCacheConfig(calibrate=True) prints (tests/models/test_mag_cache.py compares them).
The ratios belong to the model, its sampler and the step count (a request with another count gets
them nearest-interpolated); MagCache reports them steady across prompts. Prints JSON, one list per
row kind: "cond", "uncond" (per expert on two-expert models: "cond/expert1", ...). Pass "cond".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def calibrate(pipeline, params) -> dict[str, list[float]]:
    """The magnitude ratios of one exact run of `params` (a diffserve.v1.GenerationParams; unset
    fields take the card's defaults), per row kind."""
    from diffserve.scheduler.requests import worker_request
    from diffserve.scheduler.validation import resolve_params

    request = worker_request(resolve_params(params, pipeline.card), pipeline.card)
    request.cache.policy = "mag"  # without ratios: calibration (worker/pipelines/step_caches.py)
    state = pipeline.admit("calibration", request)
    pipeline.encode(state)
    pipeline.prepare(state)
    for _ in range(request.num_inference_steps):
        pipeline.denoise_step([state])
    return {("uncond" if uncond else "cond") + (f"/expert{expert}" if expert else ""): cache.calibration
            for (expert, uncond), cache in sorted(state.step_caches.items())}


def main() -> None:
    from diffserve.v1 import generation_pb2 as pb
    from diffserve.worker.registry import load_pipeline

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model_path", type=Path)
    p.add_argument("--prompt", default="a cat walking in the snow")
    p.add_argument("--steps", type=int, help="num_inference_steps (default: the model's)")
    for flag in ("--height", "--width", "--num-frames"):
        p.add_argument(flag, type=int, help="default: the model's")
    p.add_argument("--guidance-scale", type=float, help="default: the model's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = p.parse_args()
    pipeline = load_pipeline(args.model_path, "m", torch.device(args.device), getattr(torch, args.dtype))
    params = pb.GenerationParams(prompt=args.prompt, seed=args.seed)
    for name, value in (("num_inference_steps", args.steps), ("height", args.height), ("width", args.width),
                        ("num_frames", args.num_frames), ("guidance_scale", args.guidance_scale)):
        if value is not None:
            setattr(params, name, value)
    print(json.dumps(calibrate(pipeline, params)))


if __name__ == "__main__":
    main()
