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
import logging
import os
import sys
from pathlib import Path

from diffserve.worker.v1.launch import add_worker_flags, worker_argv


def add_serve_flags(s: argparse.ArgumentParser) -> None:
    """The flags of `diffserve serve`: the worker flags (outer spelling), then the scheduler's."""
    add_worker_flags(s, outer=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=50051, help="gRPC port (0 picks a free one)")
    s.add_argument("--worker-bind", default="tcp://127.0.0.1:0", help="ZeroMQ address workers connect to")
    # Worker-protocol authentication (CURVE keys in the state folder; docs/cli.md "Worker keys").
    s.add_argument("--state-dir", default=".diffserve", help="state folder: CURVE keys (created 0700 at first start; default ./.diffserve)")
    s.add_argument("--insecure-worker-plaintext", action="store_true",
                   help="no CURVE on the worker endpoint (plain TCP); refused unless --worker-bind is loopback")
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


def serve(args: argparse.Namespace) -> int:
    """Runs the scheduler (gRPC) and, with --model-path, its local worker group until Ctrl-C."""
    from diffserve.scheduler.engine import EngineConfig
    from diffserve.scheduler.images import ImagePolicy
    from diffserve.scheduler.launcher import LocalWorkerSpec
    from diffserve.scheduler.server import ServerConfig, run
    from diffserve.scheduler.keys import KeyStoreError
    from diffserve.scheduler.workers import WorkerAuth, WorkerAuthError, is_loopback_endpoint

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s scheduler %(levelname)s %(name)s: %(message)s")
    if args.num_gpus < 1:
        print("error: --num-gpus must be >= 1", file=sys.stderr)
        return 2
    if args.insecure_worker_plaintext and not is_loopback_endpoint(args.worker_bind):
        print(f"error: --insecure-worker-plaintext needs a loopback --worker-bind (127.0.0.1, ::1, ipc://), not {args.worker_bind}", file=sys.stderr)
        return 2
    auth = WorkerAuth(state_dir=args.state_dir, plaintext=args.insecure_worker_plaintext)
    # The layout itself is checked by the worker (it knows the model); an impossible one stops serve.
    specs = [LocalWorkerSpec("local-0", worker_argv(args), world_size=args.num_gpus)] if args.model_path else []
    config = ServerConfig(
        host=args.host, port=args.port, worker_bind=args.worker_bind, output_dir=args.output_dir,
        engine=EngineConfig(max_queue=args.max_queue, max_batch_size=args.max_batch_size, heartbeat_timeout_s=args.heartbeat_timeout),
        worker_auth=auth, local_workers=specs, restart_workers=not args.no_restart_workers, drain_timeout_s=args.drain_timeout,
        images=ImagePolicy(allowed_dir=Path(args.image_dir) if args.image_dir else None, allow_private_urls=args.allow_private_image_urls,
                           max_bytes=args.max_image_bytes, timeout_s=args.image_fetch_timeout),
    )

    def started(port: int) -> None:
        if args.ready_file:
            Path(args.ready_file).write_text(str(port))

    try:
        return run(config, started)
    except (WorkerAuthError, KeyStoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def main(argv=None, prog: str = "") -> int:
    # `diffserve serve` execs this module and names itself in DIFFSERVE_PROG (usage and errors)
    prog = prog or os.environ.get("DIFFSERVE_PROG") or "python -m diffserve.scheduler.app"
    parser = argparse.ArgumentParser(prog=prog, description=serve.__doc__)
    add_serve_flags(parser)
    try:
        return serve(parser.parse_args(argv))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
