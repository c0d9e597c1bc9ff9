"""The worker flags are defined once (diffserve.worker.v1.launch) and mean the same on every command
line: `diffserve generate`, `diffserve serve` and `python -m diffserve.worker`."""

from __future__ import annotations

import argparse

from diffserve.client.cli import build_parser
from diffserve.scheduler.app import add_serve_flags
from diffserve.worker.__main__ import parse_args as worker_parse_args
from diffserve.worker.v1.launch import WORKER_FLAGS, worker_argv

GIVEN = ["--model-path", "/models/x", "--model-name", "m", "--device", "cpu", "--dtype", "float32", "--attention-backend", "sdpa",
         "--quantization", "fp8", "--compile", "--cuda-graphs", "--warmup", "--warmup-shape", "32x32x1", "--warmup-shape", "64x64", "--num-gpus", "4",
         "--enable-cfg-parallel", "--ulysses-degree", "2", "--ring-degree", "1", "--tp-size", "1", "--max-batch-size", "3",
         "--max-resident", "5", "--lora-dir", "/loras", "--lora-cache-bytes", "1GiB", "--worker-log-level", "DEBUG"]


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_serve_flags(parser)
    return parser


def worker_values(args: argparse.Namespace) -> dict:
    return {flag.name: getattr(args, flag.name.removeprefix("--").replace("-", "_")) for flag in WORKER_FLAGS}


def outer_values(args: argparse.Namespace) -> dict:
    return {flag.name: getattr(args, flag.outer_name.removeprefix("--").replace("-", "_")) for flag in WORKER_FLAGS}


def test_generate_and_serve_pass_every_worker_flag_on():
    generate = build_parser().parse_args(["generate", "--prompt", "p", *GIVEN])
    serve = serve_parser().parse_args(GIVEN)
    assert outer_values(generate) == outer_values(serve)
    worker = worker_parse_args(["--scheduler", "tcp://127.0.0.1:1", *worker_argv(serve)])
    assert worker_values(worker) == outer_values(serve)
    assert worker.log_level == "DEBUG" and worker.warmup_shape == ["32x32x1", "64x64"] and worker.compile
    assert (worker.lora_dir, worker.lora_cache_bytes) == ("/loras", 1 << 30)
    # generate --model-path hands the same flags to its local `serve` subprocess
    again = serve_parser().parse_args(worker_argv(generate, outer=True))
    assert outer_values(again) == outer_values(serve)


def test_defaults_are_the_same_everywhere():
    serve = serve_parser().parse_args([])
    worker = worker_parse_args(["--scheduler", "tcp://127.0.0.1:1", "--model-path", "/m"])
    assert worker_values(worker) == {**outer_values(serve), "--model-path": "/m"}
    assert worker_argv(serve_parser().parse_args(["--model-path", "/m"])) == ["--model-path", "/m"]


def test_shared_constants_defined_once():
    from diffserve.client import client
    from diffserve.scheduler import errors, launcher
    from diffserve.v1 import limits
    from diffserve.worker import __main__ as worker_main
    from diffserve.worker.v1 import launch

    # google.rpc.Status travels through grpcio-status (rpc_status) on both sides: no key of our own
    from grpc_status import rpc_status

    assert not hasattr(client, "STATUS_DETAILS_KEY") and not hasattr(errors, "STATUS_DETAILS_KEY")
    assert limits.STATUS_DETAILS_KEY == rpc_status.GRPC_DETAILS_METADATA_KEY
    assert launcher.EXIT_CANNOT_LOAD is worker_main.EXIT_CANNOT_LOAD is launch.EXIT_CANNOT_LOAD
    assert dict(client._channel_options())["grpc.max_send_message_length"] == limits.MAX_MESSAGE_BYTES


def test_replicas_get_their_own_devices():
    from diffserve.scheduler.app import replica_specs

    args = serve_parser().parse_args(["--model-path", "/m", "--num-gpus", "2", "--replicas", "3"])
    specs = replica_specs(args, environ={})
    assert [s.worker_id for s in specs] == ["local-0", "local-1", "local-2"]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == ["0,1", "2,3", "4,5"]
    assert all(s.world_size == 2 and s.args == specs[0].args for s in specs)
    # slices of the devices this process may see; too few: no override (the worker refuses)
    specs = replica_specs(args, environ={"CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    assert [s.env for s in specs] == [{"CUDA_VISIBLE_DEVICES": "4,5"}, {"CUDA_VISIBLE_DEVICES": "6,7"}, {}]
    one = replica_specs(serve_parser().parse_args(["--model-path", "/m"]), environ={})
    assert [(s.worker_id, s.env) for s in one] == [("local-0", {})]
