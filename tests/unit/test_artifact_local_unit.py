"""The local artifact store (a folder with a description beside each artifact), the description
format both stores share, and open_store's flag checks. No sockets, no torch."""

from __future__ import annotations

import hashlib
import io
import json
import uuid

import numpy as np
import pytest

from diffserve.v1 import generation_pb2 as pb

from diffserve.scheduler import artifact_local
from diffserve.scheduler.artifact_local import LocalArtifactStore
from diffserve.scheduler.artifact_s3 import parse_s3_url
from diffserve.scheduler.artifacts import CHUNK_BYTES, ArtifactStoreError, description_json, open_store, parse_description

NPY = pb.GenerationParams(prompt="a red fox", seed=3, output_format=pb.OUTPUT_FORMAT_NPY)
PNG = pb.GenerationParams(prompt="a red fox", seed=3, output_format=pb.OUTPUT_FORMAT_PNG)


def frames(shape=(3, 256, 512, 3)) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)


def test_save_writes_the_artifact_and_its_description_and_lookup_reads_them_back(tmp_path):
    store = LocalArtifactStore(tmp_path)
    job_id = uuid.uuid4().hex
    video = frames()
    artifact = store.save(job_id, video, NPY, "alice")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{job_id}.npy", f"{job_id}.json"])  # no .part left
    assert artifact.file_name == f"{job_id}.npy" and artifact.media_type == "application/x-npy"
    data = (tmp_path / artifact.file_name).read_bytes()
    assert artifact.size_bytes == len(data) and artifact.sha256 == hashlib.sha256(data).hexdigest()

    # another store on the same folder (a restarted or second scheduler) finds it by id alone
    stored = LocalArtifactStore(tmp_path).lookup(job_id)
    assert stored is not None and stored.artifact == artifact and stored.principal == "alice"
    pieces = list(store.chunks(stored.artifact))
    assert len(pieces) == 2 and all(len(p) <= CHUNK_BYTES for p in pieces)
    np.testing.assert_array_equal(np.load(io.BytesIO(b"".join(pieces))), video)

    store.delete(artifact)
    assert list(tmp_path.iterdir()) == [] and store.lookup(job_id) is None
    store.delete(artifact)  # twice is fine


def test_png_keeps_its_metadata(tmp_path):
    from PIL import Image

    store = LocalArtifactStore(tmp_path)
    artifact = store.save("job1", frames((1, 32, 48, 3)), PNG, "bob")
    image = Image.open(tmp_path / artifact.file_name)
    assert image.size == (48, 32) and image.text["prompt"] == "a red fox" and image.text["seed"] == "3"
    assert json.loads(image.text["parameters"])["seed"] == "3"
    assert store.lookup("job1").principal == "bob"


def test_lookup_finds_nothing_for_bad_ids_missing_files_and_old_artifacts(tmp_path):
    root = tmp_path / "outputs"
    store = LocalArtifactStore(root)
    # a description outside the folder is never reached
    outside = store.save("victim", frames((1, 16, 16, 3)), NPY, "alice")
    (tmp_path / "escape.json").write_text((root / "victim.json").read_text())
    for bad in ("", "../escape", "a/b", ".hidden", "x" * 200, "victim\0"):
        assert store.lookup(bad) is None, bad
    # the artifact removed by hand: nothing to serve
    (root / outside.file_name).unlink()
    assert store.lookup("victim") is None
    # an artifact from before descriptions existed: only a known job serves it
    (root / "old.png").write_bytes(b"png")
    assert store.lookup("old") is None


def test_a_corrupt_or_foreign_description_is_an_error_naming_the_file(tmp_path):
    store = LocalArtifactStore(tmp_path)
    artifact = store.save("job1", frames((1, 16, 16, 3)), NPY, "alice")
    description = tmp_path / "job1.json"
    description.write_text(description.read_text()[:20])  # truncated
    with pytest.raises(ArtifactStoreError, match="job1.json"):
        store.lookup("job1")
    # a description that names another file (here: outside the folder) is refused
    forged = pb.Artifact()
    forged.CopyFrom(artifact)
    forged.file_name = "../../etc/passwd"
    description.write_text(description_json(forged, "alice"))
    with pytest.raises(ArtifactStoreError, match="not of 'job1'"):
        store.lookup("job1")


def test_a_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(job_id, frames, params, path):
        path.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifact_local, "encode_artifact", broken)
    store = LocalArtifactStore(tmp_path)
    with pytest.raises(OSError):
        store.save("job1", frames((1, 16, 16, 3)), NPY, "alice")
    assert list(tmp_path.iterdir()) == []


def test_description_round_trip_and_rejects():
    artifact = pb.Artifact(id="j", file_name="j.mp4", media_type="video/mp4", size_bytes=3, width=2, height=2, num_frames=9, sha256="ab")
    text = description_json(artifact, "carol")
    assert text.isascii() and len(text) < 2048  # fits S3's user metadata
    stored = parse_description(text, "j", "here")
    assert stored.artifact == artifact and stored.principal == "carol"
    for bad in ("", "[]", '{"version": 99}', text.replace('"carol"', '""'), text.replace("video/mp4", "image/png")):
        with pytest.raises(ArtifactStoreError, match="^here: "):
            parse_description(bad, "j", "here")


def test_open_store_flags(tmp_path):
    assert isinstance(open_store("", str(tmp_path / "out")), LocalArtifactStore) and (tmp_path / "out").is_dir()
    with pytest.raises(ArtifactStoreError, match="^--artifact-store 'gs://b': expected s3://"):
        open_store("gs://b", str(tmp_path))
    with pytest.raises(ArtifactStoreError, match="^--s3-endpoint-url and --s3-region need --artifact-store"):
        open_store("", str(tmp_path), endpoint_url="http://127.0.0.1:9000")
    with pytest.raises(ArtifactStoreError, match="no bucket"):
        open_store("s3:///prefix", str(tmp_path))
    assert parse_s3_url("s3://b") == ("b", "")
    assert parse_s3_url("s3://b/") == ("b", "")
    assert parse_s3_url("s3://b//runs/a/") == ("b", "runs/a/")
