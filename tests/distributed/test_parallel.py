"""Parallel worker groups through the real service (gloo on CPU): every layout of Wan2.1, FLUX.1,
Qwen-Image and HunyuanVideo gives the single-process output (decoded frames within 2 uint8 levels), with
batched requests and token counts that need padding; a lost rank fails the job; impossible
layouts are refused at start with the conflicting numbers."""

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


UNEVEN = dict(prompt="a boat on the lake", negative_prompt="", height=48, width=48, num_frames=1,
              num_inference_steps=3, guidance_scale=5.0, seed=5, output_format="npy")  # 3x3 = 9 tokens: padded on 2 and 4 ranks
# Every axis alone on Wan but Ulysses (alone on Qwen-Image and HunyuanVideo below, and inside cfg × ulysses
# here), and the combinations on Wan (cfg × ulysses) and FLUX (ulysses × ring, cfg × ulysses): each axis runs on
# both families, each 4-rank combination once (a 4-rank group costs ~16 s of the suite on 2 cores; the three
# 4-rank layouts per family were 100 s; Ulysses alone on Wan and FLUX, 17 s each, repeated what the
# combinations cover).
WAN_LAYOUTS = {
    "cfg2": ("--num-gpus", "2", "--enable-cfg-parallel"),
    "ring2": ("--num-gpus", "2", "--ring-degree", "2"),
    "cfg2-ulysses2": ("--num-gpus", "4", "--ulysses-degree", "2", "--enable-cfg-parallel"),
    "tp2": ("--num-gpus", "2", "--tp-size", "2"),  # DiT heads/MLP and the UMT5 encoder sharded
}


@pytest.fixture(scope="module")
def wan_single(wan_server):
    """Single-process outputs of JOBS + UNEVEN, and of JOBS submitted together (one batched step)."""
    return [npy_output(wan_server.client, wan_server.client.submit(**job).id) for job in (*JOBS, UNEVEN)]


def _run_all(client, jobs):
    """Submits every job at once (they share steps), then collects the outputs."""
    ids = [client.submit(**job).id for job in jobs]
    return [npy_output(client, i) for i in ids]


@pytest.mark.parametrize("layout", list(WAN_LAYOUTS))
def test_wan_layout_equals_single_process(tiny_wan, start_server, wan_single, layout):
    flags = WAN_LAYOUTS[layout]
    group = start_server(tiny_wan, *flags)
    assert len(group.worker_pids()) == int(flags[1])
    parallel = _run_all(group.client, (*JOBS, UNEVEN))  # batched rows, CFG and not, and a padded token count
    for ours, ref in zip(parallel, wan_single):
        assert ours.std() > 1
        assert max_level_diff(ours, ref) <= 2, layout


FLUX_JOBS = [dict(prompt="a cat in the snow", height=32, width=48, num_frames=1, num_inference_steps=3, seed=11,
                  guidance_scale=3.5, output_format="npy"),  # 2x3 = 6 packed tokens: padded on 4 ranks
             dict(prompt="a small dog on the beach at night", height=32, width=32, num_frames=1, num_inference_steps=2, seed=22,
                  guidance_scale=5.0, output_format="npy")]
FLUX_LAYOUTS = {  # ring and cfg (FLUX has no CFG: the axis splits batched requests' rows) inside the 4-rank combinations
    "ulysses2-ring2": ("--num-gpus", "4", "--ulysses-degree", "2", "--ring-degree", "2"),
    "tp2": ("--num-gpus", "2", "--tp-size", "2"),  # DiT heads/MLP and the T5 encoder sharded
    "cfg2-ulysses2": ("--num-gpus", "4", "--ulysses-degree", "2", "--enable-cfg-parallel"),
}


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    from tests.fixtures.tiny.flux import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("ckpt") / "tiny-flux")


def _single_outputs(model_path, jobs, workdir):
    from conftest import ServerProcess

    server = ServerProcess(model_path, workdir)
    try:
        return _run_all(server.client, jobs)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def flux_single(tiny_flux, tmp_path_factory):
    return _single_outputs(tiny_flux, FLUX_JOBS, tmp_path_factory.mktemp("server"))


@pytest.mark.parametrize("layout", list(FLUX_LAYOUTS))
def test_flux_layout_equals_single_process(tiny_flux, start_server, flux_single, layout):
    group = start_server(tiny_flux, *FLUX_LAYOUTS[layout])
    for ours, ref in zip(_run_all(group.client, FLUX_JOBS), flux_single):
        assert ours.std() > 1
        assert max_level_diff(ours, ref) <= 2, layout


QWEN_JOBS = [dict(prompt="a red bicycle leaning on a wall", negative_prompt="", height=32, width=48, num_frames=1,
                  num_inference_steps=3, seed=3, guidance_scale=4.0, output_format="npy"),
             dict(prompt="tea", height=32, width=48, num_frames=1, num_inference_steps=2, seed=4, guidance_scale=4.0,
                  negative_prompt="a long negative prompt so the text rows differ in length", output_format="npy")]


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    from tests.fixtures.tiny.qwen_image import build_tiny_qwen_image

    return build_tiny_qwen_image(tmp_path_factory.mktemp("ckpt") / "tiny-qwen-image")


@pytest.fixture(scope="module")
def qwen_single(tiny_qwen, tmp_path_factory):
    return _single_outputs(tiny_qwen, QWEN_JOBS, tmp_path_factory.mktemp("server"))


@pytest.mark.parametrize("layout", ["ulysses", "ring"])
def test_qwen_image_layout_equals_single_process(tiny_qwen, start_server, qwen_single, layout):
    group = start_server(tiny_qwen, "--num-gpus", "2", f"--{layout}-degree", "2")
    # cond and uncond rows of different text lengths: padded text keys masked on every rank
    for ours, ref in zip(_run_all(group.client, QWEN_JOBS), qwen_single):
        assert ours.std() > 1
        assert max_level_diff(ours, ref) <= 2, layout


HUNYUAN_JOBS = [dict(prompt="a red cat walking on the beach at sunset", height=48, width=48, num_frames=9, num_inference_steps=3,
                     seed=5, guidance_scale=6.0, output_format="npy"),  # 3x3x3 = 27 video tokens: padded on 2 ranks
                dict(prompt="a dog", height=48, width=48, num_frames=9, num_inference_steps=2, seed=6, guidance_scale=4.0,
                     output_format="npy")]


@pytest.fixture(scope="module")
def tiny_hunyuan(tmp_path_factory):
    from tests.fixtures.tiny.hunyuan_video import TINY_HUNYUAN_TRANSFORMER, build_tiny_hunyuan_video

    assert TINY_HUNYUAN_TRANSFORMER["num_attention_heads"] % 2 == 0, "ulysses 2 splits the heads"
    return build_tiny_hunyuan_video(tmp_path_factory.mktemp("ckpt") / "tiny-hunyuan-video")


@pytest.fixture(scope="module")
def hunyuan_single(tiny_hunyuan, tmp_path_factory):
    return _single_outputs(tiny_hunyuan, HUNYUAN_JOBS, tmp_path_factory.mktemp("server"))


# ulysses, 2 x 2 and tp (DiT and Llama encoder) at model level: test_sequence_parallel.py, test_tensor_parallel.py
@pytest.mark.parametrize("layout", ["--ring-degree"])
def test_hunyuan_video_layout_equals_single_process(tiny_hunyuan, start_server, hunyuan_single, layout):
    group = start_server(tiny_hunyuan, "--num-gpus", "2", layout, "2")
    # prompts of different lengths share steps: the shorter row's padded text keys are masked on every rank
    for ours, ref in zip(_run_all(group.client, HUNYUAN_JOBS), hunyuan_single):
        assert ours.std() > 1
        assert max_level_diff(ours, ref) <= 2, layout


def test_cancel_then_kill_one_rank(tiny_wan, start_server):
    """In a group a cancel takes effect within a step and every rank frees the job; then losing a
    follower rank fails the running job and stops the group."""
    import os
    import signal

    from jobs_util import LONG_JOB, final_event, resident_jobs, wait_for, wait_step

    # one attempt: the job fails with the group (requeue is tests/service/test_replicas.py)
    server = start_server(tiny_wan, "--num-gpus", "2", "--enable-cfg-parallel", "--no-restart-workers", "--max-attempts", "1")
    job = server.client.submit(**LONG_JOB)
    wait_step(server.client, job.id, 2)
    at_cancel = server.client.get(job.id).step
    server.client.cancel(job.id)
    assert final_event(server.client, job.id).WhichOneof("event") == "cancelled"
    assert server.client.get(job.id).step <= at_cancel + 1
    wait_for(lambda: resident_jobs(server) == 0, what="the group to free the cancelled job")
    job = server.client.submit(**LONG_JOB)  # the group still runs jobs (every rank dropped the cancelled one in step)
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
                           "--num-gpus", "3", "--ulysses-degree", "3", "--output-dir", str(tmp_path), "--state-dir", str(tmp_path / "state")], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "impossible parallel layout" in done.stderr and "heads do not divide by ulysses 3" in done.stderr
