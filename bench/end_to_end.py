"""One Wan2.1-T2V-1.3B job through the real service: 480x832x81, 50 steps, CFG (guidance 5.0).

    python bench/end_to_end.py [--compile] [--checkpoint DIR]     (GPU; writes $OUT/<date>-<card>-end_to_end.json)
    python bench/end_to_end.py --tiny                               (CPU: tiny checkpoint, 32x32x5, 2 steps)

Writes a full-size Wan2.1-T2V-1.3B checkpoint with random weights (bench/service.py's build_checkpoint:
tests/fixtures/tiny/wan.py's build_wan with the real configs: the 1.3B DiT, UMT5-XXL in bf16, the default Wan VAE, the UniPC flow scheduler;
~17 GB, built on the GPU) unless --checkpoint names one, starts `diffserve serve` on it (warm-up at
the job's shape first, so the timed job is not the cold one), runs the job with the gRPC client and
reports the stages from the job's event times (scheduler clock): encode, prepare, denoise, decode,
save, and their total.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import tempfile
import time
from pathlib import Path

from common import card, print_table, results_name, write_json
from dit_forward import WAN_13B, wan_flops
from service import PROMPT, Server, build_checkpoint


def run_job(client, height: int, width: int, frames: int, steps: int, guidance: float) -> dict:
    """Runs one job; returns the stage durations (s) from its event times and the steps' worker times."""
    from diffserve.client import make_params
    from diffserve.v1 import generation_pb2 as pb

    params = make_params(PROMPT, height=height, width=width, num_frames=frames, num_inference_steps=steps,
                         guidance_scale=guidance, seed=0, output_format="npy")
    stage_start, step_ms, end, failure = {}, [], None, None
    started = time.perf_counter()
    for event in client.generate(params=params):
        t = event.time.ToNanoseconds() / 1e9
        kind = event.WhichOneof("event")
        if kind == "stage_started":
            stage_start.setdefault(pb.Stage.Name(event.stage_started.stage).removeprefix("STAGE_").lower(), t)
        elif kind == "step_completed":
            step_ms.append(event.step_completed.step_ms)
        elif kind == "completed":
            end = t
        elif kind in ("failed", "cancelled"):
            failure = getattr(event, kind).status.message
    wall = time.perf_counter() - started
    if end is None:
        raise SystemExit(f"error: the job did not complete: {failure}")
    order = ["encode", "prepare", "denoise", "decode", "save"]
    marks = [stage_start[s] for s in order] + [end]
    stages = {s: marks[i + 1] - marks[i] for i, s in enumerate(order)}
    return dict(stages=stages, total=end - marks[0], wall=wall, steps=len(step_ms), step_ms=statistics.median(step_ms))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compile", action="store_true", help="worker --compile (torch.compile of the DiT)")
    p.add_argument("--no-warmup", action="store_true", help="do not warm the worker up at the job's shape first")
    p.add_argument("--checkpoint", default="", help="use this Wan2.1 folder instead of writing a random one")
    p.add_argument("--num-gpus", type=int, default=1, help="serve --num-gpus (with 2: CFG-parallel, chosen automatically)")
    p.add_argument("--serve-args", default="", help='more `diffserve serve` flags, e.g. "--ulysses-degree 2 --cuda-graphs"')
    p.add_argument("--steps", type=int, default=0, help="denoising steps (default 50; --tiny: 2)")
    p.add_argument("--tiny", action="store_true", help="tiny checkpoint on the CPU, 32x32x5, 2 steps (checks the script)")
    p.add_argument("--out", default="", help="folder for the JSON (default $OUT, else bench/results; --tiny: a temporary folder)")
    args = p.parse_args(argv)
    height, width, frames = (32, 32, 5) if args.tiny else (480, 832, 81)
    steps = args.steps or (2 if args.tiny else 50)
    guidance = 5.0
    out = args.out or os.environ.get("OUT") or (tempfile.mkdtemp(prefix="end-to-end-tiny-") if args.tiny else None)

    with tempfile.TemporaryDirectory(prefix="diffserve-e2e-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        ckpt = Path(args.checkpoint) if args.checkpoint else build_checkpoint(tmp / "wan-1.3b-random", args.tiny)
        print(f"checkpoint {ckpt}: {time.perf_counter() - started:.0f} s", flush=True)
        extra = ["--compile"] * args.compile + ["--num-gpus", str(args.num_gpus), *shlex.split(args.serve_args)]
        if not args.no_warmup:
            extra += ["--warmup-shape", f"{height}x{width}x{frames}"]
        started = time.perf_counter()
        server = Server(ckpt, tmp, extra, startup_timeout_s=120 if args.tiny else 480)
        startup_s = time.perf_counter() - started
        print(f"server ready (load{' + warm-up' if not args.no_warmup else ''}{' + compile' if args.compile else ''}): {startup_s:.0f} s", flush=True)
        try:
            result = run_job(server.client, height, width, frames, steps, guidance)
        finally:
            server.client.close()
            server.stop()

    device_card = "cpu" if args.tiny else card()
    dit_flop = 2 * steps * wan_flops(WAN_13B, dict(latent=(16, (frames - 1) // 4 + 1, height // 8, width // 8), text=512))
    stages = result["stages"]
    row = dict(
        model=f"wan-{'tiny' if args.tiny else '1.3b'}-e2e-{steps}step", shape=f"{height}x{width}x{frames}", card=device_card,
        version=("compiled" if args.compile else "eager") + (f", {args.num_gpus} GPUs" if args.num_gpus > 1 else "") + (f", {args.serve_args}" if args.serve_args else ""), diffserve_ms=round(result["total"] * 1e3), diffusers_ms=None, ratio=None,
        tflops=None if args.tiny else round(dit_flop / stages["denoise"] / 1e12),  # DiT FLOPs (2 CFG rows per step) over denoise time
        **{f"{s}_ms": round(v * 1e3) for s, v in stages.items()},
        step_ms_median=round(result["step_ms"], 1), steps=result["steps"], guidance=guidance, client_wall_ms=round(result["wall"] * 1e3),
        startup_s=round(startup_s), warmup=not args.no_warmup,
    )
    path = write_json(results_name("end_to_end"), [row], out)
    print_table([row], ["model", "shape", "version", "diffserve_ms", "encode_ms", "prepare_ms", "denoise_ms", "decode_ms",
                        "save_ms", "step_ms_median", "tflops", "client_wall_ms", "card"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
