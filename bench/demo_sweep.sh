#!/usr/bin/env bash
# Trains several demo-model variants at once on the GPU machine (issue 16's recipe search):
#   bash bench/demo_sweep.sh NAME "TRAIN ARGS" [NAME "TRAIN ARGS" ...]
# Each runs `python -m diffserve.demo.train $OUT/NAME --device cuda ARGS`; logs in $OUT/NAME.log.
# SHARED_VAE="VAE ARGS" first trains one VAE (`--vae-only VAE ARGS`, into $OUT/vae) that every variant
# then reuses (--vae-from): the variants differ in the DiT only. VAE_FROM=DIR reuses a VAE brought along.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
mkdir -p /tmp/pkg/diffserve && for d in scheduler worker kernels client demo; do ln -sfn "$PWD/$d" /tmp/pkg/diffserve/$d; done
export PYTHONPATH=/tmp/site:/tmp/pkg
vae_from=()
if [[ -n "${SHARED_VAE:-}" ]]; then
  timeout "${VAE_TIMEOUT:-300}" python3 -m diffserve.demo.train "$OUT/vae" --device cuda --threads 4 --vae-only $SHARED_VAE > "$OUT/vae.log" 2>&1
  grep -E "read back|Error" "$OUT/vae.log" | tail -2
  vae_from=(--vae-from "$OUT/vae")
elif [[ -n "${VAE_FROM:-}" ]]; then
  vae_from=(--vae-from "$VAE_FROM")
fi
pids=()
while [[ $# -ge 2 ]]; do
  name=$1; args=$2; shift 2
  timeout "${VARIANT_TIMEOUT:-3000}" python3 -m diffserve.demo.train "$OUT/$name" --device cuda --threads 2 "${vae_from[@]}" $args > "$OUT/$name.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || true; done
for f in "$OUT"/*.log; do echo "== $f"; grep -E "read back|Error|error" "$f" | tail -3; done
# Each variant comes back as one archive (the device returns few files): OUT/NAME.tar.gz
for d in "$OUT"/*/; do n=$(basename "$d"); tar -czf "$OUT/$n.tar.gz" -C "$OUT" "$n" && rm -rf "$d"; done
