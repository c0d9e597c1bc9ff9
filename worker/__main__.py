"""Worker process entry: `python -m diffserve.worker --scheduler tcp://HOST:PORT --model-path DIR`.

Loads the model, says Hello to the scheduler (which makes it SERVING), then runs commands
until told to shut down.

Signals (SIGTERM from a process manager, SIGINT from a terminal): while loading, the worker exits
at once (code 0, with a line saying so). Once serving, rank 0 finishes the command it is running,
says Goodbye (the scheduler puts its jobs back in the queue at once) and exits 0; the other ranks
follow rank 0's Shutdown. A second signal exits at once (128 + the signal). Started with
--parent-pid (by `diffserve serve`), it is SIGKILLed when that process dies (Linux; elsewhere
it notices within a poll).
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import platform
import signal
import socket
import sys
import uuid

from diffserve.worker.v1 import logformat
from diffserve.worker.v1 import worker_pb2 as wpb
from diffserve.worker.v1.launch import EXIT_CANNOT_LOAD, add_worker_auth_flags, add_worker_flags, die_with_parent, env_defaults, shield_dash_keys


def parse_args(argv=None, environ: dict[str, str] | None = None) -> argparse.Namespace:
    """The worker's flags; defaults from DIFFSERVE_* variables of `environ` (os.environ)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return build_parser(environ).parse_args(shield_dash_keys(argv))


def build_parser(environ: dict[str, str] | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=os.environ.get("DIFFSERVE_PROG") or "python -m diffserve.worker", description=__doc__)
    p.add_argument("--scheduler", required=True, help="ZeroMQ address of the scheduler, e.g. tcp://127.0.0.1:5555")
    p.add_argument("--worker-id", default="", help="routing id (default: host-pid-random)")
    add_worker_flags(p, model_path_required=True)  # shared with `diffserve serve` / `generate`
    p.add_argument("--rank", type=int, default=0, help="this process's rank in the group (rank 0 talks to the scheduler)")
    p.add_argument("--dist-init", default="", help="torch.distributed init method, e.g. tcp://127.0.0.1:29500")
    p.add_argument("--parent-pid", type=int, default=0, help="exit when this process is gone")
    p.add_argument("--log-format", choices=logformat.FORMATS, default="text",
                   help="log lines as text, or one JSON object per line (time, level, logger, message, worker, rank); "
                        "`serve --log-format` passes its own to local workers")
    add_worker_auth_flags(p)  # CURVE keys: --key-file, --scheduler-key (or --insecure-worker-plaintext)
    env_defaults(p, environ)  # --foo-bar from DIFFSERVE_FOO_BAR (not for local workers: serve sets DIFFSERVE_NO_ENV)
    return p


def choose_layout(args: argparse.Namespace, pipeline):
    from diffserve.worker.parallel.layout import plan_for
    from diffserve.worker.models import dits

    return plan_for(pipeline, dits(pipeline), args.num_gpus, enable_cfg_parallel=args.enable_cfg_parallel,
                    ulysses=args.ulysses_degree, ring=args.ring_degree, tp=args.tp_size)


def quantize(args: argparse.Namespace, pipeline, parallel, device, dtype) -> str | None:
    """--quantization fp8 (the DiTs' block linears) and --attention-backend fa3-fp8, recorded in
    `pipeline.quantizations` for the card ("fp8", "fp8-attention"). Returns why it cannot run, or None."""
    import torch

    from diffserve.kernels.fp8 import scaled_mm_runs
    from diffserve.worker.models.fp8 import quantize_pipeline

    log = logging.getLogger("diffserve.worker")
    if args.quantization != "none":
        if parallel.dims.tp > 1:
            return "--quantization fp8 with tensor parallelism (--tp-size > 1) is not built yet"
        if device.type == "cuda" and not scaled_mm_runs(device, dtype):
            log.warning("FP8 GEMMs need an sm89+ GPU and bf16 (here %s, %s): the FP8 linears run their dequantizing reference (slow)",
                        torch.cuda.get_device_name(device), dtype)
        log.info("quantization %s: %s", args.quantization, quantize_pipeline(pipeline, args.quantization))
    if args.attention_backend == "fa3-fp8":
        from diffserve.kernels import attention
        from diffserve.worker.models import dits

        for head_dim in sorted({m.config.attention_head_dim for m in dits(pipeline)}):
            if problem := attention.cannot_run("fa3-fp8", device, dtype, head_dim):
                return problem
        pipeline.quantizations = (*getattr(pipeline, "quantizations", ()), "fp8-attention")
    return None


def enable_lora(pipeline, args: argparse.Namespace) -> None:
    """--lora-dir: the folder's adapters per request (docs/acceleration.md, "LoRA"); ValueError where
    the model or the layout does not offer them."""
    from pathlib import Path

    if args.quantization != "none":
        raise ValueError("--lora-dir with --quantization fp8 is not built yet (the adapted linears would stay unquantized)")
    enable = getattr(pipeline, "enable_lora", None)
    if enable is None:
        raise ValueError(f"--lora-dir: the {pipeline.card.family} pipeline takes no LoRA adapters yet")
    enable(Path(args.lora_dir), args.lora_cache_bytes)
    logging.getLogger("diffserve.worker").info("LoRA adapters from %s: %s (cache budget %d bytes)", args.lora_dir,
                                               ", ".join(pipeline.lora_adapters) or "none", args.lora_cache_bytes)


def model_name_for(path: str) -> str:
    return os.path.basename(os.path.normpath(path)) or path


class Signals:
    """SIGTERM / SIGINT handling (see the module docstring). The handler only sets fields: the
    connection's I/O thread turns a leave request into a Goodbye after the running command."""

    def __init__(self, rank: int):
        self.rank = rank
        self.conn = None  # rank 0 once serving: SchedulerConnection
        self.serving = False
        self.received = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        # SIGUSR1: every thread's Python stack to stderr, and the worker goes on (a hung worker
        # tells where it hangs: docs/cli.md, bench/service.py on a benchmark's timeout).
        faulthandler.register(signal.SIGUSR1, all_threads=True)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        log = logging.getLogger("diffserve.worker")
        self.received += 1
        if self.received > 1:
            log.warning("%s again: exiting now", name)
            logging.shutdown()
            os._exit(128 + signum)
        if not self.serving:
            log.warning("%s while loading: exiting", name)
            raise SystemExit(0)
        if self.conn is not None:
            log.warning("%s: leaving after the running command (its jobs go back to the scheduler's queue)", name)
            self.conn.leave(f"{name} on {platform.node()} pid {os.getpid()}")
        else:
            log.warning("%s: rank %d follows rank 0, which stops the group", name, self.rank)


def main(argv=None) -> int:
    args = parse_args(argv)
    worker_id = args.worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    logformat.configure("worker", args.log_level, args.log_format, static={"worker": worker_id, "rank": args.rank})
    signals = Signals(args.rank)
    if args.parent_pid:  # never outlive the scheduler that started us, even a SIGKILLed one
        die_with_parent(args.parent_pid, signal.SIGKILL)
    import torch

    from diffserve.worker import loading
    from diffserve.worker.connection import SchedulerConnection, worker_curve_keys
    from diffserve.worker.registry import load_pipeline
    from diffserve.worker.runtime import Runtime

    from diffserve.kernels import attention

    attention.configure(args.attention_backend)
    from diffserve.worker.parallel import ParallelState

    log = logging.getLogger("diffserve.worker")
    curve = None
    if args.rank == 0:  # before loading the model: a wrong key fails fast
        try:
            curve = worker_curve_keys(args)
        except ValueError as exc:
            log.error("%s", exc)
            return EXIT_CANNOT_LOAD
    if args.num_gpus < 1:
        log.error("impossible parallel layout: --num-gpus must be >= 1 (got %d)", args.num_gpus)
        return EXIT_CANNOT_LOAD
    try:
        root = loading.resolve_model_path(args.model_path)
        device = loading.pick_device(args.device)
        if device.type == "cuda" and args.num_gpus > 1:
            device = torch.device("cuda", args.rank)
            torch.cuda.set_device(device)
        dtype = loading.pick_dtype(args.dtype, device)
        pipeline = load_pipeline(root, args.model_name or model_name_for(args.model_path), device, dtype)
    except (loading.CheckpointError, ValueError) as exc:
        logging.getLogger("diffserve.worker").error("cannot load the model: %s", exc)
        return EXIT_CANNOT_LOAD
    torch.set_grad_enabled(False)
    from diffserve.worker.warmup import compile_dits, parse_shape, warm_up

    parallel = ParallelState.single()
    if args.num_gpus > 1:
        dims, problems = choose_layout(args, pipeline)
        if problems:
            log.error("impossible parallel layout: %s", "; ".join(problems))
            return EXIT_CANNOT_LOAD
        parallel = ParallelState.init(dims, args.rank, args.dist_init, device)
        from diffserve.worker.parallel.plans import parallelize_pipeline

        summary = parallelize_pipeline(pipeline, parallel)  # each DiT's plan, text encoders over tp
        pipeline.parallel = parallel
        if args.rank == 0:
            log.info("parallel layout: %s", summary)
    if args.lora_dir:
        try:
            enable_lora(pipeline, args)  # after the tp split: adapters are cut as the layers they adapt are
        except ValueError as exc:
            log.error("cannot load the model: %s", exc)
            return EXIT_CANNOT_LOAD
    if args.quantization != "none" or args.attention_backend == "fa3-fp8":
        problem = quantize(args, pipeline, parallel, device, dtype)
        if problem:
            log.error("%s", problem)
            return EXIT_CANNOT_LOAD
    try:
        shapes = [parse_shape(s) for s in args.warmup_shape]
    except ValueError as exc:
        logging.getLogger("diffserve.worker").error("%s", exc)
        return EXIT_CANNOT_LOAD
    if args.compile:
        logging.getLogger("diffserve.worker").info("compiling %d transformer(s)", compile_dits(pipeline))
    graphs = args.cuda_graphs != "off" and device.type == "cuda"
    if args.cuda_graphs == "on" and not graphs:
        log.warning("--cuda-graphs needs a CUDA device (this worker runs on %s); running eagerly", device)
    elif graphs:
        from diffserve.worker.cuda_graphs import graph_dits

        max_tokens = args.cuda_graph_max_tokens if args.cuda_graphs == "auto" else None
        count = graph_dits(pipeline, max_tokens=max_tokens, world_size=parallel.world_size)
        log.info("CUDA graphs for %d transformer(s), captured per shape on first use%s", count,
                 f" for forwards of at most {max_tokens} latent tokens per GPU" if max_tokens is not None else "")
    runtime = Runtime(pipeline, parallel)  # before warm-up: it wraps the forward with the cfg row split
    if args.warmup or shapes:
        warm_up(pipeline, shapes or None)
    captured_collectives = graphs and parallel.world_size > 1
    if args.rank != 0:
        signals.serving = True
        runtime.serve(None)  # follows rank 0's commands until Shutdown
        return _exit(0, captured_collectives)
    from diffserve.worker.card import model_card

    hello = wpb.Hello(
        protocol_version=wpb.PROTOCOL_VERSION_3,
        description=f"{platform.node()} pid {os.getpid()} {device} {str(dtype).removeprefix('torch.')}",
        card=model_card(pipeline),
        max_batch_size=args.max_batch_size,
        max_resident=args.max_resident,
        world_size=parallel.world_size,
        concurrent_stages=parallel.world_size == 1 and args.concurrent_stages,
    )
    conn = SchedulerConnection(args.scheduler, worker_id, hello, runtime.status, args.parent_pid or None, curve=curve)
    signals.conn, signals.serving = conn, True
    conn.start()
    if hello.concurrent_stages:
        runtime.start_stage_lane(conn)
    try:
        runtime.serve(conn)
    except KeyboardInterrupt:
        pass
    finally:
        conn.stop()
    return _exit(0, captured_collectives)


def _exit(code: int, captured_collectives: bool) -> int:
    """Ends the process. After CUDA graphs captured NCCL collectives, tearing the communicators
    down at interpreter exit can hang (pytorch#115388), so such a rank leaves without it."""
    if captured_collectives:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
