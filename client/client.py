"""Python client for diffserve's gRPC API: `Client` (blocking) and `AsyncClient` (asyncio).

    from diffserve.client import Client
    with Client("127.0.0.1:50051") as c:
        job = c.submit("a red fox in the snow", num_frames=1, seed=7)
        for event in c.events(job.id):
            print(event)
        c.download_to(job.id, "fox.png")   # streamed to disk; c.download(job.id) returns the bytes

Errors raise `DiffserveError` with the gRPC code, the message and the google.rpc details
(field violations for bad input, retry delay when the server is overloaded).

Deadlines and retries (docs/api.md, "Python client: deadlines, retries, readiness"): unary calls
wait for the channel to connect (`wait_for_ready`) and have a deadline (`timeout_s`, default 30 s);
streams (Generate, StreamJobEvents, DownloadArtifact) have none beyond the caller's own timeout.
The channel's service config retries the read-only calls on UNAVAILABLE; a SubmitJob / Generate
that carries a client_request_id is retried on RESOURCE_EXHAUSTED after the server's RetryInfo
delay (`retries` times at most). `wait_until_serving` waits for health SERVING (Health.Watch).

A server with TLS and tokens (`serve --tls-cert ... --auth-tokens ...`):

    Client("host:50051", token="...", root_certificates=open("ca.pem", "rb").read())

`token` defaults to $DIFFSERVE_TOKEN; it is sent as `authorization: Bearer <token>` on every call.
TLS is used when root_certificates (or a client certificate for mutual TLS) is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from diffserve.v1 import generation_pb2 as pb
from diffserve.v1 import generation_pb2_grpc as pb_grpc
from diffserve.v1.limits import MESSAGE_SIZE_OPTIONS

DEFAULT_TIMEOUT_S = 30.0  # deadline of a unary call (waiting for the connection included)
DEFAULT_RETRIES = 3  # RESOURCE_EXHAUSTED retries of a submit that carries a client_request_id
MAX_RETRY_DELAY_S = 60.0  # a RetryInfo delay beyond this is cut to it
MAX_RECONNECT_BACKOFF_MS = 5000
WATCH_RETRY_S = 0.2  # pause before watching health again after the connection dropped
PROBE_TIMEOUT_S = 2.0  # the fail-fast health check that says why a channel does not connect
SERVICE = "diffserve.v1.GenerationService"
# Calls that change nothing (CancelJob: a second cancel is a no-op): the channel retries them on
# UNAVAILABLE, a stream only before its first reply. SubmitJob and Generate create jobs and are
# not here (see Client._retry_delay).
IDEMPOTENT = [{"service": SERVICE, "method": m} for m in ("GetJob", "ListModels", "CancelJob", "StreamJobEvents", "DownloadArtifact")] + [
    {"service": "grpc.health.v1.Health", "method": "Check"}]
SERVICE_CONFIG = {
    "methodConfig": [{
        "name": IDEMPOTENT,
        "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.2s", "maxBackoff": "2s", "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"]},
    }],
}
FORMATS = {"png": pb.OUTPUT_FORMAT_PNG, "mp4": pb.OUTPUT_FORMAT_MP4, "npy": pb.OUTPUT_FORMAT_NPY, "": pb.OUTPUT_FORMAT_UNSPECIFIED}
TERMINAL_EVENTS = ("completed", "failed", "cancelled")
# make_params keywords; prompt, output_format and images are its own arguments
PARAM_FIELDS = frozenset(pb.GenerationParams.DESCRIPTOR.fields_by_name) - {"prompt", "output_format", "images"}


@dataclass
class DiffserveError(Exception):
    """A failed call: gRPC code, message, and the google.rpc.Status details decoded."""

    code: grpc.StatusCode
    message: str
    field_violations: list[tuple[str, str]] = field(default_factory=list)
    retry_delay_s: float | None = None
    reason: str = ""
    # A unary call whose deadline passed while it waited for a connection (wait_for_ready): the
    # transport's reason ("... Connection refused"); "" when the server was reached.
    unreachable: str = ""

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

    @classmethod
    def from_status(cls, status: status_pb2.Status, **extra) -> "DiffserveError":
        """From a google.rpc.Status carried as data (a failed job's Job.error)."""
        codes = {code.value[0]: code for code in grpc.StatusCode}
        error = cls(code=codes.get(status.code, grpc.StatusCode.UNKNOWN), message=status.message, **extra)
        error.add_details(status)
        return error

    def add_details(self, status: status_pb2.Status) -> None:
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


STEP_CACHE_SYNTAX = ("POLICY[:THRESHOLD][:KNOB=VALUE]..., e.g. first-block:0.1, taylorseer:interval=4:max_order=2, "
                     "mag:0.06:max_skip_steps=3:mag_ratios=1.0,1.02,0.99")


def step_cache(value: str | dict | pb.StepCache) -> pb.StepCache:
    """A step-caching policy from a string (STEP_CACHE_SYNTAX: the policy, an optional threshold,
    then any StepCache field as KNOB=VALUE, mag_ratios comma-separated), a dict of the message's
    fields, or the message itself. Which knobs a policy takes: docs/acceleration.md."""
    if isinstance(value, pb.StepCache):
        return value
    if isinstance(value, dict):
        return pb.StepCache(**value)
    policy, *parts = str(value).split(":")
    cache = pb.StepCache(policy=policy.strip())
    fields = pb.StepCache.DESCRIPTOR.fields_by_name
    try:
        for i, part in enumerate(parts):
            name, eq, text = part.partition("=")
            name = name.strip()
            if not eq and i == 0:  # a bare number first: the threshold
                name, text = "threshold", part
            if name not in fields or name == "policy" or not text.strip():
                raise ValueError(part)
            if fields[name].is_repeated:
                getattr(cache, name).extend(float(x) for x in text.split(","))
            else:
                setattr(cache, name, float(text) if fields[name].type == fields[name].TYPE_FLOAT else int(text))
    except ValueError:
        raise ValueError(f"a step cache is {STEP_CACHE_SYNTAX} (got {value!r})") from None
    return cache


def lora_adapter(value: str | dict | pb.LoraAdapter) -> pb.LoraAdapter:
    """A LoRA adapter from "NAME" (scale unset: the server takes 1.0) or "NAME:SCALE" (e.g.
    "watercolor:0.8"), a dict of the message's fields, or the message itself."""
    if isinstance(value, pb.LoraAdapter):
        return value
    if isinstance(value, dict):
        return pb.LoraAdapter(**value)
    name, colon, scale = str(value).partition(":")
    if not name.strip():
        raise ValueError(f"a LoRA adapter is NAME or NAME:SCALE, e.g. watercolor:0.8 (got {value!r})")
    if not colon:
        return pb.LoraAdapter(name=name.strip())
    try:
        return pb.LoraAdapter(name=name.strip(), scale=float(scale))
    except ValueError:
        raise ValueError(f"a LoRA adapter is NAME or NAME:SCALE, e.g. watercolor:0.8 (got {value!r})") from None


def make_params(prompt: str = "", *, output_format: str | int = "", images: list = (), **fields) -> pb.GenerationParams:
    """GenerationParams from keyword fields named as in the proto; None values stay unset (model
    default); a name that is no field raises TypeError. `images`: encoded bytes, a PIL image (sent
    as PNG), an http(s) URL (the server fetches it) or a path on the server (under its --image-dir)."""
    params = pb.GenerationParams(prompt=prompt)
    params.output_format = FORMATS[output_format.lower()] if isinstance(output_format, str) else output_format
    for name, value in fields.items():
        if name not in PARAM_FIELDS:
            raise TypeError(f"unknown generation field {name!r} (fields: {', '.join(sorted(PARAM_FIELDS))})")
        if value is None:
            continue
        if name == "cache":
            params.cache.CopyFrom(step_cache(value))
        elif name == "loras":  # a list of "NAME[:SCALE]", dicts or LoraAdapter messages
            params.loras.extend(lora_adapter(v) for v in ([value] if isinstance(value, (str, dict, pb.LoraAdapter)) else value))
        else:
            setattr(params, name, value)
    for image in images:
        if not isinstance(image, (bytes, str, os.PathLike)):  # a PIL image
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            image = buffer.getvalue()
        if isinstance(image, bytes):
            params.images.add(data=image)
        elif str(image).startswith(("http://", "https://")):
            params.images.add(url=str(image))
        else:
            params.images.add(path=str(image))
    return params


def local_image(path_or_url: str | os.PathLike) -> bytes | str:
    """An image as a client on the caller's machine sends it: a URL as is (the server fetches it),
    a local file read here and sent as bytes. Raises OSError for a file that cannot be read."""
    if str(path_or_url).startswith(("http://", "https://")):
        return str(path_or_url)
    return Path(path_or_url).expanduser().read_bytes()


def is_terminal(event: pb.JobEvent) -> bool:
    return event.WhichOneof("event") in TERMINAL_EVENTS


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _channel_options() -> list:
    # Reconnecting to a server that is down backs off to 5 s at most (gRPC's default: 120 s), so a
    # call waiting for it (wait_for_ready) notices it up within 5 s.
    return [*MESSAGE_SIZE_OPTIONS, ("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
            ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS)]


class _Retries:
    """What Client and AsyncClient share: the per-call deadline and the RESOURCE_EXHAUSTED retries."""

    timeout_s: float | None = DEFAULT_TIMEOUT_S
    wait_for_ready: bool = True
    retries: int = DEFAULT_RETRIES

    def _deadline(self, timeout_s: float | None) -> float | None:
        return None if timeout_s is None else time.monotonic() + timeout_s

    @staticmethod
    def _left(deadline: float | None) -> float | None:
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def _retry_delay(self, error: DiffserveError, attempt: int, deadline: float | None) -> float | None:
        """Seconds to wait before trying a refused submit again, or None to give up: only a
        RESOURCE_EXHAUSTED with a RetryInfo, at most `retries` times, never past the deadline.
        (gRPC's own retry policy cannot read RetryInfo, so this is done here.)"""
        if error.code != grpc.StatusCode.RESOURCE_EXHAUSTED or error.retry_delay_s is None or attempt >= self.retries:
            return None
        delay = min(max(error.retry_delay_s, 0.0), MAX_RETRY_DELAY_S)
        if deadline is not None and time.monotonic() + delay >= deadline:
            return None
        return delay


def _auth_metadata(token: str | None) -> tuple:
    token = os.environ.get("DIFFSERVE_TOKEN", "") if token is None else token
    return (("authorization", f"Bearer {token}"),) if token else ()


def _credentials(tls: bool, root_certificates: bytes | None, private_key: bytes | None, certificate_chain: bytes | None):
    """TLS channel credentials (tls alone: the system's roots), or None for a plaintext channel."""
    if not tls and root_certificates is None and private_key is None and certificate_chain is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


def _watch_error(err: grpc.RpcError, service: str, timeout_s: float | None, last: str) -> DiffserveError | None:
    """The error that ends wait_until_serving, or None to watch again (the connection dropped)."""
    error = DiffserveError.from_rpc_error(err)
    if error.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DiffserveError(error.code, f"{service or 'the server'} was not SERVING within {timeout_s:g} s (last {last})")
    if error.code == grpc.StatusCode.UNAVAILABLE and not error.reason:
        return None
    return error


class Client(_Retries):
    """Blocking client. Methods raise DiffserveError.

    token: bearer token (default $DIFFSERVE_TOKEN, "" sends none). root_certificates: PEM bytes of
    the CA that signed the server's certificate (TLS); `tls=True` alone trusts the system's roots.
    private_key / certificate_chain: the client's own PEM key and certificate (mutual TLS).
    timeout_s: deadline of each unary call (None: none); wait_for_ready: unary calls wait (within
    that deadline) for the server to be reachable instead of failing at once with UNAVAILABLE.
    retries: how often a submit with a client_request_id is tried again after RESOURCE_EXHAUSTED."""

    def __init__(self, target: str = "127.0.0.1:50051", *, token: str | None = None, tls: bool = False,
                 root_certificates: bytes | None = None, private_key: bytes | None = None, certificate_chain: bytes | None = None,
                 timeout_s: float | None = DEFAULT_TIMEOUT_S, wait_for_ready: bool = True, retries: int = DEFAULT_RETRIES):
        self._metadata = _auth_metadata(token)
        self.timeout_s, self.wait_for_ready, self.retries = timeout_s, wait_for_ready, retries
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

    def _error(self, err: grpc.RpcError, waited: bool) -> DiffserveError:
        error = DiffserveError.from_rpc_error(err)
        if waited and error.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            error.unreachable = self._transport_problem()
        return error

    def _transport_problem(self) -> str:
        """Why the channel does not connect ("" if it does): one fail-fast health check."""
        try:
            self.health_stub.Check(health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT_S, metadata=self._metadata)
        except grpc.RpcError as err:
            probe = DiffserveError.from_rpc_error(err)
            if probe.code == grpc.StatusCode.UNAVAILABLE and not probe.reason:
                return probe.message or "unavailable"
        return ""

    _DEFAULT = object()

    def _call(self, fn, request, timeout_s=_DEFAULT, *, retry: bool = False):
        """A unary call with the client's deadline (or `timeout_s`) and wait_for_ready; `retry`:
        RESOURCE_EXHAUSTED is tried again after the server's RetryInfo delay (_retry_delay)."""
        deadline = self._deadline(self.timeout_s if timeout_s is Client._DEFAULT else timeout_s)
        attempt = 0
        while True:
            try:
                return fn(request, metadata=self._metadata, timeout=self._left(deadline), wait_for_ready=self.wait_for_ready)
            except grpc.RpcError as err:
                error = self._error(err, self.wait_for_ready)
            delay = self._retry_delay(error, attempt, deadline) if retry else None
            if delay is None:
                raise error from None
            time.sleep(delay)
            attempt += 1

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
        return self._call(self.stub.SubmitJob, request, retry=bool(client_request_id)).job

    def generate(self, prompt: str = "", *, params: pb.GenerationParams | None = None, client_request_id: str = "", timeout_s: float | None = None, priority: int | None = None, **fields) -> Iterator[pb.JobEvent]:
        """Creates a job bound to this stream: closing the iterator early or the timeout expiring cancels it.
        No deadline but `timeout_s` (which also bounds waiting for the connection; without it a
        server that cannot be reached fails at once). With a client_request_id, a RESOURCE_EXHAUSTED
        before the first event is tried again after the server's RetryInfo delay."""
        request = pb.GenerateRequest(params=params or make_params(prompt, **fields), client_request_id=client_request_id, priority=priority)
        deadline = self._deadline(timeout_s)
        waits = self.wait_for_ready and timeout_s is not None
        attempt = 0
        while True:
            call = self.stub.Generate(request, timeout=self._left(deadline), metadata=self._metadata, wait_for_ready=waits)
            replied = False
            try:
                for event in call:
                    replied = True
                    yield event
                return
            except grpc.RpcError as err:
                error = self._error(err, waits and not replied)
                delay = None if replied or not client_request_id else self._retry_delay(error, attempt, deadline)
                if delay is None:
                    raise error from None
            finally:
                call.cancel()
            time.sleep(delay)
            attempt += 1

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
        """timeout_s: this call's deadline (default: the client's)."""
        return self._call(self.stub.CancelJob, pb.CancelJobRequest(job_id=job_id), self.timeout_s if timeout_s is None else timeout_s).job

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

    def wait_until_serving(self, timeout_s: float | None = None, service: str = "", *, alive: Callable[[], bool] | None = None) -> None:
        """Returns once the server's health for `service` ("" the server, "diffserve.v1.GenerationService/MODEL"
        one model) is SERVING. Watches it (grpc.health.v1 Health.Watch: the server pushes each change,
        nothing polls) and waits for the server to be reachable first (wait_for_ready); a dropped
        connection is watched again. `alive`: for a server known to be up (one this program started),
        a check that it still runs: the watch then does not wait for a connection, and ends with
        UNAVAILABLE once alive() is false. Raises DiffserveError: DEADLINE_EXCEEDED when timeout_s
        passes (its message says the last status seen), or the call's own error (UNIMPLEMENTED, ...)."""
        deadline = self._deadline(timeout_s)
        waits = self.wait_for_ready and alive is None
        last = "no answer"
        while True:
            call = self.health_stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=self._left(deadline),
                                          metadata=self._metadata, wait_for_ready=waits)
            try:
                for reply in call:
                    last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.RpcError as err:
                error = _watch_error(err, service, timeout_s, last)
                if error is not None:
                    raise error from None
            finally:
                call.cancel()
            if alive is not None and not alive():
                raise DiffserveError(grpc.StatusCode.UNAVAILABLE, f"the server stopped before {service or 'it'} was SERVING (last {last})")
            time.sleep(WATCH_RETRY_S)


class AsyncClient(_Retries):
    """asyncio twin of Client (same arguments, same deadlines and retries)."""

    def __init__(self, target: str = "127.0.0.1:50051", *, token: str | None = None, tls: bool = False,
                 root_certificates: bytes | None = None, private_key: bytes | None = None, certificate_chain: bytes | None = None,
                 timeout_s: float | None = DEFAULT_TIMEOUT_S, wait_for_ready: bool = True, retries: int = DEFAULT_RETRIES):
        self._metadata = _auth_metadata(token)
        self.timeout_s, self.wait_for_ready, self.retries = timeout_s, wait_for_ready, retries
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

    async def _error(self, err: grpc.RpcError, waited: bool) -> DiffserveError:
        error = DiffserveError.from_rpc_error(err)
        if waited and error.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            try:
                await self.health_stub.Check(health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT_S, metadata=self._metadata)
            except grpc.RpcError as probe_err:
                probe = DiffserveError.from_rpc_error(probe_err)
                if probe.code == grpc.StatusCode.UNAVAILABLE and not probe.reason:
                    error.unreachable = probe.message or "unavailable"
        return error

    _DEFAULT = object()

    async def _call(self, fn, request, timeout_s=_DEFAULT, *, retry: bool = False):
        deadline = self._deadline(self.timeout_s if timeout_s is AsyncClient._DEFAULT else timeout_s)
        attempt = 0
        while True:
            try:
                return await fn(request, metadata=self._metadata, timeout=self._left(deadline), wait_for_ready=self.wait_for_ready)
            except grpc.RpcError as err:
                error = await self._error(err, self.wait_for_ready)
            delay = self._retry_delay(error, attempt, deadline) if retry else None
            if delay is None:
                raise error from None
            await asyncio.sleep(delay)
            attempt += 1

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
        return (await self._call(self.stub.SubmitJob, request, retry=bool(client_request_id))).job

    async def generate(self, prompt: str = "", *, params: pb.GenerationParams | None = None, client_request_id: str = "", timeout_s: float | None = None, priority: int | None = None, **fields) -> AsyncIterator[pb.JobEvent]:
        request = pb.GenerateRequest(params=params or make_params(prompt, **fields), client_request_id=client_request_id, priority=priority)
        deadline = self._deadline(timeout_s)
        waits = self.wait_for_ready and timeout_s is not None
        attempt = 0
        while True:
            call = self.stub.Generate(request, timeout=self._left(deadline), metadata=self._metadata, wait_for_ready=waits)
            replied = False
            try:
                async for event in call:
                    replied = True
                    yield event
                return
            except grpc.RpcError as err:
                error = await self._error(err, waits and not replied)
                delay = None if replied or not client_request_id else self._retry_delay(error, attempt, deadline)
                if delay is None:
                    raise error from None
            finally:
                call.cancel()
            await asyncio.sleep(delay)
            attempt += 1

    async def events(self, job_id: str) -> AsyncIterator[pb.JobEvent]:
        async for event in self._stream(self.stub.StreamJobEvents(pb.StreamJobEventsRequest(job_id=job_id), metadata=self._metadata)):
            yield event

    async def wait(self, job_id: str) -> pb.Job:
        async for _ in self.events(job_id):
            pass
        return await self.get(job_id)

    async def get(self, job_id: str) -> pb.Job:
        return (await self._call(self.stub.GetJob, pb.GetJobRequest(job_id=job_id))).job

    async def cancel(self, job_id: str, timeout_s: float | None = None) -> pb.Job:
        return (await self._call(self.stub.CancelJob, pb.CancelJobRequest(job_id=job_id), self.timeout_s if timeout_s is None else timeout_s)).job

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

    async def wait_until_serving(self, timeout_s: float | None = None, service: str = "", *, alive: Callable[[], bool] | None = None) -> None:
        """Client.wait_until_serving (Health.Watch)."""
        deadline = self._deadline(timeout_s)
        waits = self.wait_for_ready and alive is None
        last = "no answer"
        while True:
            call = self.health_stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=self._left(deadline),
                                          metadata=self._metadata, wait_for_ready=waits)
            try:
                async for reply in call:
                    last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.RpcError as err:
                error = _watch_error(err, service, timeout_s, last)
                if error is not None:
                    raise error from None
            finally:
                call.cancel()
            if alive is not None and not alive():
                raise DiffserveError(grpc.StatusCode.UNAVAILABLE, f"the server stopped before {service or 'it'} was SERVING (last {last})")
            await asyncio.sleep(WATCH_RETRY_S)
