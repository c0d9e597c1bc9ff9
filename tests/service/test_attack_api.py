"""Attacks on the gRPC API (issue 12, parts 3 and 4): TLS, bearer tokens, per-principal isolation.

Two real `diffserve serve` processes on loopback: one with TLS + tokens and the tiny Wan worker
(module scope), one with mutual TLS + tokens and no worker (no model is needed to be refused).
Certificates are made on the fly: a CA, a server certificate for 127.0.0.1 and a client one.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from diffserve.client import AsyncClient, Client, DiffserveError
from diffserve.v1 import generation_pb2 as pb
from jobs_util import wait_step
from conftest import interrupt

TOKENS = {"alice": "alice-" + "a" * 26, "bob": "bob-" + "b" * 28, "admin": "admin-" + "c" * 26}
BOB_OLD = "bob-old-" + "d" * 24  # a second token of bob's, revoked by test_tokens_file_is_reloaded
SMALL = dict(prompt="a lighthouse", height=32, width=32, num_frames=1, num_inference_steps=2, output_format="png")
LONG = dict(prompt="a long job", height=32, width=32, num_frames=1, num_inference_steps=400, output_format="npy")


# ---- certificates ----

def make_pki(folder: Path) -> dict[str, Path]:
    """ca.pem, server.pem / server.key (127.0.0.1, localhost), client.pem / client.key, all signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(subject: str, key, issuer: str, issuer_key, *, ca: bool = False, extensions=()) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer)).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        for extension in extensions:
            builder = builder.add_extension(extension, critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(stem: str, certificate, key=None) -> None:
        (folder / f"{stem}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            path = folder / f"{stem}.key"
            path.write_bytes(pem)
            path.chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert("diffserve test CA", ca_key, "diffserve test CA", ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    server = cert("127.0.0.1", server_key, "diffserve test CA", ca_key, extensions=[san, x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])])
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = cert("alice", client_key, "diffserve test CA", ca_key, extensions=[x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])])
    write("ca", ca)
    write("server", server, server_key)
    write("client", client, client_key)
    return {stem: folder / stem for stem in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def write_tokens(path: Path, tokens: dict[str, str], extra: list[tuple[str, str]] = ()) -> None:
    """Written beside and renamed into place (as an operator rotating tokens should), mode 600."""
    lines = ["# principal token"] + [f"{p} {t}" for p, t in tokens.items()] + [f"{p} {t}" for p, t in extra]
    tmp = path.with_suffix(".new")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.chmod(0o600)
    os.replace(tmp, path)


# ---- servers ----

class SecureServer:
    """A `diffserve serve` subprocess with TLS flags, on a free loopback port."""

    def __init__(self, workdir: Path, pki: dict[str, Path], *flags: str, model_path: Path | None = None):
        ready = workdir / "port"
        ready.unlink(missing_ok=True)
        self.pki = pki
        cmd = [sys.executable, "-m", "diffserve.client.cli", "serve", "--port", "0", "--output-dir", str(workdir / "outputs"),
               "--ready-file", str(ready), "--log-level", "WARNING", "--state-dir", str(workdir / "state"), "--tls-cert", str(pki["server.pem"]),
               "--tls-key", str(pki["server.key"]), *flags]
        if model_path is not None:
            cmd += ["--model-path", str(model_path), "--warmup-shape", "32x32x1"]
        self.proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 60
        while not (ready.exists() and ready.read_text().strip()):  # created, then written: wait for the number
            assert self.proc.poll() is None, f"server exited with {self.proc.returncode}"
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        self.target = f"127.0.0.1:{ready.read_text().strip()}"

    def client(self, token: str | None = "", **tls) -> Client:
        """A TLS client trusting the test CA; token "" sends none (not even $DIFFSERVE_TOKEN)."""
        return Client(self.target, token=token, root_certificates=self.pki["ca.pem"].read_bytes(), **tls)

    def wait_serving(self, timeout_s: float = 120) -> None:
        with self.client() as client:  # health is open: no token
            try:  # Health.Watch
                client.wait_until_serving(timeout_s, alive=lambda: self.proc.poll() is None)
            except DiffserveError as err:
                raise AssertionError(f"server never became SERVING: {err} (exit code {self.proc.poll()})") from None

    def stop(self) -> None:
        interrupt(self.proc)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def secure_server(tiny_wan, pki, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("secure")
    tokens = workdir / "tokens"
    write_tokens(tokens, TOKENS, [("bob", BOB_OLD)])
    server = SecureServer(workdir, pki, "--auth-tokens", str(tokens), model_path=tiny_wan)
    server.tokens_file = tokens
    try:
        server.wait_serving()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def clients(secure_server):
    made = {name: secure_server.client(token) for name, token in TOKENS.items()}
    yield made
    for client in made.values():
        client.close()


def expect_error(code: grpc.StatusCode, fn, *args, **kwargs) -> DiffserveError:
    with pytest.raises(DiffserveError) as info:
        result = fn(*args, **kwargs)
        if hasattr(result, "__next__"):  # a stream fails when read
            list(result)
    assert info.value.code == code, info.value
    return info.value


def every_rpc(client: Client, job_id: str) -> dict:
    """Each GenerationService RPC once, as a thunk."""
    return {
        "ListModels": lambda: client.list_models(),
        "SubmitJob": lambda: client.submit(**SMALL),
        "Generate": lambda: list(client.generate(**SMALL)),
        "GetJob": lambda: client.get(job_id),
        "StreamJobEvents": lambda: list(client.events(job_id)),
        "CancelJob": lambda: client.cancel(job_id),
        "DownloadArtifact": lambda: client.download(job_id),
    }


# ---- tokens ----

def test_health_and_reflection_are_open_without_a_token(secure_server):
    with secure_server.client() as client:
        assert client.health() == "SERVING"
    with grpc.secure_channel(secure_server.target, grpc.ssl_channel_credentials(secure_server.pki["ca.pem"].read_bytes())) as channel:
        assert "diffserve.v1.GenerationService" in set(ProtoReflectionDescriptorDatabase(channel).get_services())


def test_missing_or_wrong_token_is_unauthenticated_on_every_rpc(secure_server, clients):
    job = clients["alice"].submit(**SMALL)
    wrong = "x" * 32
    with secure_server.client() as anonymous, secure_server.client(wrong) as forger:
        for (rpc, call), (_, forged) in zip(every_rpc(anonymous, job.id).items(), every_rpc(forger, job.id).items()):
            err = expect_error(grpc.StatusCode.UNAUTHENTICATED, call)
            assert err.reason == "MISSING_TOKEN", rpc
            err = expect_error(grpc.StatusCode.UNAUTHENTICATED, forged)
            assert err.reason == "INVALID_TOKEN" and wrong not in err.message, rpc
    # a malformed authorization header is no token at all
    with grpc.secure_channel(secure_server.target, grpc.ssl_channel_credentials(secure_server.pki["ca.pem"].read_bytes())) as channel:
        from diffserve.v1 import generation_pb2_grpc as pb_grpc

        stub = pb_grpc.GenerationServiceStub(channel)
        for header in (f"Basic {TOKENS['alice']}", TOKENS["alice"], "Bearer"):
            with pytest.raises(grpc.RpcError) as info:
                stub.GetJob(pb.GetJobRequest(job_id=job.id), metadata=(("authorization", header),))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, header
    # the refused calls created nothing, and alice's job is untouched
    assert clients["alice"].wait(job.id).state == pb.JOB_STATE_SUCCEEDED


def test_plaintext_client_cannot_talk_to_a_tls_server(secure_server):
    # wait_for_ready=False: the refused handshake fails the call at once (UNAVAILABLE) instead of
    # being waited on until the client's deadline
    with Client(secure_server.target, token=TOKENS["alice"], wait_for_ready=False) as plain:
        expect_error(grpc.StatusCode.UNAVAILABLE, plain.list_models)


def test_tls_and_token_round_trip_with_the_python_client(clients, tmp_path):
    alice = clients["alice"]
    assert [m.name for m in alice.list_models()] == ["tiny-wan"]
    job = alice.wait(alice.submit(**SMALL).id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    data = alice.download(job.id, tmp_path / "out.png")
    assert data.startswith(b"\x89PNG") and (tmp_path / "out.png").read_bytes() == data


def test_async_client_sends_the_token_over_tls(secure_server, clients):
    job = clients["bob"].wait(clients["bob"].submit(**SMALL).id)

    async def run() -> tuple[str, bytes]:
        ca = secure_server.pki["ca.pem"].read_bytes()
        async with AsyncClient(secure_server.target, token=TOKENS["bob"], root_certificates=ca) as bob, \
                AsyncClient(secure_server.target, token=TOKENS["alice"], root_certificates=ca) as alice:
            with pytest.raises(DiffserveError) as info:
                await alice.get(job.id)
            assert info.value.code == grpc.StatusCode.NOT_FOUND
            return (await bob.get(job.id)).id, await bob.download(job.id)

    job_id, data = asyncio.run(run())
    assert job_id == job.id and data.startswith(b"\x89PNG")


def test_tls_and_token_round_trip_with_the_cli(secure_server, tmp_path):
    common = ["generate", "--server", secure_server.target, "--tls-ca", str(secure_server.pki["ca.pem"]), "--prompt", "a fox",
              "--height", "32", "--width", "32", "--num-frames", "1", "--num-inference-steps", "2", "--seed", "3", "--save-output"]

    def cli(*args: str, env_token: str | None = None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "DIFFSERVE_TOKEN"}
        if env_token is not None:
            env["DIFFSERVE_TOKEN"] = env_token
        return subprocess.run([sys.executable, "-m", "diffserve.client.cli", *args], capture_output=True, text=True, timeout=120, env=env)

    png = tmp_path / "flag.png"
    done = cli(*common, "--token", TOKENS["bob"], "--output-path", str(png))
    assert done.returncode == 0, done.stderr
    assert png.read_bytes().startswith(b"\x89PNG")
    env = tmp_path / "env.png"
    done = cli(*common, "--output-path", str(env), env_token=TOKENS["bob"])
    assert done.returncode == 0, done.stderr
    assert env.read_bytes() == png.read_bytes()  # same seed, same pixels
    done = cli(*common, "--token", "y" * 32, "--output-path", str(tmp_path / "no.png"))
    assert done.returncode == 2 and "UNAUTHENTICATED" in done.stderr, done.stderr
    done = cli(*common, "--output-path", str(tmp_path / "no.png"))
    assert done.returncode == 2 and "UNAUTHENTICATED" in done.stderr, done.stderr
    assert not (tmp_path / "no.png").exists()
    done = cli("models", "--server", secure_server.target, "--tls-ca", str(secure_server.pki["ca.pem"]), "--token", TOKENS["admin"])
    assert done.returncode == 0 and '"tiny-wan"' in done.stdout, done.stderr


# ---- isolation ----

def not_found_message(client: Client, job_id: str) -> str:
    return expect_error(grpc.StatusCode.NOT_FOUND, client.get, job_id).message


def test_another_principals_job_is_not_found(clients):
    alice, bob = clients["alice"], clients["bob"]
    job = alice.wait(alice.submit(**SMALL).id)
    assert job.state == pb.JOB_STATE_SUCCEEDED
    missing = uuid.uuid4().hex
    # bob sees alice's job exactly as a job that does not exist: same code, same message shape
    assert not_found_message(bob, job.id) == not_found_message(bob, missing).replace(missing, job.id)
    for rpc, call in every_rpc(bob, job.id).items():
        if rpc in ("GetJob", "StreamJobEvents", "CancelJob", "DownloadArtifact"):
            err = expect_error(grpc.StatusCode.NOT_FOUND, call)
            assert err.reason == "NOT_FOUND", rpc
    # admin sees everything; alice still has her artifact
    assert clients["admin"].get(job.id).id == job.id
    assert clients["admin"].download(job.id) == alice.download(job.id)


def test_another_principal_cannot_cancel_but_admin_can(clients):
    alice, bob, admin = clients["alice"], clients["bob"], clients["admin"]
    job = alice.submit(**LONG)
    wait_step(alice, job.id, 1)
    expect_error(grpc.StatusCode.NOT_FOUND, bob.cancel, job.id)
    assert alice.get(job.id).state == pb.JOB_STATE_RUNNING
    admin.cancel(job.id)
    assert alice.wait(job.id).state == pb.JOB_STATE_CANCELLED


def test_idempotency_keys_are_per_principal(clients):
    alice, bob = clients["alice"], clients["bob"]
    key = f"job-{uuid.uuid4().hex[:8]}"
    first = alice.submit(client_request_id=key, **{**SMALL, "prompt": "alice's secret prompt"})
    again = alice.submit(client_request_id=key, **SMALL)
    assert again.id == first.id
    other = bob.submit(client_request_id=key, **SMALL)
    assert other.id != first.id and other.params.prompt == SMALL["prompt"]
    assert bob.submit(client_request_id=key, **SMALL).id == other.id
    # Generate attaching by key: bob's stream is bob's job
    events = list(bob.generate(client_request_id=key, **SMALL))
    assert {e.job_id for e in events} == {other.id}
    assert alice.wait(first.id).state == pb.JOB_STATE_SUCCEEDED and bob.wait(other.id).state == pb.JOB_STATE_SUCCEEDED


def test_tokens_file_is_reloaded_when_it_changes(secure_server, clients):
    with secure_server.client(BOB_OLD) as old:
        assert old.list_models()
        carol_token = "carol-" + "e" * 26
        write_tokens(secure_server.tokens_file, {**TOKENS, "carol": carol_token})  # bob's old token revoked, carol added
        err = expect_error(grpc.StatusCode.UNAUTHENTICATED, old.list_models)
        assert err.reason == "INVALID_TOKEN"
    with secure_server.client(carol_token) as carol:
        assert carol.list_models()
    assert clients["bob"].list_models()  # bob's other token still works
    # a broken file keeps the tokens loaded before
    secure_server.tokens_file.write_text("carol\n")
    assert clients["alice"].list_models()


# ---- mutual TLS, and what serve refuses at start ----

def test_mutual_tls_needs_a_client_certificate_and_a_token(pki, tmp_path):
    tokens = tmp_path / "tokens"
    write_tokens(tokens, TOKENS)
    server = SecureServer(tmp_path, pki, "--tls-client-ca", str(pki["ca.pem"]), "--auth-tokens", str(tokens))
    try:
        cert = dict(certificate_chain=pki["client.pem"].read_bytes(), private_key=pki["client.key"].read_bytes())
        with server.client(TOKENS["alice"], wait_for_ready=False) as no_cert:  # fail at once, as above
            expect_error(grpc.StatusCode.UNAVAILABLE, no_cert.list_models)
        with server.client(**cert) as no_token:
            expect_error(grpc.StatusCode.UNAUTHENTICATED, no_token.list_models)
            assert no_token.health() == "NOT_SERVING"  # no worker: open, over mutual TLS
        with server.client(TOKENS["alice"], **cert) as alice:
            assert alice.list_models() == []
    finally:
        server.stop()
    assert server.proc.returncode == 0


@pytest.mark.parametrize("mode, flags, message", [
    (0o644, ["--auth-tokens", "{tokens}"], "others may read"),
    (0o600, ["--auth-tokens", "{tokens}", "--tls-cert", "{cert}"], "--tls-cert and --tls-key go together"),
    (0o600, ["--auth-tokens", "{missing}"], "No such file"),
])
def test_serve_refuses_unsafe_security_flags(pki, tmp_path, mode, flags, message):
    tokens = tmp_path / "tokens"
    write_tokens(tokens, TOKENS)
    tokens.chmod(mode)
    args = [f.format(tokens=tokens, cert=pki["server.pem"], missing=tmp_path / "missing") for f in flags]
    done = subprocess.run([sys.executable, "-m", "diffserve.client.cli", "serve", "--port", "0", "--state-dir", str(tmp_path / "state"), *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr, done.stderr
