"""docker-compose.yml, the Dockerfile and deploy/, checked without a Docker daemon (none exists here
or in CI: no image is built, no container runs).

(a) `docker-compose config` (Debian's docker-compose v1; .ci/run installs it) validates the file,
    and refuses it without the MinIO credentials (there is no default password).
(b) The file's wiring, read with PyYAML: the worker's --scheduler is the scheduler's --worker-bind
    (service name, port, a shared network); the published ports are the ones `serve` listens on;
    every path a diffserve command names is inside a volume or secret of that service; the bucket
    the mc one-shot makes is the one --artifact-store names, at the endpoint the scheduler uses;
    Prometheus scrapes `scheduler:<--http-port>/metrics`; image tags are pinned; the Dockerfile's
    CMD, EXPOSE, HEALTHCHECK, user and volume folders agree with the compose file.
(c) The compose command lines RUN as real processes on loopback: the `keys` one-shot (twice: it is
    idempotent), the scheduler, a worker on the tiny Wan checkpoint, and the scheduler's
    healthcheck; a job completes and its artifact lands in the bucket. The substitutions, and
    nothing else, are (see Wiring.arg):
      - `diffserve` is this Python's `-m diffserve.client.cli` (a shim first on PATH; the image's
        console script is that entry point); `python` in the healthcheck is this Python, and the
        image's WORKDIR (/app, a copy of the repository) is this checkout;
      - each mount target is a folder of tmp_path: one per named volume, shared by every service
        that mounts it (as docker does); `./models` is the tiny checkpoint's folder and
        DIFFSERVE_MODEL its name; the `diffserve-tokens` secret is a tokens file of the test;
      - service names and 0.0.0.0 become 127.0.0.1, and every container port a free loopback port,
        one mapping for all services (a port two services disagree on stays different, and the
        worker never connects);
      - MinIO is moto's S3 server (tests/service/test_artifact_store_s3.py uses it too) on a free
        port, and the bucket is created with boto3 in place of the mc one-shot (whose command is
        only read); MINIO_ROOT_USER / MINIO_ROOT_PASSWORD are dummies that moto accepts;
      - `--http-host` / `--http-port` (and the healthcheck's `--http`) are dropped when this
        checkout's `serve --help` lacks them (the HTTP API is merged separately); with them, GET
        /health is checked on that port (503, then 200), and /metrics as Prometheus scrapes it (no
        token) where this checkout has the metrics (diffserve.scheduler.metrics).
    The worker's own flags are used as written: --device defaults to auto, the CPU here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from jobs_util import free_port

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
IMAGE = "diffserve:latest"  # the services built from the Dockerfile
MODEL = "tiny-wan"  # the tiny checkpoint's folder name
TOKENS = {"alice": "alice-" + "a" * 26}
COMPOSE_ENV = {"MINIO_ROOT_USER": "testing", "MINIO_ROOT_PASSWORD": "testing-secret", "DIFFSERVE_MODEL": MODEL}
# Keeps boto3 (the scheduler's S3 client) off real accounts and config files.
AWS_ISOLATION = {"AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true"}


# ---- reading the files ----

VARIABLE = re.compile(r"\$(?:(\$)|\{(\w+)(?::?([-?])([^}]*))?\}|(\w+))")


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution ($$, $VAR, ${VAR}, ${VAR:-default}, ${VAR:?error})."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        if m.group(1):
            return "$"
        name, op, arg = m.group(2) or m.group(5), m.group(3), m.group(4)
        got = env.get(name, "")
        if op == "?" and not got:
            raise KeyError(f"{name}: {arg}")
        return got or (arg if op == "-" else "")

    return VARIABLE.sub(one, value)


def load_compose(env: dict[str, str] = COMPOSE_ENV) -> dict:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), env)


def dockerfile() -> dict[str, list[str]]:
    """Instruction -> its arguments, one entry per occurrence (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.setdefault(word.upper(), []).append(rest.strip())
    return out


def flag(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def host_port(address: str) -> tuple[str, int]:
    m = re.fullmatch(r"(?:\w+://)?([\w.-]+):(\d+)/?", address)
    assert m, address
    return m.group(1), int(m.group(2))


def container_ports(service: dict) -> set[int]:
    """Container side of each published port ("HOST:CONTAINER" or "IP:HOST:CONTAINER")."""
    return {int(str(p).split(":")[-1].split("/")[0]) for p in service.get("ports", [])}


def mounts(service: dict) -> dict[str, tuple[str, str]]:
    """Mount target -> (kind, source): ("volume", name), ("bind", ./path) or ("secret", name)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        out[target] = ("bind" if source.startswith((".", "/")) else "volume", source)
    for secret in service.get("secrets", []):
        name = secret if isinstance(secret, str) else secret["source"]
        out[f"/run/secrets/{name}"] = ("secret", name)
    return out


ABSOLUTE = re.compile(r"(?<![\w.:/-])/[\w./-]+")


def paths_in(command) -> list[str]:
    words = command if isinstance(command, list) else [command]
    return [p for word in words for p in ABSOLUTE.findall(word) if p != "/dev/null"]


def under(path: str, targets) -> str | None:
    return next((t for t in targets if path == t or path.startswith(t.rstrip("/") + "/")), None)


def serve_has_http_flags() -> bool:
    done = subprocess.run([sys.executable, "-m", "diffserve.client.cli", "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return "--http-port" in done.stdout


# ---- (a) docker-compose config ----

def test_docker_compose_config_validates(tmp_path):
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed here (.ci/run installs Debian's package in CI)")
    base = {k: v for k, v in os.environ.items() if k not in COMPOSE_ENV}
    empty = tmp_path / "empty.env"  # not a .env a developer may keep beside the file
    empty.write_text("")
    cmd = [binary, "--env-file", str(empty), "-f", str(COMPOSE), "config"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**base, **COMPOSE_ENV}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert set(resolved["services"]) == set(load_compose()["services"])
    # No default for MinIO's root password: without it, compose refuses the file and says why.
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=base, cwd=tmp_path)
    assert done.returncode != 0 and "MINIO_ROOT_" in done.stderr, done.stderr


# ---- (b) the wiring, statically ----

def test_ports_addresses_networks_and_volumes_agree():
    compose = load_compose()
    services, networks = compose["services"], compose["networks"]
    scheduler, worker, keys = services["scheduler"], services["worker"], services["keys"]
    serve, work = scheduler["command"], worker["command"]
    assert serve[:2] == ["diffserve", "serve"] and work[:2] == ["diffserve", "worker"] and "--model-path" not in serve

    # the worker reaches the scheduler's worker endpoint: service name, port, a network they share
    _, bind_port = host_port(flag(serve, "--worker-bind"))
    host, port = host_port(flag(work, "--scheduler"))
    assert host == "scheduler" and port == bind_port
    assert set(worker["networks"]) == {"workers"} and "workers" in scheduler["networks"]
    assert networks["workers"].get("internal") is True
    # published: gRPC and HTTP, which serve listens on; never the worker endpoint
    http_port = int(flag(serve, "--http-port"))
    assert container_ports(scheduler) == {int(flag(serve, "--port")), http_port} and bind_port not in container_ports(scheduler)
    assert flag(serve, "--host") == flag(serve, "--http-host") == "0.0.0.0"

    # every path a diffserve command names is in one of that service's volumes or secrets
    for name in ("keys", "scheduler", "worker"):
        targets = mounts(services[name])
        for path in paths_in(services[name]["command"]):
            assert under(path, targets), f"{name}: {path} is in no volume or secret of the service"
    # ...and the same volume where two services must share files
    def source(service, path):
        return mounts(service)[under(path, mounts(service))]
    assert source(keys, flag(serve, "--state-dir")) == source(scheduler, flag(serve, "--state-dir")) == ("volume", "state")
    for key in (flag(work, "--key-file"), flag(work, "--scheduler-key")):
        assert source(worker, key) == ("volume", "worker-keys") and key in keys["command"][0]
    assert all(v.endswith(":ro") for v in worker["volumes"]) and source(worker, flag(work, "--model-path")) == ("bind", "./models")
    assert keys["network_mode"] == "none" and source(scheduler, flag(serve, "--auth-tokens")) == ("secret", "diffserve-tokens")
    assert compose["secrets"]["diffserve-tokens"]["file"] == "./tokens.txt"

    # artifacts: the bucket the mc one-shot makes, at the endpoint the scheduler names, same credentials
    store = flag(serve, "--artifact-store")
    bucket = re.fullmatch(r"s3://([\w.-]+)(/.*)?", store).group(1)
    endpoint = flag(serve, "--s3-endpoint-url")
    setup = services["minio-setup"]["command"][0]
    assert re.search(rf"mc alias set (\w+) {re.escape(endpoint)} .*mc mb --ignore-existing \1/{re.escape(bucket)}$", setup), setup
    assert host_port(endpoint)[0] == "minio" and {"storage"} <= set(scheduler["networks"]) & set(services["minio"]["networks"])
    assert networks["storage"].get("internal") is True and "ports" not in services["minio"]
    minio_env = services["minio"]["environment"]
    assert scheduler["environment"]["AWS_ACCESS_KEY_ID"] == minio_env["MINIO_ROOT_USER"]
    assert scheduler["environment"]["AWS_SECRET_ACCESS_KEY"] == minio_env["MINIO_ROOT_PASSWORD"]
    assert services["minio-setup"]["environment"] == minio_env
    assert scheduler["depends_on"]["minio-setup"]["condition"] == "service_completed_successfully"

    # Prometheus scrapes the scheduler's /metrics on the HTTP port, over a network they share
    prometheus = services["prometheus"]
    config_file = flag([a for arg in prometheus["command"] for a in arg.split("=", 1)], "--config.file")
    kind, host_file = mounts(prometheus)[config_file]
    assert kind == "bind" and (REPO / host_file).is_file()
    scrape = yaml.safe_load((REPO / host_file).read_text())["scrape_configs"]
    assert [(job.get("metrics_path", "/metrics"), job["static_configs"][0]["targets"]) for job in scrape] == [("/metrics", [f"scheduler:{http_port}"])]
    assert set(prometheus["networks"]) & set(scheduler["networks"])
    assert [str(p) for p in prometheus["ports"]] == ["127.0.0.1:9090:9090"]  # no auth: this host only

    # the healthcheck probes the ports serve listens on
    check = scheduler["healthcheck"]["test"]
    assert check[0] == "CMD" and flag(check, "--grpc") == f"127.0.0.1:{flag(serve, '--port')}"
    assert flag(check, "--http") == f"http://127.0.0.1:{http_port}/health"

    # images: ours built here, every other one pinned to a release (never `latest` or a bare name)
    for name, service in services.items():
        if "build" in service:
            assert service["image"] == IMAGE, name
        else:
            tag = service["image"].rpartition(":")[2]
            assert ":" in service["image"] and tag != "latest" and re.search(r"\d", tag), f"{name}: {service['image']} is not pinned"


def test_dockerfile_agrees_with_the_compose_file():
    compose = load_compose()
    scheduler = compose["services"]["scheduler"]
    serve = scheduler["command"]
    d = dockerfile()
    (base,) = d["FROM"]
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-bookworm", base), f"FROM {base}: not pinned to an exact version"
    assert d["USER"] == ["diffserve"] and "ENTRYPOINT" not in d
    (cmd,) = [json.loads(c) for c in d["CMD"]]
    assert cmd[:2] == ["diffserve", "serve"]  # the entry point is the CLI
    for name in ("--port", "--http-port", "--worker-bind", "--state-dir", "--auth-tokens", "--host", "--http-host"):
        assert flag(cmd, name) == flag(serve, name), name
    assert {int(p) for e in d["EXPOSE"] for p in e.split()} == container_ports(scheduler)
    (health,) = d["HEALTHCHECK"]
    assert json.loads(health.split(" CMD ", 1)[1]) == scheduler["healthcheck"]["test"][1:]
    # the healthcheck script is in the image: WORKDIR /app holds the repository (COPY . .), deploy/ not ignored
    (workdir,) = d["WORKDIR"]
    script = Path(flag(["x", *scheduler["healthcheck"]["test"][1:]], "python"))
    assert (REPO / script.relative_to(workdir)).is_file()
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert not [p for p in ignored if script.relative_to(workdir).parts[0].startswith(p.strip("/*"))], ignored
    assert {"tokens.txt", ".env"} <= set(ignored)  # secrets never go into the image
    # every named volume a diffserve service mounts is a folder the image makes and gives its user
    # (docker copies its owner to a new named volume: the unprivileged user can write there)
    made = next(r for r in d["RUN"] if "mkdir" in r and "chown" in r)
    for name, service in compose["services"].items():
        if service.get("image") == IMAGE:
            for target, (kind, _) in mounts(service).items():
                if kind == "volume":
                    assert re.search(rf"mkdir -p [^&]*{re.escape(target)}\b", made) and re.search(rf"chown [^&]*{re.escape(target)}\b", made), (name, target)


# ---- (c) the command lines, run ----

class Wiring:
    """Turns a compose service's command into this machine's: the substitutions in the module doc."""

    def __init__(self, compose: dict, root: Path, model_dir: Path, tokens: Path, ports: dict[int, int], http: bool):
        self.compose, self.root, self.ports, self.http = compose, root, ports, http
        self.binds = {"./models": model_dir}
        self.secrets = {"diffserve-tokens": tokens}
        self.names = "|".join(map(re.escape, sorted(compose["services"], key=len, reverse=True)))
        bin_dir = root / "bin"
        bin_dir.mkdir()
        shim = bin_dir / "diffserve"
        shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m diffserve.client.cli "$@"\n')
        shim.chmod(0o755)
        self.path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"

    def host_dir(self, kind: str, source: str) -> Path:
        if kind == "volume":
            folder = self.root / "volumes" / source
            if not folder.exists():
                folder.mkdir(parents=True)
                folder.chmod(0o700)  # as the image makes /state and /worker-keys
            return folder
        return self.binds[source] if kind == "bind" else self.secrets[source]

    def port(self, container_port: str) -> str:
        return str(self.ports.setdefault(int(container_port), free_port()))

    def arg(self, text: str, service: dict) -> str:
        # mount targets -> folders of tmp_path (longest first, whole path components only)
        for target, (kind, source) in sorted(mounts(service).items(), key=lambda m: -len(m[0])):
            text = re.sub(rf"(?<![\w./-]){re.escape(target)}(?=/|\s|;|$)", lambda _: str(self.host_dir(kind, source)), text)
        # service names and 0.0.0.0 -> loopback; container ports -> free ports
        text = re.sub(rf"(\w+://)?(?<![\w.-])({self.names}|0\.0\.0\.0|127\.0\.0\.1):(\d+)", lambda m: f"{m.group(1) or ''}127.0.0.1:{self.port(m.group(3))}", text)
        return "127.0.0.1" if text == "0.0.0.0" else text

    def argv(self, service_name: str) -> list[str]:
        service = self.compose["services"][service_name]
        command = service["command"]
        argv = [*service.get("entrypoint", []), *command]
        out, i = [], 0
        while i < len(argv):
            word = argv[i]
            if not self.http and word in ("--http-host", "--http-port"):
                i += 2
            elif word in ("--port", "--http-port"):
                out += [word, self.port(argv[i + 1])]
                i += 2
            else:
                out.append(self.arg(word, service))
                i += 1
        return out

    def healthcheck(self, service_name: str) -> list[str]:
        test = self.compose["services"][service_name]["healthcheck"]["test"]
        assert test[0] == "CMD" and test[1] == "python"
        argv = [sys.executable, *test[2:]]
        if not self.http:
            at = argv.index("--http")
            del argv[at:at + 2]
        (workdir,) = dockerfile()["WORKDIR"]
        argv = [str(REPO / Path(a).relative_to(workdir)) if a.startswith(workdir + "/") else a for a in argv]
        return [self.arg(a, {}) if i else a for i, a in enumerate(argv)]

    def env(self, service_name: str) -> dict[str, str]:
        service = self.compose["services"][service_name]
        return {**os.environ, **{k: str(v) for k, v in service.get("environment", {}).items()}, **AWS_ISOLATION,
                "PATH": self.path, "OMP_NUM_THREADS": "1"}


def stop(proc: subprocess.Popen, sig=signal.SIGTERM, timeout_s: float = 30) -> int:
    """SIGTERM (as `docker compose stop`), then SIGKILL to the process group past timeout_s."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def wait_health(check: list[str], env: dict, ready, timeout_s: float, procs=()) -> subprocess.CompletedProcess:
    """Runs the healthcheck until ready(result) (each run bounded; the processes must stay up)."""
    deadline = time.monotonic() + timeout_s
    while True:
        done = subprocess.run(check, capture_output=True, text=True, timeout=30, env=env)
        if ready(done):
            return done
        for proc in procs:
            assert proc.poll() is None, f"{proc.args[:3]} exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"healthcheck: rc {done.returncode}, {done.stderr.strip()}"
        time.sleep(0.3)


@pytest.fixture
def s3_server():
    """moto's S3 server on loopback (a free port): the MinIO service's stand-in."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        yield "http://%s:%d" % server.get_host_and_port()
    finally:
        server.stop()


def test_compose_command_lines_run_as_processes(tiny_wan, s3_server, tmp_path):
    import boto3
    import zmq.auth

    from diffserve.client import Client
    from diffserve.v1 import generation_pb2 as pb

    http = serve_has_http_flags()
    compose = load_compose()
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("".join(f"{p} {t}\n" for p, t in TOKENS.items()))
    tokens.chmod(0o600)
    assert COMPOSE_ENV["DIFFSERVE_MODEL"] == tiny_wan.name
    ports = {host_port(flag(compose["services"]["scheduler"]["command"], "--s3-endpoint-url"))[1]: host_port(s3_server)[1]}  # minio:9000 -> moto
    wiring = Wiring(compose, tmp_path, tiny_wan.parent, tokens, ports, http)

    # minio-setup's work, with boto3: the bucket its command names (test (b) ties it to --artifact-store)
    bucket = compose["services"]["minio-setup"]["command"][0].rsplit("/", 1)[1]
    sched_env = wiring.env("scheduler")
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id=sched_env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=sched_env["AWS_SECRET_ACCESS_KEY"])
    s3.create_bucket(Bucket=bucket)

    # keys: a one-shot, idempotent (a second `up` keeps the worker's key)
    keys = wiring.argv("keys")
    assert keys[:2] == ["sh", "-c"]
    worker_key = tmp_path / "volumes" / "worker-keys" / "worker.key_secret"
    made = []
    for _run in range(2):
        done = subprocess.run(keys, capture_output=True, text=True, timeout=120, env=wiring.env("keys"))
        assert done.returncode == 0, done.stderr
        made.append(worker_key.read_bytes())
    assert made[0] == made[1]
    state = tmp_path / "volumes" / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700

    serve, work = wiring.argv("scheduler"), wiring.argv("worker")
    check = wiring.healthcheck("scheduler")
    assert flag(serve, "--worker-bind") == flag(work, "--scheduler")  # after the rewrite too
    assert Path(flag(work, "--model-path")) == tiny_wan
    assert flag(work, "--key-file").startswith(str(tmp_path / "volumes" / "worker-keys"))
    # the worker's copy of the scheduler's public key is the scheduler's own
    assert zmq.auth.load_certificate(flag(work, "--scheduler-key"))[0] == zmq.auth.load_certificate(str(state / "keys" / "scheduler.key"))[0]

    procs: list[subprocess.Popen] = []
    try:
        procs.append(subprocess.Popen(serve, env=sched_env, start_new_session=True))
        # up, but no worker yet: unhealthy, and says why
        answering = lambda done: "NOT_SERVING" in done.stderr and (not http or "HTTP 503" in done.stderr)  # noqa: E731
        assert wait_health(check, sched_env, answering, 60, procs).returncode == 1
        procs.append(subprocess.Popen(work, env=wiring.env("worker"), start_new_session=True))
        wait_health(check, sched_env, lambda done: done.returncode == 0, 120, procs)

        grpc_target = f"127.0.0.1:{flag(serve, '--port')}"
        with Client(grpc_target, token=TOKENS["alice"]) as alice:
            job = alice.wait(alice.submit(prompt="a fox in a container", model=MODEL, height=32, width=32, num_frames=1,
                                          num_inference_steps=2, output_format="png", seed=3).id)
            assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
            data = alice.download(job.id)
        assert data.startswith(b"\x89PNG")
        # the artifact is in the bucket, under --artifact-store's prefix; the job store in the state volume
        prefix = flag(compose["services"]["scheduler"]["command"], "--artifact-store").split("/", 3)[3:]
        key = "/".join([*prefix, job.artifact.file_name])
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == data
        assert (state / "jobs.sqlite3").is_file()

        if http and importlib.util.find_spec("diffserve.scheduler.metrics"):
            # what Prometheus scrapes (deploy/prometheus.yml, checked against the compose file above): no token
            url = f"http://127.0.0.1:{flag(serve, '--http-port')}/metrics"
            with urllib.request.urlopen(url, timeout=10) as reply:
                assert reply.status == 200 and b"diffserve_" in reply.read()

        # `docker compose stop`: the worker first (SIGTERM: Goodbye, exit 0), then the scheduler (drains, exit 0)
        assert stop(procs[1]) == 0
        assert stop(procs[0], timeout_s=60) == 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
