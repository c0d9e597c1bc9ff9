"""A fixed, reproducible load through the real service, against the same jobs one at a time through
diffusers' own WanPipeline (issue 15).

    python bench/serve_load.py [--workload mixed|same-shape|solo|arrivals] [--max-batch-size 8] [--serve-arg=--cuda-graphs]
                               [--checkpoint DIR] [--skip-diffusers]          (GPU; writes $OUT/<date>-<card>-serve_load-<workload>.json)
    python bench/serve_load.py --tiny [--workload ...]                       (CPU: tiny checkpoint, 32x32 / 32x48, 2-3 steps)

Workloads (every arrival, shape, step count and seed is in WORKLOADS below; Wan2.1-T2V-1.3B, one frame,
CFG with guidance 5.0, the empty negative prompt, each job its own prompt (Spec.prompt)):
- mixed: 16 jobs over 7.5 s, half 480x832 and half 720x1280 images, 20/30/40/50 steps (each twice per shape);
- same-shape: 16 480x832 images submitted at once, 20 or 30 steps;
- solo: 4 480x832 images, 50 steps, each submitted when the previous one has completed;
- arrivals: 4 480x832 images (60 steps) at once, then two 480x832x33 videos (4 steps) at 0.3 and 0.8 s: the
  stall their stages cause, as the longest gap between two consecutive steps of any job (max_step_gap_s).

The service side starts `diffserve serve` on the checkpoint (bench/service.py; warm-up at every shape of the
workload, --max-batch-size N, --max-resident max(8, N), plus every --serve-arg), runs an untimed warm pass
(the workload's jobs with 2 steps each, all at once: kernels, batch sizes and CUDA graphs meet their shapes
before the timed run), then submits the jobs with the asyncio gRPC client at their arrival offsets and follows
each job's events. Per job: latency = completed event time - the job's create_time (scheduler clock, submit ->
completed); queue wait = first stage_started (encode) - create_time; client latency = the client's clock
from the SubmitJob call to the completed event. jobs/min = jobs x 60 / (last completed event received - first
submit), client clock. Percentiles: numpy's linear interpolation (with 16 jobs, p99 is close to the maximum).
GPU busy % = the mean of NVML's utilization.gpu sampled every 100 ms (`nvidia-smi -lms 100`, else
torch.cuda.utilization) over the same window: the share of NVML's sample period (1/6 s to 1 s, by card)
in which any kernel ran; a single small kernel counts as busy, so it is an upper bound of how well the GPU
is used, not SM occupancy.

The diffusers side (after the server has stopped) loads the same folder as the Wan2.1 model card does
(VAE float32, the rest bf16, on cuda; float32 on the CPU with --tiny), runs one untimed 2-step job per
shape, then the same jobs one after another (same prompt, empty negative prompt, size, steps, guidance;
the seed into a torch.Generator; output_type "np", saved as .npy as the service saves its artifact),
timing each (run_s). They are then laid on the workload's arrivals as one user running them one at a time
would: job i starts at max(its arrival, job i-1's end) (solo: at job i-1's end); latency = end - arrival,
queue wait = start - arrival, jobs/min = jobs x 60 / (last end - first arrival). With these workloads the
queue never empties, so that is jobs x 60 / the sum of the run times. The service row's ratio = its
jobs/min / diffusers' jobs/min (same jobs, same run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from common import card, print_table, results_name, write_json
from service import PROMPT, Server, build_checkpoint


@dataclass(frozen=True)
class Spec:
    """One job: submitted arrival_s after the run starts (ignored by a sequential workload)."""

    arrival_s: float
    height: int
    width: int
    steps: int
    seed: int
    frames: int = 1
    guidance: float = 5.0
    warm: bool = False  # the untimed warm pass's copy: prompts of its own, so it leaves none encoded for the timed run

    @property
    def shape(self) -> str:
        return f"{self.height}x{self.width}x{self.frames}"

    @property
    def prompt(self) -> str:
        """Each job its own prompt (the seed picks it), as users' jobs come: a server that encoded a
        prompt once would otherwise be measured encoding nothing."""
        return f"{PROMPT} , {SUBJECTS[self.seed % len(SUBJECTS)]}" + " , warm-up" * self.warm


# 17 (prime): the seeds of a workload pick distinct ones.
SUBJECTS = ("oil painting", "at night", "in the rain", "aerial view", "close-up", "wide angle", "golden hour", "foggy morning",
            "black and white", "watercolor", "from below", "pixel art", "in autumn", "underwater light", "neon lights",
            "studio lighting", "long exposure")


@dataclass(frozen=True)
class Workload:
    name: str
    jobs: tuple[Spec, ...]
    sequential: bool = False  # each job submitted when the previous one has completed (one at a time)
    cache: str = ""  # every job's step cache (--cache; client.step_cache syntax), "" = exact


WORKLOADS = {
    "mixed": Workload("mixed", (
        Spec(0.0, 480, 832, 50, 101),
        Spec(0.0, 720, 1280, 20, 102),
        Spec(0.4, 480, 832, 30, 103),
        Spec(0.9, 720, 1280, 40, 104),
        Spec(1.1, 480, 832, 20, 105),
        Spec(1.8, 720, 1280, 50, 106),
        Spec(2.5, 480, 832, 40, 107),
        Spec(2.6, 720, 1280, 30, 108),
        Spec(3.4, 480, 832, 50, 109),
        Spec(4.0, 720, 1280, 20, 110),
        Spec(4.2, 480, 832, 30, 111),
        Spec(5.1, 720, 1280, 40, 112),
        Spec(5.5, 480, 832, 20, 113),
        Spec(6.3, 720, 1280, 50, 114),
        Spec(6.8, 480, 832, 40, 115),
        Spec(7.5, 720, 1280, 30, 116),
    )),
    "same-shape": Workload("same-shape", tuple(Spec(0.0, 480, 832, (20, 30)[i % 2], 201 + i) for i in range(16))),
    "solo": Workload("solo", tuple(Spec(0.0, 480, 832, 50, 301 + i) for i in range(4)), sequential=True),
    # Stages of arrivals beside a running batch (issue 15, item 3): 4 images denoising, 2 short videos
    # arriving whose encode and (long) decode run between the images' steps: the stall item 3 of issue 15 is about.
    "arrivals": Workload("arrivals", (
        *(Spec(0.0, 480, 832, 60, 401 + i) for i in range(4)),
        Spec(0.3, 480, 832, 4, 411, frames=33),
        Spec(0.8, 480, 832, 4, 412, frames=33),
    )),
}

# --tiny: the first jobs of the same workload, shapes and steps shrunk, arrivals x 0.1.
TINY_JOBS = {"mixed": 4, "same-shape": 4, "solo": 2, "arrivals": 6}
TINY_SIZES = {(480, 832): (32, 32), (720, 1280): (32, 48)}


def tiny(workload: Workload) -> Workload:
    jobs = tuple(replace(s, arrival_s=round(s.arrival_s * 0.1, 3), height=TINY_SIZES[s.height, s.width][0],
                         width=TINY_SIZES[s.height, s.width][1], steps=2 if s.steps <= 30 else 3)
                 for s in workload.jobs[:TINY_JOBS[workload.name]])
    return replace(workload, jobs=jobs)


def shapes(jobs) -> list[tuple[int, int, int]]:
    return list(dict.fromkeys((s.height, s.width, s.frames) for s in jobs))


def percentiles(values: list[float], prefix: str) -> dict:
    return {f"{prefix}_p{q}_s": round(float(np.percentile(values, q)), 3) for q in (50, 90, 99)}


class GpuBusy:
    """NVML's utilization.gpu of the serving GPU every 100 ms in a thread: one `nvidia-smi -lms 100`
    process, else torch.cuda.utilization (pynvml) polled; `source` says which (None: no GPU)."""

    def __init__(self, enabled: bool):
        self.samples: list[tuple[float, float]] = []
        self.source, self.proc, self.stopping = None, None, threading.Event()
        if not enabled:
            return
        index = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip()
        index = index if index.isdigit() or index.startswith(("GPU-", "MIG-")) else "0"  # an index or a UUID
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "-i", index, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-lms", "100"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.source = "nvidia-smi utilization.gpu every 100 ms"
            target = self._read
        else:
            try:
                torch.cuda.utilization(0)
            except Exception:  # no pynvml: nothing to sample
                return
            self.source = "torch.cuda.utilization every 100 ms"
            target = self._poll
        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.samples.append((time.perf_counter(), float(line.strip())))
            except ValueError:
                pass

    def _poll(self) -> None:
        while not self.stopping.wait(0.1):
            self.samples.append((time.perf_counter(), float(torch.cuda.utilization(0))))

    def mean(self, start: float, end: float) -> float | None:
        values = [v for t, v in list(self.samples) if start <= t <= end]
        return round(sum(values) / len(values), 1) if values else None

    def stop(self) -> None:
        self.stopping.set()
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


LAST_EVENTS: dict[str, str] = {}  # job id -> its last event, printed when a run times out (where it hung)


def job_step(event) -> int:
    return event.step_completed.step if event.WhichOneof("event") == "step_completed" else -1


async def run_service_jobs(target: str, workload: Workload) -> tuple[float, list[dict]]:
    """Submits the workload's jobs at their arrival offsets (or one after another) and follows their
    events; returns the start (perf_counter) and one dict per job, in the workload's order, with client
    times relative to the start. Raises SystemExit if a job does not succeed."""
    from diffserve.client import AsyncClient, make_params
    from diffserve.v1 import generation_pb2 as pb

    async def one(client, spec: Spec, t0: float) -> dict:
        if not workload.sequential:
            await asyncio.sleep(max(0.0, t0 + spec.arrival_s - time.perf_counter()))
        params = make_params(spec.prompt, height=spec.height, width=spec.width, num_frames=spec.frames, num_inference_steps=spec.steps,
                             guidance_scale=spec.guidance, seed=spec.seed, output_format="npy", **({"cache": workload.cache} if workload.cache else {}))
        submitted = time.perf_counter()
        job = await client.submit(params=params)
        created = job.create_time.ToNanoseconds() / 1e9
        started = end = failure = None
        batch_jobs, step_times, stages = [], [], {}  # stages: first stage_started time per stage
        async with contextlib.aclosing(client.events(job.id)) as events:
            async for event in events:
                kind = event.WhichOneof("event")
                t = event.time.ToNanoseconds() / 1e9
                LAST_EVENTS[job.id] = f"{spec.shape} {kind} step {job_step(event)} at {time.perf_counter() - t0:.2f} s"
                if kind == "stage_started":
                    stages.setdefault(event.stage_started.stage, t)
                if kind == "stage_started" and started is None and event.stage_started.stage == pb.STAGE_ENCODE:
                    started = t
                elif kind == "step_completed":
                    batch_jobs.append(event.step_completed.batch_jobs)
                    step_times.append(t)
                elif kind == "completed":
                    end = t
                elif kind in ("failed", "cancelled"):
                    failure = f"{kind}: {getattr(event, kind).status.message}"
                if kind in ("completed", "failed", "cancelled"):
                    break
        done = time.perf_counter()
        if end is None:
            raise SystemExit(f"error: job {job.id} ({spec}) did not complete: {failure or 'its event stream ended'}")
        # Stage spans from the events: encode until prepare starts, decode (and save) until completed.
        def span(first, then) -> float:
            return (stages.get(then, end) - stages[first]) if first in stages else float("nan")

        return dict(shape=spec.shape, steps=spec.steps, seed=spec.seed, arrival_s=spec.arrival_s, submitted=submitted - t0,
                    encode_s=span(pb.STAGE_ENCODE, pb.STAGE_PREPARE), decode_s=span(pb.STAGE_DECODE, None),
                    done=done - t0, latency_s=end - created, queue_wait_s=(started if started is not None else end) - created,
                    client_latency_s=done - submitted, mean_batch_jobs=round(sum(batch_jobs) / max(1, len(batch_jobs)), 2),
                    max_step_gap_s=max((b - a for a, b in zip(step_times, step_times[1:])), default=0.0))

    async with AsyncClient(target) as client:
        t0 = time.perf_counter()
        if workload.sequential:
            return t0, [await one(client, spec, t0) for spec in workload.jobs]
        return t0, list(await asyncio.gather(*(one(client, spec, t0) for spec in workload.jobs)))


def service_side(ckpt: Path, workdir: Path, workload: Workload, args, gpu: GpuBusy) -> dict:
    extra = ["--max-batch-size", str(args.max_batch_size), "--max-resident", str(max(8, args.max_batch_size))]
    extra += ["--device", "cpu"] * args.tiny
    for h, w, f in shapes(workload.jobs):
        extra += ["--warmup-shape", f"{h}x{w}x{f}"]
    started = time.perf_counter()
    server = Server(ckpt, workdir, extra + args.serve_arg, startup_timeout_s=180 if args.tiny else 600)
    startup_s = time.perf_counter() - started
    print(f"server ready (load + warm-up at {len(shapes(workload.jobs))} shape(s)): {startup_s:.0f} s", flush=True)
    expired, finished = threading.Event(), threading.Event()

    def expire() -> None:  # a hung run costs at most --timeout-s, and says where it hung
        expired.set()
        print(f"error: the run took more than {args.timeout_s:g} s: the workers' stacks follow (SIGUSR1), then SIGKILL", flush=True)
        for job_id, last in LAST_EVENTS.items():
            print(f"  job {job_id}: last event {last}", flush=True)
        server.dump_stacks()
        time.sleep(3)
        if not finished.is_set():
            server.kill()

    watchdog = threading.Timer(args.timeout_s, expire)
    watchdog.daemon = True
    watchdog.start()
    try:
        if not args.no_warm_pass:
            warm = replace(workload, jobs=tuple(replace(s, arrival_s=0.0, steps=2, warm=True) for s in workload.jobs), sequential=False)
            started = time.perf_counter()
            asyncio.run(run_service_jobs(server.target, warm))
            print(f"warm pass ({len(warm.jobs)} jobs, 2 steps each): {time.perf_counter() - started:.1f} s", flush=True)
        t0, jobs = asyncio.run(run_service_jobs(server.target, workload))
    except BaseException:
        if expired.is_set():
            raise SystemExit(f"error: timed out after {args.timeout_s:g} s (--timeout-s)") from None
        raise
    finally:
        finished.set()
        watchdog.cancel()
        server.client.close()
        server.stop()
    first, last = min(j["submitted"] for j in jobs), max(j["done"] for j in jobs)
    window = last - first
    return dict(
        side="diffserve", jobs=len(jobs), wall_s=round(window, 2), jobs_per_min=round(len(jobs) * 60 / window, 2),
        **percentiles([j["latency_s"] for j in jobs], "latency"), **percentiles([j["queue_wait_s"] for j in jobs], "queue_wait"),
        **percentiles([j["client_latency_s"] for j in jobs], "client_latency"),
        **percentiles([j["encode_s"] for j in jobs], "encode"), **percentiles([j["decode_s"] for j in jobs], "decode"),
        mean_batch_jobs=round(float(np.mean([j["mean_batch_jobs"] for j in jobs])), 2),
        # The stall: the longest a job waited between two of its steps (another job's stage, or steps, in between).
        max_step_gap_s=round(max(j["max_step_gap_s"] for j in jobs), 3),
        gpu_busy_pct=gpu.mean(t0 + first, t0 + last), gpu_busy_source=gpu.source, startup_s=round(startup_s),
        per_job=[{k: round(v, 3) if isinstance(v, float) else v for k, v in j.items()} for j in jobs],
    )


def diffusers_side(ckpt: Path, workdir: Path, workload: Workload, tiny_run: bool, gpu: GpuBusy) -> dict:
    from diffusers import AutoencoderKLWan, WanPipeline

    device = "cpu" if tiny_run else "cuda"
    started = time.perf_counter()
    # As the Wan2.1 model card loads it: the VAE in float32, the rest in bf16.
    vae = AutoencoderKLWan.from_pretrained(ckpt, subfolder="vae", torch_dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(ckpt, vae=vae, torch_dtype=torch.float32 if tiny_run else torch.bfloat16).to(device)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - started
    print(f"diffusers pipeline loaded: {load_s:.0f} s", flush=True)

    def run(spec: Spec) -> np.ndarray:
        return pipe(prompt=spec.prompt, negative_prompt="", height=spec.height, width=spec.width, num_frames=spec.frames,
                    num_inference_steps=spec.steps, guidance_scale=spec.guidance, output_type="np",
                    generator=torch.Generator(device).manual_seed(spec.seed)).frames[0]

    for h, w, f in shapes(workload.jobs):  # untimed: each shape once, 2 steps
        run(Spec(0.0, h, w, 2, 0, frames=f))
    jobs = []
    t_start = time.perf_counter()
    for i, spec in enumerate(workload.jobs):
        started = time.perf_counter()
        np.save(workdir / f"diffusers-{i}.npy", run(spec))
        if not tiny_run:
            torch.cuda.synchronize()
        jobs.append(dict(shape=spec.shape, steps=spec.steps, seed=spec.seed, arrival_s=spec.arrival_s, run_s=time.perf_counter() - started))
    t_end = time.perf_counter()
    # One at a time with the workload's arrivals: job i starts when it has arrived and job i-1 is done.
    end = 0.0
    for spec, job in zip(workload.jobs, jobs):
        arrival = end if workload.sequential else spec.arrival_s
        start = max(arrival, end)
        end = start + job["run_s"]
        job.update(queue_wait_s=start - arrival, latency_s=end - arrival, done=end)
    first = 0.0 if workload.sequential else min(s.arrival_s for s in workload.jobs)
    window = end - first
    return dict(
        side="diffusers", jobs=len(jobs), wall_s=round(window, 2), jobs_per_min=round(len(jobs) * 60 / window, 2),
        **percentiles([j["latency_s"] for j in jobs], "latency"), **percentiles([j["queue_wait_s"] for j in jobs], "queue_wait"),
        **percentiles([j["run_s"] for j in jobs], "run"), gpu_busy_pct=gpu.mean(t_start, t_end), gpu_busy_source=gpu.source,
        startup_s=round(load_s), per_job=[{k: round(v, 3) if isinstance(v, float) else v for k, v in j.items()} for j in jobs],
    )


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="mixed", help="which fixed workload (default mixed)")
    p.add_argument("--max-batch-size", type=int, default=8, help="serve --max-batch-size (default 8; --max-resident is max(8, this))")
    p.add_argument("--serve-arg", action="append", default=[], metavar="FLAG",
                   help="one more `diffserve serve` flag or value, repeatable: --serve-arg=--cuda-graphs (overrides the defaults)")
    p.add_argument("--skip-diffusers", action="store_true", help="only the service side (no ratio)")
    p.add_argument("--no-warm-pass", action="store_true", help="no untimed 2-step pass of the workload before the timed run")
    p.add_argument("--checkpoint", default="", help="Wan2.1 folder to use; if it does not exist, the random one is built there and kept (a later run on the same machine reuses it)")
    p.add_argument("--timeout-s", type=float, default=300.0,
                   help="give up on the service side after this long (warm pass + timed run): dump the workers' stacks, kill (default 300)")
    p.add_argument("--tiny", action="store_true", help="tiny checkpoint on the CPU, tiny shapes, a handful of jobs (checks the script)")
    p.add_argument("--cache", default="", metavar="POLICY[:THRESHOLD][:KNOB=VALUE]",
                   help="every job of the service side with this step cache, e.g. taylorseer:interval=5 (a forced schedule: "
                        "random weights make thresholds meaningless; docs/acceleration.md); the diffusers side stays exact")
    p.add_argument("--suffix", default="", help="appended to the JSON name (e.g. graphs)")
    p.add_argument("--out", default="", help="folder for the JSON (default $OUT, else bench/results; --tiny: a temporary folder)")
    args = p.parse_args(argv)
    workload = replace(tiny(WORKLOADS[args.workload]) if args.tiny else WORKLOADS[args.workload], cache=args.cache)
    device_card = "cpu" if args.tiny else card()
    version = f"max-batch {args.max_batch_size}" + "".join(f" {a}" for a in args.serve_arg) + (f" cache {args.cache}" if args.cache else "")

    name = results_name(f"serve_load-{workload.name}{'-' + args.suffix if args.suffix else ''}")
    if args.tiny:
        name = name.replace(f"-{card()}-", "-cpu-", 1)
    out = args.out or os.environ.get("OUT") or (tempfile.mkdtemp(prefix="serve-load-tiny-") if args.tiny else None)

    def finish(rows: list[dict]) -> list[dict]:
        ratio = round(rows[0]["jobs_per_min"] / rows[1]["jobs_per_min"], 3) if len(rows) == 2 else None
        for row in rows:
            row.update(workload=workload.name, model=f"wan-{'tiny' if args.tiny else '1.3b'}", card=device_card,
                       version=version if row["side"] == "diffserve" else "WanPipeline, one at a time",
                       ratio=ratio if row["side"] == "diffserve" else None)
        return [{k: r[k] for k in ("workload", "side", "model", "version", "card")} | r for r in rows]

    gpu = GpuBusy(enabled=not args.tiny)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="diffserve-load-") as tmp:
            tmp = Path(tmp)
            started = time.perf_counter()
            ckpt = Path(args.checkpoint).resolve() if args.checkpoint else tmp / "wan-1.3b-random"
            if not ckpt.exists():  # built beside it, renamed when complete: an interrupted build is not reused
                partial = ckpt.with_name(ckpt.name + ".partial")
                shutil.rmtree(partial, ignore_errors=True)
                build_checkpoint(partial, args.tiny).rename(ckpt)
            print(f"checkpoint {ckpt}: {time.perf_counter() - started:.0f} s", flush=True)
            rows.append(service_side(ckpt, tmp, workload, args, gpu))
            write_json(name, finish(rows), out)  # the service row is kept if the diffusers side fails
            if not args.skip_diffusers:
                rows.append(diffusers_side(ckpt, tmp, workload, args.tiny, gpu))
    finally:
        gpu.stop()
    rows = finish(rows)
    path = write_json(name, rows, out)
    print_table(rows, ["workload", "side", "version", "jobs", "jobs_per_min", "ratio", "latency_p50_s", "latency_p90_s",
                       "latency_p99_s", "queue_wait_p50_s", "queue_wait_p90_s", "encode_p50_s", "decode_p50_s", "mean_batch_jobs",
                       "max_step_gap_s", "gpu_busy_pct", "wall_s", "card"])
    print(f"GPU busy: {rows[0]['gpu_busy_source'] or 'not sampled (no GPU)'}")
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
