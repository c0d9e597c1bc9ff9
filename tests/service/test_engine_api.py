"""The in-process API (`from diffserve import Engine`) on the tiny Wan checkpoint: the same output
as the service for the same seed, progress in order, several threads at once, clear errors, and no
process left behind after close(), garbage collection or Ctrl-C."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading

import imageio.v3 as iio
import numpy as np
import psutil
import pytest

from diffserve.client import DiffserveError
from diffserve.v1 import generation_pb2 as pb

SMALL = dict(height=32, width=48, num_inference_steps=3)


@pytest.fixture(scope="module")
def engine(tiny_wan):
    from diffserve import Engine

    with Engine(tiny_wan, max_batch_size=4) as e:
        yield e


def descendants() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def assert_all_gone(procs: list[psutil.Process], timeout_s: float = 30) -> None:
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    assert not alive, alive


def test_output_equals_the_services_for_the_same_seed(engine, tiny_wan, start_server):
    import diffserve
    from diffserve.client.engine import Engine

    assert diffserve.Engine is Engine
    server = start_server(tiny_wan)
    for frames in (1, 5):
        out = engine.generate("a red fox in the snow", seed=9, num_frames=frames, **SMALL)
        job = server.client.submit("a red fox in the snow", seed=9, num_frames=frames, **SMALL)
        server.client.wait(job.id)
        data = server.client.download(job.id)
        assert out.job.params.seed == 9 and out.job.state == pb.JOB_STATE_SUCCEEDED
        if frames == 1:
            assert out.data == data  # the same PNG, byte for byte
            assert out.image.size == (48, 32)
            assert np.array_equal(out.frames[0], np.asarray(out.image))
        else:
            assert out.image is None
            assert out.frames.dtype == np.uint8 and out.frames.shape == (5, 32, 48, 3)
            assert np.array_equal(out.frames, iio.imread(data, extension=".mp4"))


def test_progress_in_order_by_callback_and_by_iterator(engine):
    events = []
    out = engine.generate("a fox", seed=1, num_frames=1, on_progress=events.append, **SMALL)
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "queued" and kinds[-1] == "completed"
    assert [e.step_completed.step for e in events if e.HasField("step_completed")] == [1, 2, 3]
    assert [e.sequence for e in events] == sorted(e.sequence for e in events)
    assert {e.job_id for e in events} == {out.job.id}
    assert out.job.end_time.ToDatetime() >= out.job.start_time.ToDatetime() >= out.job.create_time.ToDatetime()

    stream = engine.stream("a fox", seed=1, num_frames=1, **SMALL)
    steps = [e.step_completed.step for e in stream if e.HasField("step_completed")]
    assert steps == [1, 2, 3]
    assert stream.result.job.id == stream.job_id != out.job.id
    assert stream.result.data == out.data  # same seed, same image


def test_several_threads_at_once(engine):
    results: dict[int, object] = {}

    def run(seed: int) -> None:
        results[seed] = engine.generate("a fox", seed=seed, num_frames=1, **SMALL)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == [1, 2, 3]
    assert len({r.job.id for r in results.values()}) == 3
    assert [results[s].job.params.seed for s in (1, 2, 3)] == [1, 2, 3]


def test_bad_arguments_raise_clear_errors(engine, tiny_wan, tmp_path):
    from diffserve import Engine
    from diffserve.client.local import ServerStartError

    with pytest.raises(DiffserveError) as bad:
        engine.generate("x", width=33)
    assert bad.value.code.name == "INVALID_ARGUMENT" and "params.width" in str(bad.value)
    assert [f for f, _ in bad.value.field_violations] == ["params.width"]
    with pytest.raises(TypeError, match="'stepz'"):
        engine.generate("x", stepz=3)
    with pytest.raises(TypeError, match="'num_gpu'.*'num_gpus'"):
        Engine(tiny_wan, num_gpu=2)
    before = descendants()
    with pytest.raises(ServerStartError, match="(?s)exited.*--num-gpus must be >= 1"):
        Engine(tiny_wan, num_gpus=0)
    with pytest.raises(ServerStartError, match="(?s)before the model loaded.*cannot load the model"):
        Engine(tmp_path / "missing")
    assert_all_gone([p for p in descendants() if p not in before])


def test_close_and_garbage_collection_leave_no_process(tiny_wan):
    from diffserve import Engine
    from diffserve.client.engine import JobError

    before = descendants()
    engine = Engine(tiny_wan)
    started = [p for p in descendants() if p not in before]
    assert len(started) >= 2  # the server and its worker
    long = dict(seed=1, num_frames=1, height=32, width=32, num_inference_steps=500)
    stream = engine.stream("a fox", **long)
    next(e for e in stream if e.HasField("step_completed"))
    engine.client.cancel(stream.job_id)  # a job cancelled elsewhere: JobError with its record
    with pytest.raises(JobError, match="cancelled: CANCELLED: cancelled by CancelJob") as cancelled:
        stream.result
    assert cancelled.value.job.state == pb.JOB_STATE_CANCELLED and cancelled.value.job.id == stream.job_id

    stream = engine.stream("a fox", **long)
    next(e for e in stream if e.HasField("step_completed"))
    engine.close()  # cancels what runs
    assert_all_gone(started)
    assert engine.closed
    engine.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate("x")
    with pytest.raises(DiffserveError):
        stream.result

    engine = Engine(tiny_wan)
    started = [p for p in descendants() if p not in before]
    del engine
    gc.collect()
    assert_all_gone(started)


CTRL_C = """
import sys
import time
from diffserve import Engine
from diffserve.v1 import generation_pb2 as pb

with Engine(sys.argv[1]) as engine:
    job = []

    def progress(event):
        if event.HasField("step_completed") and not job:
            job.append(event.job_id)
            print("running", flush=True)

    try:
        engine.generate("a fox", num_frames=1, height=32, width=32, num_inference_steps=500, on_progress=progress)
    except KeyboardInterrupt:  # the job was cancelled; it ends at the next step boundary
        deadline = time.monotonic() + 20
        while engine.client.get(job[0]).state == pb.JOB_STATE_RUNNING and time.monotonic() < deadline:
            time.sleep(0.05)
        print("job", pb.JobState.Name(engine.client.get(job[0]).state), flush=True)
        raise
"""


def test_ctrl_c_cancels_the_job_and_leaves_no_process(tiny_wan, tmp_path):
    """A real SIGINT to the script's process group while generate waits: the job is cancelled,
    the with-block stops the server, nothing is left (processes, temporary folder)."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(CTRL_C), str(tiny_wan)], stdout=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "running"
        started = psutil.Process(proc.pid).children(recursive=True)
        assert len(started) >= 2
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the script's group, not the server's session
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode != 0
        assert out.strip() == "job JOB_STATE_CANCELLED"
        assert_all_gone(started)
        assert list(tmp_path.glob("diffserve-engine-*")) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
