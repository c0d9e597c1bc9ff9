"""The S3 artifact store against a real S3-compatible HTTP server: moto's server mode on loopback.

(a) the store itself: save / lookup / chunks / delete for PNG and NPY, streamed in several chunks;
(b) `diffserve serve --artifact-store s3://...` with the tiny Wan worker runs a job whose download
    matches its sha256; (c) a second scheduler (no worker) sharing the bucket serves that artifact
    by id to its owner and to admin, and answers NOT_FOUND to another principal exactly as for a
    missing id (the local folder store likewise, for a scheduler on the same --output-dir); (d) a bucket that does not exist, or an endpoint nobody answers, stops `serve` at
    start with exit code 2 and a message naming the flag.

Dummy credentials in the environment (and no config files) keep everything off real accounts.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest

from diffserve.client import Client, DiffserveError
from diffserve.v1 import generation_pb2 as pb
from conftest import interrupt

BUCKET = "diffserve-artifacts"
TOKENS = {"alice": "alice-" + "a" * 26, "bob": "bob-" + "b" * 28, "admin": "admin-" + "c" * 26}
SMALL = dict(prompt="a lighthouse on s3", height=32, width=32, num_frames=1, num_inference_steps=2, output_format="png", seed=5)
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 (a free port) with BUCKET created; dummy AWS_* for everyone."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    saved = {key: os.environ.get(key) for key in AWS_ENV}
    os.environ.update(AWS_ENV)  # the `serve` subprocesses inherit them
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
        yield url
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def s3_client(url: str):
    import boto3

    return boto3.client("s3", endpoint_url=url)


# ---- (a) the store ----

def test_s3_store_round_trips_png_and_npy_in_chunks(s3_endpoint):
    from PIL import Image

    from diffserve.scheduler.artifacts import CHUNK_BYTES, open_store

    store = open_store(f"s3://{BUCKET}/unit/", "unused", endpoint_url=s3_endpoint)
    rng = np.random.default_rng(0)
    cases = [
        (pb.OUTPUT_FORMAT_PNG, rng.integers(0, 256, (1, 32, 48, 3), dtype=np.uint8), "alice"),
        (pb.OUTPUT_FORMAT_NPY, rng.integers(0, 256, (3, 256, 512, 3), dtype=np.uint8), "bob"),  # 1.2 MB: two chunks
    ]
    for output_format, frames, owner in cases:
        job_id = uuid.uuid4().hex
        params = pb.GenerationParams(prompt="a red fox", seed=11, output_format=output_format)
        artifact = store.save(job_id, frames, params, owner)
        ext = {pb.OUTPUT_FORMAT_PNG: ".png", pb.OUTPUT_FORMAT_NPY: ".npy"}[output_format]
        assert artifact.id == job_id and artifact.file_name == job_id + ext
        assert (artifact.num_frames, artifact.height, artifact.width) == frames.shape[:3]
        # the object is under the prefix, typed, with the description as its metadata
        head = s3_client(s3_endpoint).head_object(Bucket=BUCKET, Key=f"unit/{artifact.file_name}")
        assert head["ContentType"] == artifact.media_type and head["ContentLength"] == artifact.size_bytes

        stored = store.lookup(job_id)
        assert stored is not None and stored.artifact == artifact and stored.principal == owner
        pieces = list(store.chunks(stored.artifact))
        assert all(0 < len(p) <= CHUNK_BYTES for p in pieces)
        data = b"".join(pieces)
        assert len(data) == artifact.size_bytes and hashlib.sha256(data).hexdigest() == artifact.sha256
        if output_format == pb.OUTPUT_FORMAT_NPY:
            assert len(pieces) >= 2
            np.testing.assert_array_equal(np.load(io.BytesIO(data)), frames)
        else:
            image = Image.open(io.BytesIO(data))
            np.testing.assert_array_equal(np.asarray(image), frames[0])
            assert image.text["prompt"] == "a red fox" and image.text["seed"] == "11"

        store.delete(stored.artifact)
        assert store.lookup(job_id) is None
        store.delete(stored.artifact)  # twice is fine

    # ids that cannot name an artifact, and objects diffserve did not write, are not found
    assert store.lookup(uuid.uuid4().hex) is None
    assert store.lookup("../unit/x") is None and store.lookup("") is None
    stray = uuid.uuid4().hex
    s3_client(s3_endpoint).put_object(Bucket=BUCKET, Key=f"unit/{stray}.png", Body=b"not ours")
    assert store.lookup(stray) is None


# ---- (b), (c) real schedulers sharing the bucket ----

def write_tokens(path: Path) -> Path:
    path.write_text("".join(f"{principal} {token}\n" for principal, token in TOKENS.items()))
    path.chmod(0o600)
    return path


class BareScheduler:
    """`diffserve serve` without a worker (nothing to run, only artifacts to serve)."""

    def __init__(self, workdir: Path, *flags: str):
        ready = workdir / "port"
        cmd = [sys.executable, "-m", "diffserve.client.cli", "serve", "--port", "0", "--output-dir", str(workdir / "outputs"),
               "--state-dir", str(workdir / "state"), "--ready-file", str(ready), "--log-level", "WARNING", *flags]
        self.proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert self.proc.poll() is None, f"server exited with {self.proc.returncode}"
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        self.target = f"127.0.0.1:{ready.read_text()}"

    def stop(self) -> None:
        interrupt(self.proc)


def not_found(client: Client, artifact_id: str) -> DiffserveError:
    with pytest.raises(DiffserveError) as info:
        client.download(artifact_id)
    assert info.value.code == grpc.StatusCode.NOT_FOUND and info.value.reason == "NOT_FOUND", info.value
    return info.value


def test_serve_keeps_artifacts_in_s3_and_any_scheduler_sharing_it_serves_them(s3_endpoint, tiny_wan, start_server, tmp_path):
    tokens = write_tokens(tmp_path / "tokens")
    store_flags = ("--artifact-store", f"s3://{BUCKET}/shared", "--s3-endpoint-url", s3_endpoint, "--auth-tokens", str(tokens))
    server = start_server(tiny_wan, "--warmup-shape", "32x32x1", *store_flags)
    with Client(server.target, token=TOKENS["alice"]) as alice:
        job = alice.wait(alice.submit(**SMALL).id)
        assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
        data = alice.download(job.id)
    assert hashlib.sha256(data).hexdigest() == job.artifact.sha256 and len(data) == job.artifact.size_bytes
    # in the bucket, not in --output-dir
    head = s3_client(s3_endpoint).head_object(Bucket=BUCKET, Key=f"shared/{job.artifact.file_name}")
    assert head["ContentLength"] == job.artifact.size_bytes
    assert not (server.output_dir / job.artifact.file_name).exists()

    (tmp_path / "second").mkdir()
    other = BareScheduler(tmp_path / "second", *store_flags)
    try:
        with Client(other.target, token=TOKENS["alice"]) as alice, Client(other.target, token=TOKENS["bob"]) as bob, \
                Client(other.target, token=TOKENS["admin"]) as admin:
            assert alice.download(job.id) == data
            assert admin.download(job.id) == data
            # bob: NOT_FOUND, worded exactly as for an id that names nothing
            missing = uuid.uuid4().hex
            assert not_found(bob, job.id).message == not_found(bob, missing).message.replace(missing, job.id)
            not_found(alice, "../" + job.id)
            # gone from the bucket behind the schedulers' backs: the one that knows the job cannot
            # read it (UNAVAILABLE, logged), the other finds nothing
            s3_client(s3_endpoint).delete_object(Bucket=BUCKET, Key=f"shared/{job.artifact.file_name}")
            not_found(alice, job.id)
        with Client(server.target, token=TOKENS["alice"]) as first:
            with pytest.raises(DiffserveError) as info:
                first.download(job.id)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE and info.value.reason == "ARTIFACT_STORE_UNAVAILABLE", info.value
    finally:
        other.stop()


def test_a_scheduler_sharing_the_output_folder_serves_its_artifacts(tiny_wan, start_server, tmp_path):
    """The local store too: the description beside the file is enough (a restart, or a second
    scheduler on the same folder)."""
    server = start_server(tiny_wan, "--warmup-shape", "32x32x1")
    job = server.client.wait(server.client.submit(**SMALL).id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    data = server.client.download(job.id)
    assert (server.output_dir / f"{job.id}.json").is_file()
    (tmp_path / "second").mkdir()
    other = BareScheduler(tmp_path / "second", "--output-dir", str(server.output_dir))
    try:
        with Client(other.target) as client:
            assert client.download(job.id) == data and hashlib.sha256(data).hexdigest() == job.artifact.sha256
            not_found(client, uuid.uuid4().hex)
    finally:
        other.stop()


# ---- (d) a store that cannot be used stops serve at start ----

def serve_exit(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "diffserve.client.cli", "serve", "--port", "0", "--output-dir", str(tmp_path / "outputs"),
           "--state-dir", str(tmp_path / "state"), "--log-level", "WARNING", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_store_that_cannot_be_used_stops_serve_with_exit_2(s3_endpoint, tmp_path):
    with socket_free_port() as closed_port:
        cases = [
            (("--artifact-store", "s3://no-such-bucket/x", "--s3-endpoint-url", s3_endpoint), "bucket 'no-such-bucket' does not exist"),
            (("--artifact-store", f"s3://{BUCKET}", "--s3-endpoint-url", f"http://127.0.0.1:{closed_port}"), "cannot reach the S3 endpoint"),
            (("--artifact-store", "gs://elsewhere"), "expected s3://BUCKET[/PREFIX]"),
            (("--s3-endpoint-url", s3_endpoint), "need --artifact-store s3://"),
        ]
        for flags, why in cases:
            done = serve_exit(tmp_path, *flags)
            assert done.returncode == 2, (flags, done.stderr)
            assert "Traceback" not in done.stderr, done.stderr
            line = done.stderr.strip().splitlines()[-1]
            assert line.startswith("error: --") and why in line, line
            if flags[0] == "--artifact-store":
                assert line.startswith("error: --artifact-store"), line


class socket_free_port:
    """A loopback port nobody listens on (bound, not listening, while the block runs)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.sock.close()
