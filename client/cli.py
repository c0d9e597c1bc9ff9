"""The `diffserve` command: generate, serve, worker, models.

`generate` with --model-path starts a scheduler and its worker locally (a `diffserve serve`
subprocess on a free port), runs one job with a progress bar, saves the artifact and stops the
server; with --server it uses a running server instead.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from diffserve.v1 import generation_pb2 as pb

from diffserve.client.client import Client, DiffserveError, make_params

EXTENSIONS = {pb.OUTPUT_FORMAT_PNG: ".png", pb.OUTPUT_FORMAT_MP4: ".mp4", pb.OUTPUT_FORMAT_NPY: ".npy"}


def seed_type(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError("must be between 0 and 2**64-1")
    return value


def add_worker_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-path", help="diffusers-layout folder, or a hub id where the network allows")
    p.add_argument("--model-name", default="", help="model name clients use (default: the folder's name); with generate --server, the served model to use")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, float32 on CPU), bfloat16, float16, float32")
    p.add_argument("--attention-backend", default="auto", help="auto (fastest exact one available), fa3, flash-attn, cudnn, sdpa")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT (GPU; see bench/NOTES.md)")
    p.add_argument("--cuda-graphs", action="store_true", help="replay the DiT forward from CUDA graphs, one per shape (GPU; docs/cli.md)")
    p.add_argument("--warmup", action="store_true", help="warm up before serving (the first request is not the slow one)")
    p.add_argument("--warmup-shape", action="append", default=[], metavar="HxWxF", help="shape bucket to warm up (repeatable)")
    p.add_argument("--num-gpus", type=int, default=1, help="processes (GPUs) in the worker group (default 1)")
    p.add_argument("--enable-cfg-parallel", action="store_true", help="conditional and unconditional rows on separate halves of the group")
    p.add_argument("--ulysses-degree", type=int, default=0, help="Ulysses sequence-parallel degree (default: chosen from --num-gpus)")
    p.add_argument("--ring-degree", type=int, default=0, help="Ring sequence-parallel degree (default: chosen from --num-gpus)")
    p.add_argument("--tp-size", type=int, default=0, help="tensor-parallel degree (default 1)")
    p.add_argument("--max-batch-size", type=int, default=4, help="most jobs sharing one denoising step (default 4)")
    p.add_argument("--max-resident", type=int, default=8, help="most jobs a worker holds at once (default 8)")
    p.add_argument("--worker-log-level", default="INFO", help="log level of the worker process")


def worker_args(args: argparse.Namespace) -> list[str]:
    out = ["--model-path", args.model_path, "--device", args.device, "--dtype", args.dtype, "--attention-backend", args.attention_backend,
           "--max-batch-size", str(args.max_batch_size), "--max-resident", str(args.max_resident),
           "--log-level", args.worker_log_level]
    if args.model_name:
        out += ["--model-name", args.model_name]
    out += ["--compile"] * args.compile + ["--cuda-graphs"] * args.cuda_graphs + ["--warmup"] * args.warmup
    out += ["--num-gpus", str(args.num_gpus), "--ulysses-degree", str(args.ulysses_degree), "--ring-degree", str(args.ring_degree),
            "--tp-size", str(args.tp_size)]
    out += ["--enable-cfg-parallel"] * args.enable_cfg_parallel
    for shape in args.warmup_shape:
        out += ["--warmup-shape", shape]
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffserve", description="Serve diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="run one job end to end and save its output")
    add_worker_flags(g)
    g.add_argument("--server", default="", help="use a running server (HOST:PORT) instead of starting one")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--num-frames", type=int, help="1 writes a PNG, more an MP4 (H.264)")
    g.add_argument("--fps", type=int)
    g.add_argument("--num-inference-steps", type=int)
    g.add_argument("--guidance-scale", type=float)
    g.add_argument("--guidance-scale-2", type=float, help="low-noise expert's guidance (Wan2.2 A14B)")
    g.add_argument("--seed", type=seed_type, help="0 to 2**64-1 (default: random, reported)")
    g.add_argument("--image-path", action="append", default=[], metavar="PATH_OR_URL",
                   help="conditioning image (image-to-video, editing): a local file (sent as bytes) or an http(s) URL the server fetches; repeatable")
    g.add_argument("--output-format", choices=["png", "mp4", "npy"], default="")
    g.add_argument("--save-output", action="store_true", help="write the artifact (to --output-path)")
    g.add_argument("--output-path", default="outputs", help="file, or folder for an automatic name (default: outputs/)")
    g.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for the model to load")
    g.add_argument("--log-level", default="WARNING")

    s = sub.add_parser("serve", help="run the scheduler (gRPC) and its local worker until Ctrl-C")
    add_worker_flags(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=50051, help="gRPC port (0 picks a free one)")
    s.add_argument("--worker-bind", default="tcp://127.0.0.1:0", help="ZeroMQ address workers connect to")
    s.add_argument("--output-dir", default="outputs")
    s.add_argument("--max-queue", type=int, default=256, help="queued jobs beyond which SubmitJob answers RESOURCE_EXHAUSTED")
    s.add_argument("--heartbeat-timeout", type=float, default=5.0, help="seconds of worker silence before its jobs fail")
    s.add_argument("--no-restart-workers", action="store_true", help="do not restart a local worker that died")
    s.add_argument("--drain-timeout", type=float, default=60.0, help="seconds Ctrl-C waits for running jobs")
    s.add_argument("--image-dir", default="", help="folder whose images requests may name by path (default: paths refused)")
    s.add_argument("--allow-private-image-urls", action="store_true", help="let image URLs reach private, loopback and link-local addresses")
    s.add_argument("--max-image-bytes", type=int, default=20 << 20, help="largest input image, fetched or sent (default 20 MiB)")
    s.add_argument("--image-fetch-timeout", type=float, default=10.0, help="seconds to fetch an image URL")
    s.add_argument("--ready-file", default="", help=argparse.SUPPRESS)
    s.add_argument("--log-level", default="INFO")

    w = sub.add_parser("worker", help="run a worker that connects to a scheduler", add_help=False)
    w.add_argument("rest", nargs=argparse.REMAINDER)

    m = sub.add_parser("models", help="list a server's models")
    m.add_argument("--server", default="127.0.0.1:50051")
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    from diffserve.scheduler.engine import EngineConfig
    from diffserve.scheduler.images import ImagePolicy
    from diffserve.scheduler.launcher import LocalWorkerSpec
    from diffserve.scheduler.server import ServerConfig, run

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s scheduler %(levelname)s %(name)s: %(message)s")
    if args.num_gpus < 1:
        print("error: --num-gpus must be >= 1", file=sys.stderr)
        return 2
    # The layout itself is checked by the worker (it knows the model); an impossible one stops serve.
    specs = [LocalWorkerSpec("local-0", worker_args(args), world_size=args.num_gpus)] if args.model_path else []
    config = ServerConfig(
        host=args.host, port=args.port, worker_bind=args.worker_bind, output_dir=args.output_dir,
        engine=EngineConfig(max_queue=args.max_queue, max_batch_size=args.max_batch_size, heartbeat_timeout_s=args.heartbeat_timeout),
        local_workers=specs, restart_workers=not args.no_restart_workers, drain_timeout_s=args.drain_timeout,
        images=ImagePolicy(allowed_dir=Path(args.image_dir) if args.image_dir else None, allow_private_urls=args.allow_private_image_urls,
                           max_bytes=args.max_image_bytes, timeout_s=args.image_fetch_timeout),
    )

    def started(port: int) -> None:
        if args.ready_file:
            Path(args.ready_file).write_text(str(port))

    return run(config, started)


def start_local_server(args: argparse.Namespace, workdir: str) -> tuple[subprocess.Popen, str]:
    ready = Path(workdir) / "port"
    cmd = [sys.executable, "-m", "diffserve.client.cli", "serve", *worker_args(args), "--port", "0",
           "--output-dir", str(Path(workdir) / "outputs"), "--ready-file", str(ready), "--log-level", args.log_level,
           "--no-restart-workers", "--max-queue", "1"]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"error: the local server did not start (exit code {proc.poll()})")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{ready.read_text()}"


def wait_serving(client: Client, proc: subprocess.Popen | None, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    print("loading the model...", file=sys.stderr, flush=True)
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"error: the server exited (code {proc.returncode}) before the model loaded")
        try:
            if client.health() == "SERVING":
                return
        except DiffserveError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"error: the model did not load within {timeout_s:.0f} s")


def output_file(args: argparse.Namespace, job: pb.Job) -> Path:
    ext = EXTENSIONS[job.params.output_format]
    target = Path(args.output_path)
    if target.suffix and not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        return target
    target.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", job.params.prompt).strip("_")[:48] or "output"
    return target / f"{slug}_{job.params.seed}{ext}"


def image_arg(path_or_url: str) -> bytes | str:
    """A URL goes to the server as is; a local file is read here and sent as bytes."""
    if path_or_url.startswith(("http://", "https://")):
        return path_or_url
    try:
        return Path(path_or_url).expanduser().read_bytes()
    except OSError as exc:
        raise SystemExit(f"error: --image-path {path_or_url}: {exc.strerror}") from None


def run_job(client: Client, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    params = make_params(
        args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
        num_frames=args.num_frames, fps=args.fps, num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale, guidance_scale_2=args.guidance_scale_2, seed=args.seed, output_format=args.output_format,
        model=args.model_name or "", images=[image_arg(p) for p in args.image_path],
    )
    bar = None
    job_id = ""
    try:
        for event in client.generate(params=params):
            job_id = event.job_id
            kind = event.WhichOneof("event")
            if kind == "queued":
                print(f"job {job_id} queued at position {event.queued.position}", file=sys.stderr)
            elif kind == "stage_started":
                stage = pb.Stage.Name(event.stage_started.stage).removeprefix("STAGE_").lower()
                if bar is not None:
                    bar.set_postfix_str(stage)
                else:
                    print(f"{stage}...", file=sys.stderr)
            elif kind == "step_completed":
                step = event.step_completed
                if bar is None:
                    bar = tqdm(total=step.total_steps, desc="denoising", unit="step", file=sys.stderr)
                bar.update(step.step - bar.n)
            elif kind == "failed":
                print(f"error: job failed: {event.failed.status.message}", file=sys.stderr)
                return 1
            elif kind == "cancelled":
                print(f"job cancelled: {event.cancelled.status.message}", file=sys.stderr)
                return 1
    except DiffserveError as err:
        print(f"error: {err}", file=sys.stderr)
        for field, description in err.field_violations:
            print(f"  {field}: {description}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    job = client.get(job_id)
    print(f"job {job.id} done: seed {job.params.seed}, {job.params.width}x{job.params.height}, {job.params.num_frames} frame(s)", file=sys.stderr)
    if not args.save_output:
        print("output not written (pass --save-output)", file=sys.stderr)
        return 0
    path = output_file(args, job)
    client.download(job.id, path)
    print(path)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if not args.server and not args.model_path:
        print("error: give --model-path (start a local server) or --server HOST:PORT", file=sys.stderr)
        return 2
    if args.server:
        with Client(args.server) as client:
            return run_job(client, args)
    with tempfile.TemporaryDirectory(prefix="diffserve-") as workdir:
        proc, target = start_local_server(args, workdir)
        try:
            with Client(target) as client:
                wait_serving(client, proc, args.startup_timeout)
                return run_job(client, args)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def cmd_models(args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    with Client(args.server) as client:
        for model in client.list_models():
            print(json_format.MessageToJson(model, preserving_proto_field_name=True))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "worker":
        from diffserve.worker.__main__ import main as worker_main

        return worker_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return {"generate": cmd_generate, "serve": cmd_serve, "models": cmd_models}[args.command](args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
