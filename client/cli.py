"""The `diffserve` command: generate, serve, worker, keys, models.

The client commands live here: `generate` runs one job with a progress bar and saves the
artifact, `models` lists a server's models. The rest is delegated by process, not by import (the
client package imports only the protos): `serve` execs the composition root (`python -m
diffserve.scheduler.app`, which wires the scheduler to its local workers), `worker` execs
`python -m diffserve.worker`, `keys` execs the key store's command (`python -m
diffserve.scheduler.keys`). `generate --model-path` starts a one-job local server as a subprocess
on a free port (client/local.py) and stops it afterwards; with --server it uses a running server
instead. The worker flags are defined once, in diffserve.worker.v1.launch.

`generate` on SIGINT (Ctrl-C) or SIGTERM cancels its job (CancelJob), stops its local server if it
started one, removes its temporary folder and exits 130 (SIGINT) or 143 (SIGTERM).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import tempfile
import uuid
from importlib import metadata
from pathlib import Path

from diffserve.v1 import generation_pb2 as pb

from diffserve.client.client import Client, DiffserveError, local_image, make_params
from diffserve.client.local import ServerStartError, local_server, wait_serving
from diffserve.worker.v1.launch import ENV_EPILOG, add_worker_flags, env_defaults

# Subcommands that are other programs: the composition root and the worker process.
DELEGATED = {"serve": "diffserve.scheduler.app", "worker": "diffserve.worker", "keys": "diffserve.scheduler.keys"}
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM  # 130, 143
# The CLI's deadline for its unary calls (ListModels, GetJob, CancelJob), waiting for the
# connection included: a server that is starting gets this long, a closed port costs this long
# (then one line saying why); the library's default (30 s) suits programs, not a terminal.
CLI_TIMEOUT_S = 5.0
EXTENSIONS = {pb.OUTPUT_FORMAT_PNG: ".png", pb.OUTPUT_FORMAT_MP4: ".mp4", pb.OUTPUT_FORMAT_NPY: ".npy"}


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt is for SIGINT, so the same cleanup runs."""


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


def package_version() -> str:
    """The installed distribution's version (`diffserve --version`)."""
    try:
        return metadata.version("diffserve")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def unreachable(err: DiffserveError, target: str) -> str | None:
    """One line for a server that cannot be reached at all, or None for any other error.

    gRPC reports both a transport failure (nothing listens, the name does not resolve) and a server
    that refuses work (draining, store down) as UNAVAILABLE; the server's own refusals carry an
    ErrorInfo reason, the transport's do not. A unary call that waited for the connection
    (wait_for_ready) ends DEADLINE_EXCEEDED instead; the client then says why in `unreachable`
    (empty when the server was reached and only slow)."""
    if err.code.name == "DEADLINE_EXCEEDED" and err.unreachable:
        text = err.unreachable
    elif err.code.name != "UNAVAILABLE" or err.reason:
        return None
    else:
        text = err.message
    if "Connection refused" in text:
        why = "connection refused"
    elif "resolving" in text or "DNS" in text:
        why = "the host name does not resolve"
    elif "timed out" in text.lower() or "Deadline" in text:
        why = "connection timed out"
    else:
        why = text.rsplit(": ", 1)[-1].strip() or "unavailable"
    return f"error: no diffserve server at {target} ({why}); start one with `diffserve serve`"


def report_error(err: DiffserveError, target: str) -> None:
    """A failed call as the CLI prints it: one line (plus the fields a bad request names)."""
    line = unreachable(err, target)
    if line is not None:
        print(line, file=sys.stderr)
        return
    print(f"error: {err}", file=sys.stderr)
    for field, description in err.field_violations:
        print(f"  {field}: {description}", file=sys.stderr)


def seed_type(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError("must be between 0 and 2**64-1")
    return value


def add_client_flags(p: argparse.ArgumentParser) -> None:
    """How to reach a server that has TLS and tokens (`serve --tls-cert/--auth-tokens`)."""
    p.add_argument("--token", default=None, help="bearer token (default: $DIFFSERVE_TOKEN)")
    p.add_argument("--tls-ca", default="", metavar="PEM", help="CA that signed the server's certificate: connect over TLS")
    p.add_argument("--tls", action="store_true", help="connect over TLS trusting the system's CAs (without --tls-ca)")
    p.add_argument("--tls-cert", default="", metavar="PEM", help="this client's certificate, for a server with --tls-client-ca")
    p.add_argument("--tls-key", default="", metavar="PEM", help="the private key of --tls-cert")


def connect(args: argparse.Namespace, target: str) -> Client:
    """A Client for --server with the token and TLS flags."""
    def read(flag: str, path: str) -> bytes | None:
        if not path:
            return None
        try:
            return Path(path).expanduser().read_bytes()
        except OSError as exc:
            raise SystemExit(f"error: {flag} {path}: {exc.strerror}") from None

    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("error: --tls-cert and --tls-key go together")
    return Client(target, token=args.token, tls=args.tls, root_certificates=read("--tls-ca", args.tls_ca),
                  certificate_chain=read("--tls-cert", args.tls_cert), private_key=read("--tls-key", args.tls_key),
                  timeout_s=CLI_TIMEOUT_S)


def cache_arg(value: str):
    from diffserve.client.client import step_cache

    try:
        return step_cache(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def lora_arg(value: str):
    from diffserve.client.client import lora_adapter

    try:
        return lora_adapter(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser(environ: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """The `diffserve` command line; defaults from DIFFSERVE_* variables of `environ` (os.environ)."""
    parser = argparse.ArgumentParser(prog="diffserve", description="Serve diffusion transformers.", epilog=ENV_EPILOG)
    parser.add_argument("--version", action="version", version=f"diffserve {package_version()}",
                        help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", required=True, help="the command (diffserve COMMAND --help for its flags)")

    g = sub.add_parser("generate", help="run one job end to end and save its output", epilog=ENV_EPILOG,
                       description="Run one job with a progress bar: on a private server started for it (--model-path DIR, "
                                   "or the built-in demo model where neither flag is given) or on a running one (--server HOST:PORT).")
    # Groups, printed in this order by --help: generate's own flags first, the worker flags last.
    job = g.add_argument_group("the job")
    job.add_argument("--prompt", required=True, help="what to generate")
    job.add_argument("--negative-prompt", default=None, help="what to steer away from (models with classifier-free guidance)")
    job.add_argument("--height", type=int, help="output height in pixels (default: the model's)")
    job.add_argument("--width", type=int, help="output width in pixels (default: the model's)")
    job.add_argument("--num-frames", type=int, help="1 writes a PNG, more an MP4 (H.264)")
    job.add_argument("--fps", type=int, help="frames per second of an MP4 (default: the model's)")
    job.add_argument("--num-inference-steps", type=int, help="denoising steps (default: the model's)")
    job.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale (default: the model's)")
    job.add_argument("--guidance-scale-2", type=float, help="low-noise expert's guidance (Wan2.2 A14B)")
    job.add_argument("--seed", type=seed_type, help="0 to 2**64-1 (default: random, reported)")
    job.add_argument("--cache", default=None, type=cache_arg, metavar="POLICY[:THRESHOLD][:KNOB=VALUE]",
                     help="step caching, an approximation this job opts into: first-block:0.1, taylorseer:interval=4:max_order=2 "
                          "or mag:0.06:mag_ratios=R1,R2,... (the model must offer it: `diffserve models` cache_policies; "
                          "knobs and defaults: docs/acceleration.md). Default: exact")
    job.add_argument("--lora", action="append", default=[], type=lora_arg, metavar="NAME[:SCALE]",
                     help="apply the server's LoRA adapter NAME at SCALE (default 1.0; -4..4); repeatable for several adapters "
                          "(the model lists its own: `diffserve models` lora_adapters; docs/acceleration.md)")
    job.add_argument("--image-path", action="append", default=[], metavar="PATH_OR_URL",
                     help="conditioning image (image-to-video, editing): a local file (sent as bytes) or an http(s) URL the server fetches; repeatable")
    job.add_argument("--output-format", choices=["png", "mp4", "npy"], default="",
                     help="png, mp4 or npy (raw frames) (default: png for one frame, mp4 for more)")
    job.add_argument("--priority", type=int, default=None, metavar="N",
                     help="with --server: higher runs sooner (-100..100; default: your principal's default, also the most you may ask for)")
    out = g.add_argument_group("output")
    out.add_argument("--save-output", action="store_true", help="write the artifact (to --output-path)")
    out.add_argument("--output-path", default="outputs", help="file, or folder for an automatic name (default: outputs/)")
    remote = g.add_argument_group("a running server")
    remote.add_argument("--server", default="", help="use a running server (HOST:PORT) instead of starting one")
    add_client_flags(remote)
    local = g.add_argument_group("the private server (--model-path) and its workers")
    local.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for the model to load")
    local.add_argument("-v", "--verbose", action="store_true",
                       help="show the private server's and its workers' INFO log lines (default: warnings and errors only)")
    local.add_argument("--log-level", default=None,
                       help="log level of the private server (default WARNING, INFO with --verbose)")
    add_worker_flags(local, outer=True)
    # --worker-log-level: unset means WARNING, or INFO with --verbose (cmd_generate)
    g.set_defaults(worker_log_level=None)

    # Delegated with their own parsers: serve to the composition root, worker to the worker process.
    s = sub.add_parser("serve", help="run the scheduler (gRPC) and its local worker until Ctrl-C", add_help=False)
    s.add_argument("rest", nargs=argparse.REMAINDER, help="serve's flags (diffserve serve --help)")

    w = sub.add_parser("worker", help="run a worker that connects to a scheduler", add_help=False)
    w.add_argument("rest", nargs=argparse.REMAINDER, help="the worker's flags (diffserve worker --help)")

    k = sub.add_parser("keys", help="manage the worker protocol's CURVE keys (new, add, list, remove, scheduler)", add_help=False)
    k.add_argument("rest", nargs=argparse.REMAINDER, help="the keys command's arguments (diffserve keys --help)")

    m = sub.add_parser("models", help="list a server's models")
    m.add_argument("--server", default="127.0.0.1:50051", help="the server to ask (HOST:PORT; default 127.0.0.1:50051)")
    add_client_flags(m)
    env_defaults(parser, environ)  # --foo-bar from DIFFSERVE_FOO_BAR (serve and worker: their own parsers do it)
    return parser


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
    try:
        return local_image(path_or_url)
    except OSError as exc:
        raise SystemExit(f"error: --image-path {path_or_url}: {exc.strerror}") from None


def cancel_on_interrupt(client: Client, job_id: str) -> None:
    """Ctrl-C or SIGTERM while a job runs: cancel it before leaving."""
    if not job_id:
        return
    try:
        client.cancel(job_id, timeout_s=5)
        print(f"job {job_id} cancelled", file=sys.stderr)
    except DiffserveError as err:
        print(f"could not cancel job {job_id}: {err}", file=sys.stderr)


def run_job(client: Client, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    params = make_params(
        args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
        num_frames=args.num_frames, fps=args.fps, num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale, guidance_scale_2=args.guidance_scale_2, seed=args.seed, output_format=args.output_format,
        cache=args.cache, loras=args.lora or None,
        model=args.model_name or "", images=[image_arg(p) for p in args.image_path],
    )
    bar = None
    job_id = ""
    try:
        # A private server (--model-path) runs this job alone: its priority would change nothing.
        # With --server, a client_request_id makes the request safe to try again when the queue is
        # full (the client waits the server's RetryInfo delay, a few times at most).
        request_id = uuid.uuid4().hex if args.server else ""
        for event in client.generate(params=params, priority=args.priority if args.server else None, client_request_id=request_id):
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
        report_error(err, args.server or "the local server")
        return 2
    except (KeyboardInterrupt, Terminated):
        if bar is not None:
            bar.close()
            bar = None
        cancel_on_interrupt(client, job_id)
        raise
    finally:
        if bar is not None:
            bar.close()
    job = client.get(job_id)
    print(f"job {job.id} done: seed {job.params.seed}, {job.params.width}x{job.params.height}, {job.params.num_frames} frame(s)", file=sys.stderr)
    if not args.save_output:
        print("output not written (pass --save-output)", file=sys.stderr)
        return 0
    path = output_file(args, job)
    try:
        client.download_to(job.id, path)  # streamed to a temporary file beside `path`, then renamed
    except DiffserveError as err:
        report_error(err, args.server or "the local server")
        return 2
    except OSError as exc:
        print(f"error: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def private_log_levels(args: argparse.Namespace) -> None:
    """The private server's (--log-level) and its workers' (--worker-log-level) levels where not
    given: WARNING, or INFO with --verbose."""
    level = "INFO" if args.verbose else "WARNING"
    args.log_level = args.log_level or level
    args.worker_log_level = args.worker_log_level or level


def cmd_generate(args: argparse.Namespace) -> int:
    if not args.server and not args.model_path:
        from diffserve.demo import builtin_model

        path = builtin_model()
        if path is None:
            print("error: this install has no built-in model: give --model-path DIR (start a local server) "
                  "or --server HOST:PORT", file=sys.stderr)
            return 2
        args.model_path = str(path)
    if args.server:
        with connect(args, args.server) as client:
            return run_job(client, args)
    # The private server's and its workers' INFO lines (loading, warm-up, job log) stay out of the
    # terminal unless asked for (--verbose); warnings and errors still show.
    private_log_levels(args)
    # The server removes the folder too (when it exits, even after `generate` was SIGKILLed).
    try:
        with tempfile.TemporaryDirectory(prefix="diffserve-", ignore_cleanup_errors=True) as workdir, \
                local_server(args, workdir, args.log_level) as (proc, target):
            with Client(target) as client:
                print("loading the model...", file=sys.stderr, flush=True)
                wait_serving(client, proc, args.startup_timeout)
                return run_job(client, args)
    except ServerStartError as exc:
        raise SystemExit(f"error: {exc}") from None


def cmd_models(args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    with connect(args, args.server) as client:
        try:
            models = client.list_models()
        except DiffserveError as err:
            report_error(err, args.server)
            return 1
        for model in models:
            print(json_format.MessageToJson(model, preserving_proto_field_name=True))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        # Same process (pid, process group, signals), the other program: nothing of it is imported here.
        module = DELEGATED[argv[0]]
        env = {**os.environ, "DIFFSERVE_PROG": f"diffserve {argv[0]}"}
        os.execve(sys.executable, [sys.executable, "-m", module, *argv[1:]], env)
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return {"generate": cmd_generate, "models": cmd_models}[args.command](args)
    except KeyboardInterrupt:
        return EXIT_SIGINT
    except Terminated:
        return EXIT_SIGTERM


if __name__ == "__main__":
    sys.exit(main())
