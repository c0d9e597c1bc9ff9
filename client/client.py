"""Python client for diffserve's gRPC API: `Client` (blocking) and `AsyncClient` (asyncio).

    from diffserve.client import Client
    with Client("127.0.0.1:50051") as c:
        job = c.submit("a red fox in the snow", num_frames=1, seed=7)
        for event in c.events(job.id):
            print(event)
        c.download_to(job.id, "fox.png")   # streamed to disk; c.download(job.id) returns the bytes

Errors raise `DiffserveError` with the gRPC code, the message and the google.rpc details
(field violations for bad input, retry delay when the server is overloaded).

A server with TLS and tokens (`serve --tls-cert ... --auth-tokens ...`):

    Client("host:50051", token="...", root_certificates=open("ca.pem", "rb").read())

`token` defaults to $DIFFSERVE_TOKEN; it is sent as `authorization: Bearer <token>` on every call.
TLS is used when root_certificates (or a client certificate for mutual TLS) is given.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from diffserve.v1 import generation_pb2 as pb
from diffserve.v1 import generation_pb2_grpc as pb_grpc
from diffserve.v1.limits import MESSAGE_SIZE_OPTIONS

FORMATS = {"png": pb.OUTPUT_FORMAT_PNG, "mp4": pb.OUTPUT_FORMAT_MP4, "npy": pb.OUTPUT_FORMAT_NPY, "": pb.OUTPUT_FORMAT_UNSPECIFIED}
TERMINAL_EVENTS = ("completed", "failed", "cancelled")


@dataclass
class DiffserveError(Exception):
    """A failed call: gRPC code, message, and the google.rpc.Status details decoded."""

    code: grpc.StatusCode
    message: str
    field_violations: list[tuple[str, str]] = field(default_factory=list)
    retry_delay_s: float | None = None
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> "DiffserveError":
        """The error of a failed call, with the google.rpc.Status details that grpcio-status's
        rpc_status.from_call decodes from its trailers (none when the status is absent, or does not
        match the call's code and message: then only the code and message)."""
        error = cls(code=err.code(), message=err.details() or "")
        try:
            status = rpc_status.from_call(err)
        except ValueError:
            status = None
        if status is not None:
            error.add_details(status)
        return error

    def add_details(self, status: status_pb2.Status) -> None:
        """Decodes the BadRequest, RetryInfo and ErrorInfo details of a google.rpc.Status."""
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                self.field_violations += [(v.field, v.description) for v in bad.field_violations]
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                self.retry_delay_s = retry.retry_delay.ToTimedelta().total_seconds()
            elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                self.reason = info.reason


def make_params(prompt: str = "", *, output_format: str | int = "", images: list[bytes | str] = (), **fields) -> pb.GenerationParams:
    """GenerationParams from keyword fields; None values stay unset (model default)."""
    params = pb.GenerationParams(prompt=prompt)
    params.output_format = FORMATS[output_format.lower()] if isinstance(output_format, str) else output_format
    for name, value in fields.items():
        if value is not None:
            setattr(params, name, value)
    for image in images:
        if isinstance(image, bytes):
            params.images.add(data=image)
        elif str(image).startswith(("http://", "https://")):
            params.images.add(url=str(image))
        else:
            params.images.add(path=str(image))
    return params


def is_terminal(event: pb.JobEvent) -> bool:
    return event.WhichOneof("event") in TERMINAL_EVENTS


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _channel_options() -> list:
    return list(MESSAGE_SIZE_OPTIONS)


def _auth_metadata(token: str | None) -> tuple:
    token = os.environ.get("DIFFSERVE_TOKEN", "") if token is None else token
    return (("authorization", f"Bearer {token}"),) if token else ()


def _credentials(tls: bool, root_certificates: bytes | None, private_key: bytes | None, certificate_chain: bytes | None):
    """TLS channel credentials (tls alone: the system's roots), or None for a plaintext channel."""
    if not tls and root_certificates is None and private_key is None and certificate_chain is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


class Client:
    """Blocking client. Methods raise DiffserveError.

    token: bearer token (default $DIFFSERVE_TOKEN, "" sends none). root_certificates: PEM bytes of
    the CA that signed the server's certificate (TLS); `tls=True` alone trusts the system's roots.
    private_key / certificate_chain: the client's own PEM key and certificate (mutual TLS)."""

    def __init__(self, target: str = "127.0.0.1:50051", *, token: str | None = None, tls: bool = False,
                 root_certificates: bytes | None = None, private_key: bytes | None = None, certificate_chain: bytes | None = None):
        self._metadata = _auth_metadata(token)
        credentials = _credentials(tls, root_certificates, private_key, certificate_chain)
        if credentials is not None:
            self.channel = grpc.secure_channel(target, credentials, options=_channel_options())
        else:
            self.channel = grpc.insecure_channel(target, options=_channel_options())
        self.stub = pb_grpc.GenerationServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, metadata=self._metadata, **kwargs)
        except grpc.RpcError as err:
            raise DiffserveError.from_rpc_error(err) from None

    def _stream(self, call):
        try:
            yield from call
        except grpc.RpcError as err:
            raise DiffserveError.from_rpc_error(err) from None

    def submit(self, prompt: str = "", *, params: pb.GenerationParams | None = None, client_request_id: str = "", timeout_s: float | None = None, priority: int | None = None, **fields) -> pb.Job:
        """Creates a job (or returns the one with this client_request_id) without waiting for it.
        `priority` (higher runs sooner, -100..100) defaults to the principal's default."""
        request = pb.SubmitJobRequest(params=params or make_params(prompt, **fields), client_request_id=client_request_id, priority=priority)
        if timeout_s:
            request.timeout.FromMilliseconds(int(timeout_s * 1000))
        return self._call(self.stub.SubmitJob, request).job

    def generate(self, prompt: str = "", *, params: pb.GenerationParams | None = None, client_request_id: str = "", timeout_s: float | None = None, priority: int | None = None, **fields) -> Iterator[pb.JobEvent]:
        """Creates a job bound to this stream: closing the iterator early or the timeout expiring cancels it."""
        request = pb.GenerateRequest(params=params or make_params(prompt, **fields), client_request_id=client_request_id, priority=priority)
        call = self.stub.Generate(request, timeout=timeout_s, metadata=self._metadata)
        try:
            yield from self._stream(call)
        finally:
            call.cancel()

    def events(self, job_id: str) -> Iterator[pb.JobEvent]:
        """A job's events from the first until it ends."""
        yield from self._stream(self.stub.StreamJobEvents(pb.StreamJobEventsRequest(job_id=job_id), metadata=self._metadata))

    def wait(self, job_id: str) -> pb.Job:
        for _ in self.events(job_id):
            pass
        return self.get(job_id)

    def get(self, job_id: str) -> pb.Job:
        return self._call(self.stub.GetJob, pb.GetJobRequest(job_id=job_id)).job

    def cancel(self, job_id: str, timeout_s: float | None = None) -> pb.Job:
        return self._call(self.stub.CancelJob, pb.CancelJobRequest(job_id=job_id), timeout=timeout_s).job

    def list_models(self) -> list[pb.Model]:
        return list(self._call(self.stub.ListModels, pb.ListModelsRequest()).models)

    def download(self, artifact_id: str, path: str | os.PathLike | None = None) -> bytes:
        """The artifact's bytes; also written to `path` when given."""
        data = b"".join(r.data for r in self._stream(self.stub.DownloadArtifact(pb.DownloadArtifactRequest(artifact_id=artifact_id), metadata=self._metadata)))
        if path is not None:
            Path(path).write_bytes(data)
        return data

    def download_to(self, artifact_id: str, path: str | os.PathLike) -> Path:
        """Streams the artifact to `path` without holding it in memory: each chunk is written as it
        arrives to a temporary file beside `path` (same folder, so the rename cannot cross file
        systems), flushed, and renamed onto `path` once the stream ends. On any error the temporary
        file is removed and `path` is left as it was. Returns `path`."""
        target = Path(path)
        fd, part = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                call = self.stub.DownloadArtifact(pb.DownloadArtifactRequest(artifact_id=artifact_id), metadata=self._metadata)
                try:
                    for reply in self._stream(call):
                        out.write(reply.data)
                finally:
                    call.cancel()  # a no-op once the stream has ended; stops it after a write error
                out.flush()
                os.fsync(out.fileno())
            os.chmod(part, 0o666 & ~_umask())  # mkstemp makes 0600; a plain write would honour the umask
            os.replace(part, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part)
            raise
        return target

    def health(self, service: str = "") -> str:
        """SERVING, NOT_SERVING, ... as the standard grpc.health.v1 service reports it."""
        reply = self._call(self.health_stub.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


class AsyncClient:
    """asyncio twin of Client (same arguments)."""

    def __init__(self, target: str = "127.0.0.1:50051", *, token: str | None = None, tls: bool = False,
                 root_certificates: bytes | None = None, private_key: bytes | None = None, certificate_chain: bytes | None = None):
        self._metadata = _auth_metadata(token)
        credentials = _credentials(tls, root_certificates, private_key, certificate_chain)
        if credentials is not None:
            self.channel = grpc.aio.secure_channel(target, credentials, options=_channel_options())
        else:
            self.channel = grpc.aio.insecure_channel(target, options=_channel_options())
        self.stub = pb_grpc.GenerationServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, fn, *args, **kwargs):
        try:
            return await fn(*args, metadata=self._metadata, **kwargs)
        except grpc.RpcError as err:
            raise DiffserveError.from_rpc_error(err) from None

    async def _stream(self, call) -> AsyncIterator:
        try:
            async for item in call:
                yield item
        except grpc.RpcError as err:
            raise DiffserveError.from_rpc_error(err) from None

    async def submit(self, prompt: str = "", *, params: pb.GenerationParams | None = None, client_request_id: str = "", timeout_s: float | None = None, priority: int | None = None, **fields) -> pb.Job:
        request = pb.SubmitJobRequest(params=params or make_params(prompt, **fields), client_request_id=client_request_id, priority=priority)
        if timeout_s:
            request.timeout.FromMilliseconds(int(timeout_s * 1000))
        return (await self._call(self.stub.SubmitJob, request)).job

    async def generate(self, prompt: str = "", *, params: pb.GenerationParams | None = None, client_request_id: str = "", timeout_s: float | None = None, priority: int | None = None, **fields) -> AsyncIterator[pb.JobEvent]:
        request = pb.GenerateRequest(params=params or make_params(prompt, **fields), client_request_id=client_request_id, priority=priority)
        call = self.stub.Generate(request, timeout=timeout_s, metadata=self._metadata)
        try:
            async for event in self._stream(call):
                yield event
        finally:
            call.cancel()

    async def events(self, job_id: str) -> AsyncIterator[pb.JobEvent]:
        async for event in self._stream(self.stub.StreamJobEvents(pb.StreamJobEventsRequest(job_id=job_id), metadata=self._metadata)):
            yield event

    async def wait(self, job_id: str) -> pb.Job:
        async for _ in self.events(job_id):
            pass
        return await self.get(job_id)

    async def get(self, job_id: str) -> pb.Job:
        return (await self._call(self.stub.GetJob, pb.GetJobRequest(job_id=job_id))).job

    async def cancel(self, job_id: str) -> pb.Job:
        return (await self._call(self.stub.CancelJob, pb.CancelJobRequest(job_id=job_id))).job

    async def list_models(self) -> list[pb.Model]:
        return list((await self._call(self.stub.ListModels, pb.ListModelsRequest())).models)

    async def download(self, artifact_id: str, path: str | os.PathLike | None = None) -> bytes:
        chunks = [r.data async for r in self._stream(self.stub.DownloadArtifact(pb.DownloadArtifactRequest(artifact_id=artifact_id), metadata=self._metadata))]
        data = b"".join(chunks)
        if path is not None:
            Path(path).write_bytes(data)
        return data

    async def health(self, service: str = "") -> str:
        reply = await self._call(self.health_stub.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
