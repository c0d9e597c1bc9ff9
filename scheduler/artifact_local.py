"""The local artifact store: one folder (--output-dir), the default.

Layout: `<job id><ext>` (the artifact, .png / .mp4 / .npy) and `<job id>.json` (its description
and owning principal, artifacts.description_json). Both are written under temporary names,
flushed to disk and renamed into place, the artifact first: a description on disk always means a
whole artifact beside it, so a crash mid-save leaves at most a `.part` file, never a half artifact
that lookup would serve. Artifacts written before descriptions existed (no `.json`) are served
only through a job the scheduler knows.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from diffserve.v1 import generation_pb2 as pb

from diffserve.scheduler.artifact_encoding import encode_artifact, extension
from diffserve.scheduler.artifacts import CHUNK_BYTES, ArtifactStore, ArtifactStoreError, StoredArtifact, description_json, parse_description, valid_id


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalArtifactStore(ArtifactStore):
    """Artifacts and their descriptions in one folder, created if missing."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArtifactStoreError(f"--output-dir {self.root}: {exc.strerror}") from None

    def where(self) -> str:
        return f"folder {self.root}"

    def path_of(self, artifact: pb.Artifact) -> Path:
        return self.root / artifact.file_name

    def _description_path(self, artifact_id: str) -> Path:
        return self.root / f"{artifact_id}.json"

    def save(self, job_id: str, frames: np.ndarray, params: pb.GenerationParams, principal: str) -> pb.Artifact:
        assert valid_id(job_id), job_id
        ext = extension(params)
        tmp = self.root / f"{job_id}.part{ext}"  # ffmpeg picks the container from the extension
        tmp_description = self.root / f"{job_id}.part.json"
        try:
            artifact = encode_artifact(job_id, frames, params, tmp)
            _fsync(tmp)
            _write_synced(tmp_description, description_json(artifact, principal).encode("ascii"))
            os.replace(tmp, self.path_of(artifact))
            os.replace(tmp_description, self._description_path(job_id))
            _fsync(self.root)  # the renames themselves
        finally:
            for leftover in (tmp, tmp_description):
                leftover.unlink(missing_ok=True)
        return artifact

    def lookup(self, artifact_id: str) -> StoredArtifact | None:
        if not valid_id(artifact_id):
            return None
        path = self._description_path(artifact_id)
        try:
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise ArtifactStoreError(f"{path}: {getattr(exc, 'strerror', None) or exc}") from None
        stored = parse_description(text, artifact_id, str(path))
        if not self.path_of(stored.artifact).is_file():  # removed by hand: nothing to serve
            return None
        return stored

    def chunks(self, artifact: pb.Artifact) -> Iterator[bytes]:
        path = self.path_of(artifact)
        try:
            f = open(path, "rb")
        except OSError as exc:
            raise ArtifactStoreError(f"{path}: {exc.strerror}") from None
        with f:
            while chunk := f.read(CHUNK_BYTES):
                yield chunk

    def delete(self, artifact: pb.Artifact) -> None:
        # The description first: lookup never finds a description without its artifact.
        self._description_path(artifact.id).unlink(missing_ok=True)
        self.path_of(artifact).unlink(missing_ok=True)
