"""bench/dit_forward.py --tiny runs every benchmarked model end to end on the CPU (tiny configs), so
the GPU benchmark does not rot between GPU sessions: both sides get equal inputs and weights
(float32 outputs agree with the float32 reference) and every row has the keys results need."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"wan-1.3b", "wan-14b", "flux.1-dev", "qwen-image", "hunyuan-video"}
KEYS = {"model", "shape", "card", "diffserve_ms", "diffusers_ms", "ratio", "tflops", "diffserve_err", "diffusers_err"}


@pytest.mark.timeout(120)
def test_dit_forward_tiny_runs_every_model(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, "bench/dit_forward.py", "--tiny"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (result,) = tmp_path.glob("*-cpu.json")
    rows = json.loads(result.read_text())
    assert {r["model"] for r in rows} == MODELS
    for row in rows:
        assert KEYS <= set(row), row
        assert row["diffserve_ms"] > 0 and row["diffusers_ms"] > 0
        # float32 on both sides: the same weights and inputs give the reference's output to rounding.
        assert float(row["diffserve_err"]) < 1e-5 and float(row["diffusers_err"]) < 1e-5, row
