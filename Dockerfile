# One image for both the scheduler (`diffserve serve`) and the worker (`diffserve worker`).
# First version, untested: no Docker daemon ran where it was written.
FROM python:3.11-slim

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

# 50051: gRPC (clients; published). 5555: ZeroMQ (workers, CURVE-authenticated) stays on the
# internal network in docker-compose.yml and is not published.
EXPOSE 50051
# gRPC needs bearer tokens (mount the token file, see docker-compose.yml); workers need a CURVE key
# listed in /state (`diffserve keys`).
# SIGTERM drains (docs/cli.md, "Signals"): give `docker stop` more time than --drain-timeout
# (`docker run --init --stop-timeout 75 ...`; docker-compose.yml sets init and stop_grace_period).
STOPSIGNAL SIGTERM
CMD ["diffserve", "serve", "--host", "0.0.0.0", "--port", "50051", "--worker-bind", "tcp://0.0.0.0:5555", \
     "--output-dir", "/outputs", "--state-dir", "/state", "--auth-tokens", "/run/secrets/diffserve-tokens"]
