"""The S3 artifact store: S3-compatible object storage (AWS S3, MinIO, Ceph RGW, ...) via boto3.

`--artifact-store s3://BUCKET/PREFIX` keeps each artifact as the object `PREFIX/<job id><ext>`,
its content type the artifact's media type, and its description and owning principal as the
object's user metadata (`x-amz-meta-diffserve-artifact`, artifacts.description_json): one PUT
makes both appear at once, and any scheduler with access to the bucket can serve the artifact.
Encoding goes to a temporary file first (ffmpeg writes MP4 to a file), which is then uploaded
(multipart when large) and removed. Downloads stream the object's body in CHUNK_BYTES pieces.

Credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile,
an instance or container role); the region from --s3-region or that chain. With
--s3-endpoint-url the bucket is addressed by path (http://host:9000/BUCKET/KEY), which every
S3-compatible server accepts, and checksums are sent only where the API requires them (several
S3-compatible servers refuse boto3's newer default trailing checksums).

boto3 is imported only when an S3 store is opened: the scheduler runs without it otherwise.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from diffserve.v1 import generation_pb2 as pb

from diffserve.scheduler.artifact_encoding import MEDIA_TYPES, encode_artifact, extension
from diffserve.scheduler.artifacts import CHUNK_BYTES, ArtifactStore, ArtifactStoreError, StoredArtifact, description_json, parse_description, valid_id

log = logging.getLogger(__name__)

METADATA_KEY = "diffserve-artifact"  # sent as x-amz-meta-diffserve-artifact


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, key prefix ending in "/" or empty) of s3://BUCKET[/PREFIX]. Raises ArtifactStoreError."""
    rest = url.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ArtifactStoreError(f"--artifact-store {url!r}: no bucket (expected s3://BUCKET[/PREFIX])")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def _error_code(exc) -> str:
    return str(exc.response.get("Error", {}).get("Code", "")) if hasattr(exc, "response") else ""


class S3ArtifactStore(ArtifactStore):
    """Artifacts as objects under one bucket and prefix; thread-safe (one boto3 client)."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str = "", region: str = ""):
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise ArtifactStoreError("the S3 artifact store needs boto3: pip install 'diffserve[s3]'") from None
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        config = Config(
            connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"},
            s3={"addressing_style": "path"} if endpoint_url else None,
            request_checksum_calculation="when_required", response_checksum_validation="when_required",
        )
        try:
            self._client = boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, region_name=region or None, config=config)
        except ValueError as exc:  # a malformed endpoint URL
            raise ArtifactStoreError(f"--s3-endpoint-url {endpoint_url!r}: {exc}") from None
        except Exception as exc:  # botocore: no region, a broken profile, ...
            raise ArtifactStoreError(f"cannot make an S3 client: {exc}") from None

    def where(self) -> str:
        at = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{at}"

    def _key(self, file_name: str) -> str:
        return f"{self.prefix}{file_name}"

    def _explain(self, exc: Exception, what: str) -> ArtifactStoreError:
        """An operator's message for a boto3 / botocore error while doing `what` (e.g. "reading KEY from")."""
        from botocore import exceptions as bx

        code = _error_code(exc)
        if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError | bx.CredentialRetrievalError):
            why = f"no usable credentials ({exc}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile or a role"
        elif isinstance(exc, bx.EndpointConnectionError | bx.ConnectTimeoutError):
            why = f"cannot reach the S3 endpoint ({exc})"
        elif code in ("404", "NoSuchBucket"):
            why = f"bucket {self.bucket!r} does not exist"
        elif code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            why = f"access to bucket {self.bucket!r} denied (credentials refused or lacking permission)"
        elif code in ("301", "PermanentRedirect", "AuthorizationHeaderMalformed"):
            why = f"bucket {self.bucket!r} is in another region (set --s3-region)"
        else:
            why = str(exc)
        return ArtifactStoreError(f"{what} {self.where()}: {why}")

    def check(self) -> None:
        """Raises ArtifactStoreError unless the bucket exists and these credentials may use it."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise self._explain(exc, "--artifact-store") from None

    def save(self, job_id: str, frames: np.ndarray, params: pb.GenerationParams, principal: str) -> pb.Artifact:
        from botocore.exceptions import BotoCoreError, ClientError

        assert valid_id(job_id), job_id
        with tempfile.TemporaryDirectory(prefix="diffserve-artifact-") as folder:
            path = Path(folder) / f"{job_id}{extension(params)}"
            artifact = encode_artifact(job_id, frames, params, path)
            extra = {"ContentType": artifact.media_type, "Metadata": {METADATA_KEY: description_json(artifact, principal)}}
            try:
                self._client.upload_file(str(path), self.bucket, self._key(artifact.file_name), ExtraArgs=extra)
            except (BotoCoreError, ClientError) as exc:
                raise self._explain(exc, f"uploading {artifact.file_name} to") from None
        return artifact

    def lookup(self, artifact_id: str) -> StoredArtifact | None:
        from botocore.exceptions import BotoCoreError, ClientError

        if not valid_id(artifact_id):
            return None
        for ext in MEDIA_TYPES:  # the id does not say the format: at most one HEAD per format
            key = self._key(f"{artifact_id}{ext}")
            try:
                head = self._client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                    continue
                raise self._explain(exc, f"looking up {key} in") from None
            except BotoCoreError as exc:
                raise self._explain(exc, f"looking up {key} in") from None
            text = head.get("Metadata", {}).get(METADATA_KEY)
            if text is None:  # an object diffserve did not write
                log.warning("s3://%s/%s has no %s metadata: not served", self.bucket, key, METADATA_KEY)
                return None
            return parse_description(text, artifact_id, f"s3://{self.bucket}/{key}")
        return None

    def chunks(self, artifact: pb.Artifact) -> Iterator[bytes]:
        from botocore.exceptions import BotoCoreError, ClientError

        key = self._key(artifact.file_name)
        try:
            body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"]
        except (BotoCoreError, ClientError) as exc:
            raise self._explain(exc, f"reading {key} from") from None
        try:
            for chunk in body.iter_chunks(CHUNK_BYTES):
                yield chunk
        except BotoCoreError as exc:  # the connection broke mid-stream
            raise self._explain(exc, f"reading {key} from") from None
        finally:
            body.close()

    def delete(self, artifact: pb.Artifact) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        key = self._key(artifact.file_name)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=key)  # one object: artifact and description go together
        except (BotoCoreError, ClientError) as exc:
            raise self._explain(exc, f"deleting {key} from") from None
