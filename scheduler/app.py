"""The composition root: `diffserve serve` wires a scheduler to its local worker group and runs it.

This is the one module that knows both halves: it builds the scheduler's configuration from the
command line and turns the worker flags (diffserve.worker.v1.launch, defined once) into the argv of
the worker processes the launcher starts. The client package stays a pure client that imports
none of this: its `diffserve serve` runs this module in the same process (exec), and
`generate --model-path` starts `python -m diffserve.scheduler.app` as a subprocess
(client/local.py).

    python -m diffserve.scheduler.app --model-path DIR [serve flags]   # same as `diffserve serve`

Imports nothing heavy at module level (the `diffserve` command builds its parser from here).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from diffserve.worker.v1.launch import NO_ENV, add_worker_flags, env_defaults, worker_argv


def add_serve_flags(s: argparse.ArgumentParser) -> None:
    """The flags of `diffserve serve`: the worker flags (outer spelling), then the scheduler's."""
    add_worker_flags(s, outer=True)
    s.add_argument("--host", default="127.0.0.1", help="address the gRPC API listens on (default 127.0.0.1; 0.0.0.0 for every interface)")
    s.add_argument("--port", type=int, default=50051, help="gRPC port (0 picks a free one)")
    s.add_argument("--http-port", type=int, default=None, metavar="PORT",
                   help="serve the HTTP API here: OpenAI-compatible /v1 endpoints, /metrics (unless --metrics-port), the playground at / (default: off; 0 picks a free port)")
    s.add_argument("--http-host", default="127.0.0.1", help="address of the HTTP API (default 127.0.0.1; same tokens and TLS as gRPC)")
    s.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus /metrics alone on this port (then not on --http-port); works without --http-port (default: off; 0 picks a free port)")
    s.add_argument("--metrics-host", default=None, metavar="HOST", help="address of --metrics-port (default: --http-host)")
    s.add_argument("--worker-bind", default="tcp://127.0.0.1:0", help="ZeroMQ address workers connect to")
    # Worker-protocol authentication (CURVE keys in the state folder; docs/cli.md "Worker keys").
    s.add_argument("--state-dir", default=".diffserve",
                   help="state folder: CURVE keys and the job store jobs.sqlite3 (created 0700 at first start; default ./.diffserve)")
    s.add_argument("--insecure-worker-plaintext", action="store_true",
                   help="no CURVE on the worker endpoint (plain TCP); refused unless --worker-bind is loopback")
    s.add_argument("--output-dir", default="artifacts", help="folder of the local artifact store (default ./artifacts; not ./outputs, which is where `generate` writes)")
    # The artifact store (docs/cli.md "Artifact store"): a folder by default, or S3-compatible object storage.
    s.add_argument("--artifact-store", default="", metavar="s3://BUCKET[/PREFIX]",
                   help="keep artifacts in this S3 bucket (credentials from AWS_* / profile / role) instead of --output-dir")
    s.add_argument("--s3-endpoint-url", default="", metavar="URL", help="S3-compatible server (MinIO, Ceph, ...), e.g. http://minio:9000")
    s.add_argument("--s3-region", default="", help="region of the bucket (default: AWS_REGION / AWS_DEFAULT_REGION / profile)")
    s.add_argument("--max-queue", type=int, default=256, help="queued jobs beyond which SubmitJob answers RESOURCE_EXHAUSTED")
    s.add_argument("--heartbeat-timeout", type=float, default=5.0, help="seconds of worker silence before its jobs fail")
    # The default is scheduler/wire.py's DEFAULT_MAX_MESSAGE_BYTES (not imported here: numpy).
    s.add_argument("--max-worker-message-bytes", type=int, default=2 << 30,
                   help="largest message a worker may send, all frames (default 2 GiB; a worker whose model can output more is refused)")
    s.add_argument("--no-restart-workers", action="store_true", help="do not restart a local worker that died")
    s.add_argument("--pack-tokens", type=int, default=0, metavar="N",
                   help="mixed-shape batching: requests of different sizes share a denoising step while its latent tokens "
                        "stay within N, on models that pack (ListModels' packs_mixed_shapes; 0: off)")
    s.add_argument("--no-local-worker", action="store_true",
                   help="without --model-path: start no local worker (remote `diffserve worker`s join) even where this "
                        "install has the built-in demo model, which is served otherwise")
    s.add_argument("--replicas", type=int, default=1,
                   help="local worker groups serving the model, each on its own --num-gpus devices (jobs go to the least loaded)")
    s.add_argument("--max-attempts", type=int, default=2,
                   help="runs of a job whose worker group is lost before it fails (it restarts from step 0 elsewhere)")
    s.add_argument("--job-ttl", type=float, default=7 * 24 * 3600.0, metavar="SECONDS",
                   help="finished jobs older than this are deleted with their artifacts (default 604800: 7 days; 0 keeps them)")
    s.add_argument("--max-jobs", type=int, default=10_000,
                   help="finished jobs kept; beyond this the oldest finished are deleted with their artifacts")
    s.add_argument("--drain-timeout", type=float, default=60.0, help="on the first SIGINT / SIGTERM, seconds running jobs get to finish (queued jobs stay queued; a second signal exits at once)")
    s.add_argument("--priority-aging", type=float, default=30.0, metavar="SECONDS",
                   help="a queued job's priority grows by 1 per SECONDS waited, so none starves (default 30; 0: strict priorities)")
    s.add_argument("--principal-priority", action="append", default=[], metavar="NAME=N",
                   help="default priority of principal NAME (-100..100; unlisted: 0), also the most it may ask for (admin: any); repeat per principal")
    s.add_argument("--image-dir", default="", help="folder whose images requests may name by path (default: paths refused)")
    s.add_argument("--allow-private-image-urls", action="store_true", help="let image URLs reach private, loopback and link-local addresses")
    s.add_argument("--max-image-bytes", type=int, default=20 << 20, help="largest input image, fetched or sent (default 20 MiB)")
    s.add_argument("--image-fetch-timeout", type=float, default=10.0, help="seconds to fetch an image URL")
    # API security (issue 12): TLS and bearer tokens on gRPC; see docs/security.md
    s.add_argument("--tls-cert", default="", help="PEM certificate chain: serve gRPC over TLS (with --tls-key)")
    s.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    s.add_argument("--tls-client-ca", default="", help="PEM CA bundle: require client certificates it signed (mutual TLS)")
    s.add_argument("--auth-tokens", default="", metavar="FILE",
                   help="'principal token' per line (mode 600): every RPC but health and reflection needs a bearer token")
    s.add_argument("--ready-file", default="", help=argparse.SUPPRESS)
    # For `generate --model-path`: stop when that process dies, and remove its temporary folder.
    s.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)
    s.add_argument("--cleanup-dir", default="", help=argparse.SUPPRESS)
    s.add_argument("--log-level", default="INFO", help="log level of the scheduler (DEBUG, INFO, WARNING, ERROR)")
    s.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="scheduler log lines as text, or one JSON object per line (time, level, logger, message, job_id, principal, ...)")


def api_security_problem(args: argparse.Namespace) -> str:
    """Why the TLS / token flags cannot be used ("" when they can): checked before anything starts."""
    from diffserve.scheduler.auth import Tokens, TokensFileError

    if bool(args.tls_cert) != bool(args.tls_key):
        return "--tls-cert and --tls-key go together"
    if args.tls_client_ca and not args.tls_cert:
        return "--tls-client-ca needs --tls-cert and --tls-key"
    for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key), ("--tls-client-ca", args.tls_client_ca)):
        if path and not os.access(path, os.R_OK):
            return f"{flag} {path}: not a readable file"
    if args.auth_tokens:
        try:
            Tokens(args.auth_tokens)
        except TokensFileError as exc:
            return f"--auth-tokens {exc}"
    return ""


def replica_specs(args: argparse.Namespace, environ: dict[str, str] | None = None) -> list:
    """One local worker group per --replicas, named local-0, local-1, ...; with more than one, each
    sees only its own --num-gpus devices (CUDA_VISIBLE_DEVICES: consecutive slices of the visible
    ones, or of 0..N-1). On a machine with fewer devices the worker's own checks refuse it."""
    from diffserve.scheduler.launcher import LocalWorkerSpec

    environ = os.environ if environ is None else environ
    argv = worker_argv(args)
    quiet: dict[str, str] = {}
    if args.log_format != "text":  # local workers log as the scheduler does, without progress bars
        argv += ["--log-format", args.log_format]
        if "HF_HUB_DISABLE_PROGRESS_BARS" not in environ:
            quiet["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if args.replicas == 1:
        return [LocalWorkerSpec("local-0", argv, env=quiet, world_size=args.num_gpus)]
    visible = environ.get("CUDA_VISIBLE_DEVICES", "")
    devices = [d for d in visible.split(",") if d.strip()] if visible else [str(i) for i in range(args.replicas * args.num_gpus)]
    specs = []
    for i in range(args.replicas):
        mine = devices[i * args.num_gpus:(i + 1) * args.num_gpus]
        env = {"CUDA_VISIBLE_DEVICES": ",".join(mine)} if len(mine) == args.num_gpus else {}
        env.update(quiet)
        specs.append(LocalWorkerSpec(f"local-{i}", argv, env=env, world_size=args.num_gpus))
    return specs


def priority_rule(args: argparse.Namespace):
    """(auth.PriorityRule from --principal-priority, "") or (None, the problem with the flags)."""
    import math

    from diffserve.scheduler.auth import PriorityRule, parse_principal_priority
    from diffserve.scheduler.validation import MAX_PRIORITY, MIN_PRIORITY

    if not (math.isfinite(args.priority_aging) and args.priority_aging >= 0):
        return None, f"--priority-aging must be a number of seconds >= 0, not {args.priority_aging}"
    defaults: dict[str, int] = {}
    for text in args.principal_priority:
        try:
            name, value = parse_principal_priority(text)
        except ValueError as exc:
            return None, f"--principal-priority: {exc}"
        if not MIN_PRIORITY <= value <= MAX_PRIORITY:
            return None, f"--principal-priority {text}: the priority must be from {MIN_PRIORITY} to {MAX_PRIORITY}"
        if name in defaults:
            return None, f"--principal-priority: {name} is given twice"
        defaults[name] = value
    return PriorityRule(defaults), ""


def local_model_path(args: argparse.Namespace) -> str:
    """What the local worker group serves: --model-path, else the built-in demo model where this
    install has it (unless --no-local-worker), else nothing (a scheduler that remote workers join)."""
    if args.model_path or args.no_local_worker:
        return args.model_path or ""
    from diffserve.demo import builtin_model

    path = builtin_model()
    return str(path) if path is not None else ""


def serve(args: argparse.Namespace) -> int:
    """Runs the scheduler (gRPC) and, with --model-path, its local worker group until Ctrl-C."""
    from diffserve.scheduler.engine import EngineConfig
    from diffserve.scheduler.grpc_auth import TlsConfig
    from diffserve.scheduler.images import ImagePolicy
    from diffserve.scheduler.artifacts import ArtifactStoreError
    from diffserve.scheduler.server import ListenError, ServerConfig, run
    from diffserve.scheduler.keys import KeyStoreError
    from diffserve.scheduler.store import StoreError
    from diffserve.scheduler.workers import WorkerAuth, WorkerAuthError, is_loopback_endpoint

    from diffserve.scheduler.joblog import configure as configure_logging

    configure_logging(args.log_level, args.log_format)
    for flag, value in (("--num-gpus", args.num_gpus), ("--replicas", args.replicas), ("--max-attempts", args.max_attempts)):
        if value < 1:
            print(f"error: {flag} must be >= 1", file=sys.stderr)
            return 2
    if args.metrics_port is not None and args.http_port is not None and args.metrics_port == args.http_port != 0:
        print(f"error: --metrics-port and --http-port are both {args.http_port}: give the metrics a port of their own, "
              "or leave --metrics-port out (/metrics is on the HTTP port then)", file=sys.stderr)
        return 2
    if args.pack_tokens < 0:
        print("error: --pack-tokens must be >= 0 (0: no mixed-shape packing)", file=sys.stderr)
        return 2
    if args.job_ttl < 0 or args.max_jobs < 1:
        print("error: --job-ttl must be >= 0 (0 keeps finished jobs for ever) and --max-jobs >= 1", file=sys.stderr)
        return 2
    priorities, problem = priority_rule(args)
    problem = problem or api_security_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.insecure_worker_plaintext and not is_loopback_endpoint(args.worker_bind):
        print(f"error: --insecure-worker-plaintext needs a loopback --worker-bind (127.0.0.1, ::1, ipc://), not {args.worker_bind}", file=sys.stderr)
        return 2
    auth = WorkerAuth(state_dir=args.state_dir, plaintext=args.insecure_worker_plaintext)
    args.model_path = local_model_path(args)
    # The layout itself is checked by the worker (it knows the model); an impossible one stops serve.
    specs = replica_specs(args) if args.model_path else []
    config = ServerConfig(
        host=args.host, port=args.port, http_host=args.http_host, http_port=args.http_port, worker_bind=args.worker_bind, output_dir=args.output_dir,
        metrics_port=args.metrics_port, metrics_host=args.metrics_host or "",
        artifact_store=args.artifact_store, s3_endpoint_url=args.s3_endpoint_url, s3_region=args.s3_region,
        engine=EngineConfig(max_queue=args.max_queue, max_batch_size=args.max_batch_size, pack_tokens=args.pack_tokens,
                            heartbeat_timeout_s=args.heartbeat_timeout,
                            max_worker_message_bytes=args.max_worker_message_bytes, max_attempts=args.max_attempts,
                            max_jobs=args.max_jobs, job_ttl_s=args.job_ttl or None,
                            priority_aging_s=args.priority_aging, priorities=priorities),
        worker_auth=auth, local_workers=specs, restart_workers=not args.no_restart_workers, drain_timeout_s=args.drain_timeout,
        images=ImagePolicy(allowed_dir=Path(args.image_dir) if args.image_dir else None, allow_private_urls=args.allow_private_image_urls,
                           max_bytes=args.max_image_bytes, timeout_s=args.image_fetch_timeout),
        tls=TlsConfig(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None, auth_tokens=args.auth_tokens,
        state_dir=args.state_dir,
        parent_pid=args.parent_pid, cleanup_dir=args.cleanup_dir,
    )

    def started(port: int, http_port: int, metrics_port: int | None = None) -> None:
        if args.ready_file:
            # "GRPC_PORT", with --http-port "GRPC_PORT HTTP_PORT", with --metrics-port
            # "GRPC_PORT HTTP_PORT METRICS_PORT" (HTTP_PORT 0 without --http-port). Written whole,
            # then renamed: a reader never sees the file empty.
            ready = Path(args.ready_file)
            partial = ready.with_name(ready.name + ".partial")
            if metrics_port is not None:
                partial.write_text(f"{port} {http_port} {metrics_port}")
            else:
                partial.write_text(f"{port} {http_port}" if args.http_port is not None else str(port))
            os.replace(partial, ready)

    try:
        return run(config, started)
    except (WorkerAuthError, KeyStoreError, ArtifactStoreError, StoreError, ListenError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def build_parser(prog: str = "", environ: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """`diffserve serve`'s command line, defaults from DIFFSERVE_* variables of `environ` (os.environ)."""
    # `diffserve serve` execs this module and names itself in DIFFSERVE_PROG (usage and errors)
    prog = prog or os.environ.get("DIFFSERVE_PROG") or "python -m diffserve.scheduler.app"
    parser = argparse.ArgumentParser(prog=prog, description=serve.__doc__)
    add_serve_flags(parser)
    env_defaults(parser, environ)  # --foo-bar from DIFFSERVE_FOO_BAR
    return parser


def main(argv=None, prog: str = "") -> int:
    args = build_parser(prog).parse_args(argv)
    # The local workers get their flags on their command line (worker_argv), not from variables meant for serve.
    os.environ[NO_ENV] = "1"
    try:
        return serve(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
