"""The simulated worker: torch-free, its card valid for the scheduler, its outputs a pure function
of the request (no sockets here; tests/service/test_simulated_worker.py runs it for real)."""

from __future__ import annotations

import subprocess
import sys

from diffserve.v1 import generation_pb2 as pb
from diffserve.worker.simulated import parse_args, sim_card, sim_frames
from diffserve.worker.v1 import worker_pb2 as wpb

from diffserve.scheduler.cards import public_model
from diffserve.scheduler.registry import WorkerRegistry
from diffserve.scheduler.validation import resolve_params


def test_importing_it_pulls_in_no_torch():
    code = (
        "import sys\n"
        "import diffserve.worker.simulated, diffserve.worker\n"
        "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_card_registers_and_validates_requests():
    hello = wpb.Hello(protocol_version=wpb.PROTOCOL_VERSION_3, card=sim_card("sim"), max_batch_size=4, max_resident=8, world_size=1)
    registry = WorkerRegistry()
    assert registry.compatible("sim-0", hello) and registry.refusal(hello, 2 << 30) is None
    registry.register("sim-0", hello)
    model = public_model(hello.card)
    resolved = resolve_params(pb.GenerationParams(prompt="a cat", num_inference_steps=10_000), model)
    assert (resolved.height, resolved.width, resolved.num_frames, resolved.num_inference_steps) == (32, 32, 1, 10_000)


def test_frames_are_a_pure_function_of_the_request():
    request = wpb.Request(prompt="a cat", seed=7, height=16, width=24, num_frames=5, num_inference_steps=3)
    frames = sim_frames(request, 3)
    assert len(frames) == 5 * 16 * 24 * 3 and frames == sim_frames(wpb.Request.FromString(request.SerializeToString()), 3)
    other_seed = wpb.Request()
    other_seed.CopyFrom(request)
    other_seed.seed = 8
    assert frames != sim_frames(other_seed, 3)
    assert frames != sim_frames(request, 2)  # a skipped step shows in the output


def test_flags():
    args = parse_args(["--scheduler", "tcp://127.0.0.1:5", "--groups", "64", "--step-ms", "0.5", "--insecure-worker-plaintext"])
    assert (args.groups, args.step_ms, args.stage_ms, args.max_batch_size, args.max_resident, args.model_name) == (64, 0.5, 1.0, 4, 8, "sim")
