# One image for both the scheduler (`diffserve serve`) and the worker (`diffserve worker`); its entry
# points are the `diffserve` command line, nothing else.
# Never built where it was written (no Docker daemon there). What was checked: docker-compose.yml
# validates, and tests/service/test_compose.py runs the compose services' command lines as plain
# processes and checks this file's CMD, EXPOSE, HEALTHCHECK and volume folders against them.
# Pinned by exact version (Python 3.11.13, Debian 12 bookworm); add @sha256:... to pin the bytes.
FROM python:3.11.13-slim-bookworm

# torch is pinned to 2.13.0 by pyproject.toml's [worker] extra. With TORCH_INDEX_URL empty, pip
# takes it from PyPI, where the linux/amd64 wheel is a CUDA build. Set TORCH_INDEX_URL to pick a
# build explicitly, e.g. https://download.pytorch.org/whl/cu128 (a CUDA version) or
# https://download.pytorch.org/whl/cpu (CPU only, much smaller image).
# GPU use also needs the NVIDIA driver and container toolkit on the host.
ARG TORCH_INDEX_URL=""

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# torch first, in its own layer, so code changes do not download it again.
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install "torch==2.13.0" --index-url "$TORCH_INDEX_URL"; \
    fi

COPY . .
RUN pip install -e ".[worker,s3]"

# Runs as an unprivileged user. /state (CURVE keys; 0700), /outputs (artifacts) and /worker-keys
# (a worker's keypair) are owned by it, so named volumes mounted there start with that owner.
RUN useradd --create-home --uid 10001 --user-group diffserve \
    && mkdir -p /state /outputs /worker-keys \
    && chown diffserve:diffserve /state /outputs /worker-keys \
    && chmod 700 /state /worker-keys
USER diffserve
ENV HOME=/home/diffserve

# 50051: gRPC, 8000: HTTP (OpenAI-compatible API, /health, /metrics); both for clients, with the
# same bearer tokens. 5555: ZeroMQ (workers, CURVE-authenticated) stays on the internal network in
# docker-compose.yml and is not published.
EXPOSE 50051 8000
# gRPC and HTTP need bearer tokens (mount the token file, see docker-compose.yml); workers need a
# CURVE key listed in /state (`diffserve keys`).
# SIGTERM drains (docs/cli.md, "Signals"): give `docker stop` more time than --drain-timeout
# (`docker run --init --stop-timeout 75 ...`; docker-compose.yml sets init and stop_grace_period).
STOPSIGNAL SIGTERM
# Healthy when gRPC health says SERVING (a worker group has loaded its model) and GET /health on the
# HTTP port answers 200 (deploy/healthcheck.py; neither needs a token). Meant for `serve` with the
# default CMD's ports: run worker containers with --no-healthcheck (docker-compose.yml disables it
# for them), and a scheduler on other ports or with TLS needs its own check.
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "/app/deploy/healthcheck.py", "--grpc", "127.0.0.1:50051", "--http", "http://127.0.0.1:8000/health"]
CMD ["diffserve", "serve", "--host", "0.0.0.0", "--port", "50051", "--http-host", "0.0.0.0", "--http-port", "8000", \
     "--worker-bind", "tcp://0.0.0.0:5555", "--output-dir", "/outputs", "--state-dir", "/state", \
     "--auth-tokens", "/run/secrets/diffserve-tokens"]
