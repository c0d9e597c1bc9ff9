"""bench/dit_forward.py --tiny runs every benchmarked model end to end on the CPU (tiny configs), so
the GPU benchmark does not rot between GPU sessions (parallel_step.py and profile_forward.py too): both sides get equal inputs and weights
(float32 outputs agree with the float32 reference) and every row has the keys results need."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODELS = {"wan-1.3b", "wan-14b", "flux.1-dev", "qwen-image", "hunyuan-video"}
KEYS = {"model", "shape", "card", "diffserve_ms", "diffusers_ms", "ratio", "tflops", "diffserve_err", "diffusers_err"}


@pytest.fixture
def bench(tmp_path, monkeypatch, capsys):
    """Runs bench/SCRIPT's main(args) in this process, as `python bench/SCRIPT` from the repo root would
    (bench/ first on sys.path, results under OUT=tmp_path), and returns what it printed. In-process:
    a script's own process would import torch, diffusers and transformers again (~8 s each on 2 cores)."""
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.syspath_prepend(str(ROOT / "bench"))

    def run(script: str, *args: str) -> str:
        capsys.readouterr()
        runpy.run_path(str(ROOT / "bench" / script), run_name="bench_script")["main"](["--tiny", *args])
        return capsys.readouterr().out

    return run


@pytest.mark.timeout(120)
def test_dit_forward_tiny_runs_every_model(tmp_path, bench):
    bench("dit_forward.py")
    (result,) = tmp_path.glob("*-cpu.json")
    rows = json.loads(result.read_text())
    assert {r["model"] for r in rows} == MODELS
    for row in rows:
        assert KEYS <= set(row), row
        assert row["diffserve_ms"] > 0 and row["diffusers_ms"] > 0
        # float32 on both sides: the same weights and inputs give the reference's output to rounding.
        assert float(row["diffserve_err"]) < 1e-5 and float(row["diffusers_err"]) < 1e-5, row


@pytest.mark.timeout(120)
def test_parallel_step_and_profile_scripts_run_tiny(tmp_path, bench):
    """bench/parallel_step.py (2 gloo ranks, --profile; its own process) and bench/profile_forward.py on
    tiny FLUX run and write the rows bench/NOTES.md reports (the sharded step's correctness: test_parallel.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, "bench/parallel_step.py", "--tiny", "--models", "flux.1-dev", "--gpus", "2", "--layouts",
                           "ulysses2", "--profile", "--cuda-graphs"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "[profile]" in proc.stdout
    assert "[profile]" in bench("profile_forward.py", "--models", "flux.1-dev")
    (parallel,) = tmp_path.glob("*-cpu-parallel-flux1-dev-graphs.json")
    (row,) = json.loads(parallel.read_text())
    assert row["layout"] == "ulysses2 +graphs" and row["graph_err"] == 0 and row["gpus"] == 2 and row["step_ms"] > 0 and row["profile"]["wall_ms"] > 0, row
    (profile,) = tmp_path.glob("*-cpu-profile.json")
    assert {r["side"] for r in json.loads(profile.read_text())} == {"ours eager", "diffusers eager"}


@pytest.mark.timeout(150)
def test_serve_load_tiny_runs_service_and_diffusers(tmp_path):
    """bench/serve_load.py --tiny: the mixed workload's first jobs through a real `diffserve serve`
    (CPU, tiny Wan) and then one at a time through diffusers' WanPipeline; both rows are written,
    every job is counted and the service / diffusers ratio is computed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, "bench/serve_load.py", "--tiny", "--workload", "mixed", "--max-batch-size", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=140)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (result,) = tmp_path.glob("*-cpu-serve_load-mixed.json")
    rows = json.loads(result.read_text())
    assert [r["side"] for r in rows] == ["diffserve", "diffusers"]
    keys = {"workload", "side", "model", "version", "card", "jobs", "jobs_per_min", "ratio", "wall_s", "latency_p50_s",
            "latency_p90_s", "latency_p99_s", "queue_wait_p50_s", "queue_wait_p90_s", "gpu_busy_pct", "per_job"}
    ours, theirs = rows
    for row in rows:
        assert keys <= set(row), row
        assert row["workload"] == "mixed" and row["jobs"] == len(row["per_job"]) == 4, row
        assert row["jobs_per_min"] > 0 and 0 < row["latency_p50_s"] <= row["latency_p90_s"] <= row["latency_p99_s"], row
        assert row["gpu_busy_pct"] is None  # no GPU: not sampled
        assert {(j["shape"], j["steps"]) for j in row["per_job"]} == {("32x32x1", 3), ("32x48x1", 2), ("32x32x1", 2), ("32x48x1", 3)}
    assert ours["version"] == "max-batch 2" and theirs["ratio"] is None
    assert ours["ratio"] == pytest.approx(ours["jobs_per_min"] / theirs["jobs_per_min"], rel=1e-2)
    # every job waited for nothing or something, and its latency covers its queue wait
    for job in ours["per_job"] + theirs["per_job"]:
        assert 0 <= job["queue_wait_s"] <= job["latency_s"], job
    assert max(j["mean_batch_jobs"] for j in ours["per_job"]) <= 2


def test_graphs_pay_tiny_times_every_shape_and_batch(tmp_path, bench):
    """bench/graphs_pay.py --tiny: one row per (shape, rows), eager and GraphedForward (eager on the CPU)."""
    bench("graphs_pay.py", "--rows", "1,2")
    (result,) = tmp_path.glob("*-cpu-graphs_pay.json")
    rows = json.loads(result.read_text())
    assert [(r["shape"], r["rows"]) for r in rows] == [("32x32x1", 1), ("32x32x1", 2), ("32x32x5", 1), ("32x32x5", 2)]
    assert all(r["eager_ms"] > 0 and r["graph_ms"] > 0 and r["tokens"] > 0 for r in rows)


@pytest.mark.timeout(120)
def test_fp8_forward_tiny_runs_wan_and_flux(tmp_path, bench):
    """bench/fp8_forward.py --tiny: the kernel checks agree with their references, the float32 rows
    equal the float32 reference, and the FP8 rows carry an error that is there but small."""
    printed = bench("fp8_forward.py")
    (result,) = tmp_path.glob("*-cpu-fp8_forward.json")
    rows = json.loads(result.read_text())
    checks = [r for r in rows if r["variant"] == "check"]
    assert {r["model"] for r in checks} == {"wan-1.3b", "flux.1-dev"}
    assert all(r["quantize_mismatches"] == 0 and float(r["gemm_rel_err"]) < 1e-5 for r in checks), checks
    assert all(r["heads_scales_equal"] and r["heads_mismatches"] == r["norm_fp8_far"] == r["gelu_fp8_far"] == 0 for r in checks), checks
    assert all(r[k] > 0 for r in checks for k in ("heads_ms", "heads_torch_per_tensor_ms", "norm_fp8_ms", "gelu_fp8_ms")), checks
    forwards = {(r["model"], r["variant"]): r for r in rows if r["variant"] != "check"}
    assert set(forwards) == {(m, v) for m in ("wan-1.3b", "flux.1-dev") for v in ("diffusers eager", "float32", "fp8")}
    for (model, variant), row in forwards.items():
        err = float(row["rel_err"])
        assert (0 < err < 0.05) if variant == "fp8" else err < 1e-5, row
        assert row["ms"] > 0 and row["speedup_vs_bf16"] > 0, row
    assert printed.count('{"model"') == len(rows)  # one JSON line per row


def test_lora_overhead_tiny_runs_and_its_rows_equal_merged_weights(tmp_path, bench):
    """bench/lora_overhead.py --tiny: the 4-adapter batched forward's rows equal each row run alone with
    its adapter merged into the weights (float32), and the row has what bench/NOTES.md reports."""
    bench("lora_overhead.py")
    (result,) = tmp_path.glob("*-cpu-lora.json")
    (row,) = json.loads(result.read_text())
    assert row["rows"] == row["adapters"] == 4 and min(row["plain_ms"], row["base_ms"], row["lora_ms"], row["lora_cold_ms"], row["shared_ms"]) > 0, row
    # Two GEMMs per targeted linear (2 blocks x 10 linears), whatever the adapter mix.
    assert row["lora_ops"] == row["shared_ops"] == row["base_ops"] + 2 * 20, row
    assert float(row["err_vs_merged"]) < 1e-5, row


@pytest.mark.timeout(120)
def test_packed_forward_tiny_times_every_variant_and_packed_equals_unpacked(tmp_path, bench):
    """bench/packed_forward.py --tiny: both scenarios, the four variants each, and every packed
    request equal to its unpacked forward (float32)."""
    bench("packed_forward.py")
    (result,) = tmp_path.glob("*-cpu-packed_forward.json")
    rows = json.loads(result.read_text())
    variants = ["unpacked", "unpacked graphs", "packed", "packed, loop attention"]
    assert [(r["scenario"], r["variant"]) for r in rows] == [(s, v) for s in "ab" for v in variants]
    assert [r["forwards"] for r in rows] == [2, 2, 1, 1, 4, 4, 1, 1]
    for row in rows:
        assert row["ms"] > 0 and row["ratio"] > 0 and float(row["rel_err"]) < 1e-5, row


@pytest.mark.timeout(120)
def test_cache_skips_counts_the_computed_row_steps(bench):
    """bench/cache_skips.py (a policy's computed share, printed beside demo/quality.py's scores): 2 prompts x
    2 rows (CFG) x 4 steps; TaylorSeer at interval 2 computes half of them after one warm-up step, three
    quarters after diffusers' three (the same decisions as diffusers' hook: test_taylorseer_cache.py)."""
    out = bench("cache_skips.py", "--cache", "taylorseer:interval=2:warmup_steps=1", "--cache", "taylorseer:interval=2")
    assert "taylorseer:interval=2:warmup_steps=1: 8 of 16 row-steps computed (50%)" in out, out
    assert "taylorseer:interval=2: 12 of 16 row-steps computed (75%)" in out, out
