"""`diffserve generate` end to end: starts a scheduler and worker, shows progress, writes the file."""

from __future__ import annotations

import socket
import subprocess
import sys

import imageio.v3 as iio
from PIL import Image
from tests.conftest import interrupt


def diffserve(*args: str, timeout: float = 180, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffserve.client.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def test_generate_png_and_mp4(tiny_wan, tmp_path):
    common = ["--model-path", str(tiny_wan), "--prompt", "a red fox in the snow", "--height", "32", "--width", "48",
              "--num-inference-steps", "3", "--seed", "9", "--save-output"]
    png = tmp_path / "fox.png"
    done = diffserve("generate", *common, "--num-frames", "1", "--output-path", str(png), "-v")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(png)
    assert "denoising" in done.stderr and "3/3" in done.stderr
    assert Image.open(png).size == (48, 32)
    # --verbose (-v): the private server's and its worker's INFO lines are shown
    assert " scheduler INFO " in done.stderr and " worker INFO " in done.stderr

    # --cuda-graphs reaches the worker, which runs eagerly on a CPU (graph capture itself: test_cuda_graphs.py)
    done = diffserve("generate", *common, "--num-frames", "5", "--cuda-graphs", "--output-path", str(tmp_path / "videos"))
    assert done.returncode == 0, done.stderr
    # without -v no INFO line, but the worker's warning is shown
    assert not [line for line in done.stderr.splitlines() if " INFO " in line], done.stderr
    assert "--cuda-graphs needs a CUDA device" in done.stderr
    (mp4,) = (tmp_path / "videos").glob("*.mp4")
    assert mp4.name == "a_red_fox_in_the_snow_9.mp4"
    assert iio.imread(mp4, extension=".mp4").shape == (5, 32, 48, 3)


def test_generate_bad_input_exits_with_the_field(tiny_wan, tmp_path):
    done = diffserve("generate", "--model-path", str(tiny_wan), "--prompt", "x", "--width", "33", "--save-output",
                     "--output-path", str(tmp_path))
    assert done.returncode == 2
    assert "params.width" in done.stderr


def test_generate_needs_a_model(tmp_path):
    done = diffserve("generate", "--prompt", "x")
    assert done.returncode == 2 and "--model-path" in done.stderr
    done = diffserve("generate", "--model-path", str(tmp_path / "missing"), "--prompt", "x")
    assert done.returncode != 0 and "model" in done.stderr


def test_no_server_is_one_line_not_a_traceback(tmp_path):
    with socket.socket() as s:  # a loopback port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    target = f"127.0.0.1:{port}"
    line = f"error: no diffserve server at {target} (connection refused); start one with `diffserve serve`"
    done = diffserve("models", "--server", target, timeout=60)
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.splitlines() == [line]
    done = diffserve("generate", "--server", target, "--prompt", "x", "--save-output", "--output-path", str(tmp_path), timeout=60)
    assert done.returncode != 0
    assert done.stderr.splitlines() == [line]
    assert list(tmp_path.iterdir()) == []


def test_version():
    done = diffserve("--version", timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("diffserve ")


def test_one_shot_generate_leaves_only_its_file(tiny_wan, tmp_path):
    """Default folders: the client's file in ./outputs, nothing of the private server's (its
    artifact store, its state) in the working folder."""
    done = diffserve("generate", "--model-path", str(tiny_wan), "--prompt", "a fox", "--height", "32", "--width", "32",
                     "--num-frames", "1", "--num-inference-steps", "2", "--seed", "3", "--save-output", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["outputs", "outputs/a_fox_3.png"]
    # no log line of the private server or its worker at INFO, no loading progress bar
    assert not [line for line in done.stderr.splitlines() if " INFO " in line or "Loading weights" in line], done.stderr


def test_serve_log_format_json_reaches_its_local_worker(tiny_wan, tmp_path):
    """serve --log-format json: the local worker's lines are JSON objects too (with its id and
    rank), no loading progress bar breaks them, and a job leaves the scheduler's job lines."""
    import json
    import os
    import time

    from diffserve.client import Client

    log, ready = tmp_path / "serve.log", tmp_path / "port"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "diffserve.client.cli", "serve", "--model-path", str(tiny_wan), "--port", "0",
                                 "--state-dir", str(tmp_path / "state"), "--output-dir", str(tmp_path / "artifacts"), "--ready-file", str(ready),
                                 "--log-format", "json", "--drain-timeout", "0"], stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        with Client(f"127.0.0.1:{ready.read_text()}") as client:
            client.wait_until_serving(120, alive=lambda: proc.poll() is None)
            job = client.submit("a fox", height=32, width=32, num_frames=1, num_inference_steps=2, output_format="npy")
            client.wait(job.id)
    finally:
        interrupt(proc)
    lines = [json.loads(line) for line in log.read_text().splitlines()]  # every line parses
    worker = [line for line in lines if line["logger"].startswith("diffserve.worker")]
    assert worker and all(line["worker"] == "local-0" and line["rank"] == 0 for line in worker)
    assert {line.get("job_event") for line in lines if line.get("job_id") == job.id} >= {"submitted", "succeeded"}
