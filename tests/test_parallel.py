"""Parallel worker groups (gloo on CPU): CFG-parallel, Ulysses, and both together equal the
single-process run (also with a token count that needs padding); impossible layouts are refused
at start with the conflicting numbers."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jobs_util import npy_output
from reference import max_level_diff

from diffserve.worker.parallel import ParallelDims

JOBS = [
    dict(prompt="a red cat walking on the beach", negative_prompt="blurry", height=32, width=48, num_frames=5,
         num_inference_steps=4, guidance_scale=5.0, seed=1234, output_format="npy"),
    dict(prompt="a dog in the snow", height=32, width=48, num_frames=5, num_inference_steps=3, guidance_scale=1.0,
         seed=7, output_format="npy"),  # no CFG: one row, split across ranks with padding
]


def test_cfg2_equals_single_process(tiny_wan, start_server, wan_server):
    single = [npy_output(wan_server.client, wan_server.client.submit(**job).id) for job in JOBS]
    group = start_server(tiny_wan, "--num-gpus", "2", "--enable-cfg-parallel")
    assert len(group.worker_pids()) == 2
    parallel = [npy_output(group.client, group.client.submit(**job).id) for job in JOBS]
    # Two concurrent jobs in one step: rows of both split over the ranks.
    ids = [group.client.submit(**job).id for job in JOBS]
    batched = [npy_output(group.client, i) for i in ids]
    for ours, ref, both in zip(parallel, single, batched):
        assert ours.std() > 1
        assert max_level_diff(ours, ref) <= 2 and max_level_diff(both, ref) <= 2


UNEVEN = dict(prompt="a boat on the lake", negative_prompt="", height=48, width=48, num_frames=1,
              num_inference_steps=3, guidance_scale=5.0, seed=5, output_format="npy")  # 3x3 = 9 tokens


@pytest.mark.parametrize("flags", [
    ("--num-gpus", "2", "--ulysses-degree", "2"),
    ("--num-gpus", "4", "--ulysses-degree", "2", "--enable-cfg-parallel"),
], ids=["ulysses2", "cfg2-ulysses2"])
def test_ulysses_equals_single_process(tiny_wan, start_server, wan_server, flags):
    single = [npy_output(wan_server.client, wan_server.client.submit(**job).id) for job in (JOBS[0], UNEVEN)]
    group = start_server(tiny_wan, *flags)
    assert len(group.worker_pids()) == int(flags[1])
    for job, ref in zip((JOBS[0], UNEVEN), single):
        ours = npy_output(group.client, group.client.submit(**job).id)
        assert ours.std() > 1 and max_level_diff(ours, ref) <= 2


def test_killing_one_rank_fails_the_job_and_stops_the_group(tiny_wan, start_server):
    import os
    import signal

    from jobs_util import LONG_JOB, final_event, wait_step

    server = start_server(tiny_wan, "--num-gpus", "2", "--enable-cfg-parallel", "--no-restart-workers")
    job = server.client.submit(**LONG_JOB)
    wait_step(server.client, job.id, 2)
    os.kill(server.worker_pids()[1], signal.SIGKILL)  # a follower rank
    last = final_event(server.client, job.id)
    assert last.WhichOneof("event") == "failed"
    message = last.failed.status.message
    assert "rank 1 of 2" in message or "lost a rank" in message, message
    server.wait_health("NOT_SERVING", timeout_s=10)


@pytest.mark.parametrize("dims,world,words", [
    (ParallelDims(cfg=2), 4, ["= 2", "--num-gpus is 4"]),
    (ParallelDims(cfg=3), 3, ["at most 2"]),
    (ParallelDims(ulysses=2, ring=2), 2, ["ulysses 2 × ring 2", "= 4", "--num-gpus is 2"]),
])
def test_bad_layouts_named(dims, world, words):
    message = "; ".join(dims.problems(world))
    assert all(w in message for w in words), message


def test_impossible_layout_refused_at_start(tiny_wan, tmp_path):
    done = subprocess.run([sys.executable, "-m", "diffserve.client.cli", "serve", "--model-path", str(tiny_wan), "--port", "0",
                           "--num-gpus", "3", "--ulysses-degree", "3", "--output-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "impossible parallel layout" in done.stderr and "heads do not divide by ulysses 3" in done.stderr
