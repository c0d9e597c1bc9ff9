#!/usr/bin/env bash
# Runs one GPU benchmark script on the device machine:
#   bash bench/gpu.sh [SCRIPT.py] [ARGS...]      SCRIPT: dit_forward.py (default), end_to_end.py, serve_load.py, attention_check.py
#   e.g. bash bench/gpu.sh dit_forward.py --models wan-14b,hunyuan-video
#        bash bench/gpu.sh end_to_end.py --compile
# Before the call, on the dev machine, put the wheels the image lacks into .whl/ (see bench/NOTES.md):
#   ../shared/gpu/wheels.sh   (diffusers, pyzmq, fa3-fwd) and, for end_to_end.py / serve_load.py, the gRPC health /
#   reflection and googleapis-common-protos wheels; then run this with carry [".whl"].
# Results land in $OUT (JSON) and the tables print last.
set -euo pipefail
script=dit_forward.py
if [[ $# -gt 0 && $1 == *.py ]]; then script=$1; shift; fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/bench
mkdir -p /tmp/pkg/diffserve && for d in scheduler worker kernels client demo; do ln -sfn "$PWD/$d" /tmp/pkg/diffserve/$d; done
ln -sfn "$PWD/protos/diffserve/v1" /tmp/pkg/diffserve/v1
ln -sfn "$PWD/protos/diffserve/worker/v1" "$PWD/worker/v1" 2>/dev/null || true
export PYTHONPATH=$PYTHONPATH:/tmp/pkg
if [[ $script == end_to_end.py || $script == serve_load.py ]]; then  # the service needs these; fail now rather than after the checkpoint
  python3 -c "import zmq, grpc_health.v1.health, grpc_reflection.v1alpha.reflection, google.rpc.status_pb2, grpc_status.rpc_status, prometheus_client" \
    || { echo "missing wheels for the service: see bench/NOTES.md (how to reproduce)"; exit 2; }
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv
python3 "bench/$script" "$@"
