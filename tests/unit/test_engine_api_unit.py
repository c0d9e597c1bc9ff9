"""The in-process API's own logic without a server: keyword arguments → serve's argv (serve's
flags, defined once, read generically), generation fields, a failed job's error, decoding."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2
from PIL import Image

from diffserve.client import local, make_params
from diffserve.client.engine import Engine, Generation, JobError, _ServeFlags, serve_argv
from diffserve.v1 import generation_pb2 as pb


def parse(argv: list[str]):
    return _ServeFlags().parse_args(argv)


def test_keywords_become_serve_flags():
    argv = serve_argv("/m", dict(num_gpus=2, compile=True, cuda_graphs="off", warmup_shape=["32x32x1", "64x64x1"],
                                 worker_log_level="DEBUG", max_queue=None, drain_timeout=1.5))
    assert argv == ["--model-path", "/m", "--num-gpus", "2", "--compile", "--cuda-graphs", "off", "--warmup-shape", "32x32x1",
                    "--warmup-shape", "64x64x1", "--worker-log-level", "DEBUG", "--drain-timeout", "1.5"]
    args = parse(argv)
    assert (args.num_gpus, args.compile, args.cuda_graphs, args.warmup_shape) == (2, True, "off", ["32x32x1", "64x64x1"])
    assert serve_argv("/m", dict(warmup_shape="32x32x1")) == ["--model-path", "/m", "--warmup-shape", "32x32x1"]


def test_every_public_serve_flag_is_a_keyword():
    table = _ServeFlags()
    assert {"num_gpus", "ulysses_degree", "max_batch_size", "replicas", "max_queue", "log_format", "image_dir"} <= set(table.actions)
    hidden = {"ready_file", "parent_pid", "cleanup_dir"}
    assert not hidden & set(table.actions)


def test_the_private_flags_come_first_and_keywords_win():
    args = parse([*local.private_flags("/w"), *serve_argv("/m", dict(log_level="DEBUG", drain_timeout=5, output_dir="/keep"))])
    assert (args.log_level, args.drain_timeout, args.output_dir, args.state_dir) == ("DEBUG", 5.0, "/keep", "/w/state")
    assert args.no_restart_workers and args.max_queue == 256  # Engine runs several jobs at once, unlike generate


def test_unknown_and_engine_owned_keywords_are_type_errors():
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_gpu' \\(did you mean 'num_gpus'\\?\\)"):
        serve_argv("/m", dict(num_gpu=2))
    with pytest.raises(TypeError, match="unexpected keyword argument 'ready_file'"):  # hidden: not a keyword
        serve_argv("/m", dict(ready_file="/x"))
    for name in ("port", "host", "auth_tokens", "tls_cert", "model_path"):
        with pytest.raises(TypeError, match=f"sets '{name}' itself"):
            serve_argv("/m", {name: "1"})
    with pytest.raises(TypeError, match="'compile' is a switch"):
        serve_argv("/m", dict(compile="yes"))


def test_bad_values_are_value_errors_naming_the_flag():
    with pytest.raises(ValueError, match="--num-gpus: invalid int value: 'two'"):
        serve_argv("/m", dict(num_gpus="two"))
    with pytest.raises(ValueError, match="--log-format: invalid choice"):
        serve_argv("/m", dict(log_format="xml"))


def test_engine_checks_its_keywords_before_starting_anything(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(local.subprocess, "Popen", lambda *a, **k: started.append(a))
    with pytest.raises(TypeError, match="'nope'"):
        Engine(tmp_path, nope=1)
    assert started == []


def png(color: tuple[int, int, int], size=(4, 2)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_generation_fields_and_images():
    params = make_params("a fox", seed=3, num_inference_steps=4, images=[Image.new("RGB", (4, 2), (255, 0, 0)), b"raw", "https://x/y.png", "rel/a.png"])
    assert (params.seed, params.num_inference_steps, params.HasField("width")) == (3, 4, False)
    assert [i.WhichOneof("source") for i in params.images] == ["data", "data", "url", "path"]
    assert Image.open(io.BytesIO(params.images[0].data)).getpixel((0, 0)) == (255, 0, 0)
    with pytest.raises(TypeError, match="unknown generation field 'steps'"):
        make_params("a fox", steps=4)


def test_a_failed_job_is_an_error_with_its_status_and_job():
    status = status_pb2.Status(code=grpc.StatusCode.CANCELLED.value[0], message="cancelled by CancelJob")
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason="CANCELLED"))
    job = pb.Job(id="j1", state=pb.JOB_STATE_CANCELLED, error=status)
    err = JobError.from_status(job.error, job=job)
    assert (err.code, err.reason, err.job.id) == (grpc.StatusCode.CANCELLED, "CANCELLED", "j1")
    assert str(err) == "job j1 cancelled: CANCELLED: cancelled by CancelJob"


def test_outputs_decode_to_pil_and_uint8_frames():
    out = Generation(pb.Job(artifact=pb.Artifact(media_type="image/png")), png((1, 2, 3)))
    assert out.image.size == (4, 2) and out.frames.shape == (1, 2, 4, 3) and out.frames.dtype == np.uint8
    assert out.frames[0, 0, 0].tolist() == [1, 2, 3]
    frames = np.zeros((3, 2, 4, 3), np.uint8)
    buffer = io.BytesIO()
    np.save(buffer, frames)
    out = Generation(pb.Job(artifact=pb.Artifact(media_type="application/x-npy")), buffer.getvalue())
    assert out.frames.shape == (3, 2, 4, 3) and out.image is None


def test_the_engine_imports_no_torch():
    """It runs in the caller's process: only the client, the protos and serve's flag table."""
    import subprocess
    import sys

    code = ("import sys\nfrom diffserve import Engine\nfrom diffserve.client.engine import serve_argv\n"
            "serve_argv('/m', {'num_gpus': 2})\n"
            "bad = [m for m in ('torch', 'diffusers', 'transformers', 'zmq') if m in sys.modules]\nassert not bad, bad\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
