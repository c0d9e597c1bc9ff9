#!/usr/bin/env bash
# Runs the GPU benchmarks on the device machine. Before the call, on the dev machine:
#   ../shared/gpu/wheels.sh          (downloads diffusers, pyzmq, fa3-fwd wheels into .whl/)
# then run this with carry [".whl"]. Results land in $OUT (JSON) and the tables print last.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/bench
mkdir -p /tmp/pkg/diffserve && for d in scheduler worker kernels client; do ln -sfn "$PWD/$d" /tmp/pkg/diffserve/$d; done
ln -sfn "$PWD/protos/diffserve/v1" /tmp/pkg/diffserve/v1
ln -sfn "$PWD/protos/diffserve/worker/v1" "$PWD/worker/v1" 2>/dev/null || true
export PYTHONPATH=$PYTHONPATH:/tmp/pkg
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv
python3 bench/attention_check.py
python3 bench/dit_forward.py "$@"
