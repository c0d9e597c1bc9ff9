"""Artifact stores: where a job's encoded output lives, and how any scheduler reads it back.

    ArtifactStore                         the interface (below)
    artifact_local.LocalArtifactStore     a folder, --output-dir (the default)
    artifact_s3.S3ArtifactStore           S3-compatible object storage, --artifact-store s3://BUCKET/PREFIX
    artifact_encoding                     frames → PNG / MP4 / NPY and their pb.Artifact description

Contract of every store:
- save(job_id, frames, params, principal) -> pb.Artifact encodes the frames and stores the
  artifact as `<job id><ext>` together with its description and owning principal; it appears
  whole or not at all. Blocking: call from a thread.
- lookup(artifact_id) -> StoredArtifact | None: the description and owner, read from the store
  alone, so a scheduler that never ran the job (another one sharing the store, or this one after a
  restart) can serve it. None for no such artifact and for an id that cannot name one. Blocking.
- chunks(artifact) -> an iterator of bytes, at most CHUNK_BYTES each, streamed from the store
  (never the whole artifact in memory). Blocking reads: iterate from a thread.
- delete(artifact) removes the artifact and its description; a missing one is fine.
A store that cannot be read or written raises ArtifactStoreError (its message is for operators,
not for API callers: it may name files, buckets and endpoints).

Who may download what is the service's rule (auth.Principal.can_access), applied to the principal
the store returns; the store itself checks nothing.
"""

from __future__ import annotations

import abc
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from google.protobuf import json_format

from diffserve.v1 import generation_pb2 as pb

from diffserve.scheduler.artifact_encoding import MEDIA_TYPES

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
# Artifact ids are job ids (uuid4 hex); anything else cannot name a stored artifact (and never
# reaches a file name or an object key).
ARTIFACT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
DESCRIPTION_VERSION = 1


class ArtifactStoreError(Exception):
    """The store cannot be used (unreachable, refused, corrupt); the message says where and why."""


@dataclass(frozen=True)
class StoredArtifact:
    """What a store knows about one artifact: its description and the principal that owns it."""

    artifact: pb.Artifact
    principal: str


def valid_id(artifact_id: str) -> bool:
    return bool(ARTIFACT_ID_RE.fullmatch(artifact_id))


def description_json(artifact: pb.Artifact, principal: str) -> str:
    """The description kept beside an artifact (a sidecar file, an object's metadata): one line of
    ASCII JSON, small (S3 allows 2 KiB of user metadata)."""
    return json.dumps({
        "version": DESCRIPTION_VERSION,
        "principal": principal,
        "artifact": json_format.MessageToDict(artifact, preserving_proto_field_name=True),
    }, separators=(",", ":"), sort_keys=True)


def parse_description(text: str, artifact_id: str, where: str) -> StoredArtifact:
    """The StoredArtifact of a description written by description_json for `artifact_id`.
    Raises ArtifactStoreError naming `where` when it is not one (corrupt, or another id's)."""
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("version") != DESCRIPTION_VERSION:
            raise ValueError(f"not a version {DESCRIPTION_VERSION} artifact description")
        principal = data["principal"]
        if not isinstance(principal, str) or not principal:
            raise ValueError("no principal")
        artifact = json_format.ParseDict(data["artifact"], pb.Artifact())
    except (ValueError, KeyError, TypeError, json_format.ParseError) as exc:
        raise ArtifactStoreError(f"{where}: unreadable artifact description ({exc})") from None
    ext = artifact.file_name[len(artifact_id):]
    if artifact.id != artifact_id or not artifact.file_name.startswith(artifact_id) or MEDIA_TYPES.get(ext) != artifact.media_type:
        raise ArtifactStoreError(f"{where}: the description is of {artifact.id!r} ({artifact.file_name!r}), not of {artifact_id!r}")
    return StoredArtifact(artifact, principal)


class ArtifactStore(abc.ABC):
    """Where artifacts live; see the module docstring for the contract."""

    @abc.abstractmethod
    def save(self, job_id: str, frames: np.ndarray, params: pb.GenerationParams, principal: str) -> pb.Artifact:
        """frames: uint8 (F, H, W, 3). Blocking: call from a thread."""

    @abc.abstractmethod
    def lookup(self, artifact_id: str) -> StoredArtifact | None:
        """The stored artifact's description and owner, or None. Blocking."""

    @abc.abstractmethod
    def chunks(self, artifact: pb.Artifact) -> Iterator[bytes]:
        """The artifact's bytes, CHUNK_BYTES at most per piece. Blocking reads: iterate from a thread."""

    @abc.abstractmethod
    def delete(self, artifact: pb.Artifact) -> None:
        """Removes the artifact and its description (missing is fine)."""

    @abc.abstractmethod
    def where(self) -> str:
        """The store in words, for logs."""


def open_store(spec: str, output_dir: str, *, endpoint_url: str = "", region: str = "") -> ArtifactStore:
    """The store `--artifact-store` names: "" is the folder `output_dir`; `s3://BUCKET[/PREFIX]` is
    that bucket (at `endpoint_url` when given, for MinIO and other S3-compatible servers), checked
    now: a bucket that does not exist or cannot be reached, or refused credentials, raise
    ArtifactStoreError, as do a malformed spec and S3 options without an S3 store."""
    if not spec:
        if endpoint_url or region:
            raise ArtifactStoreError("--s3-endpoint-url and --s3-region need --artifact-store s3://BUCKET[/PREFIX]")
        from diffserve.scheduler.artifact_local import LocalArtifactStore

        store: ArtifactStore = LocalArtifactStore(output_dir)
    elif spec.startswith("s3://"):
        from diffserve.scheduler.artifact_s3 import S3ArtifactStore, parse_s3_url

        bucket, prefix = parse_s3_url(spec)
        store = S3ArtifactStore(bucket, prefix, endpoint_url=endpoint_url, region=region)
        store.check()
    else:
        raise ArtifactStoreError(f"--artifact-store {spec!r}: expected s3://BUCKET[/PREFIX] (a local folder is --output-dir)")
    log.info("artifacts: %s", store.where())
    return store
