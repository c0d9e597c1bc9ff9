"""Scheduler capacity: the real scheduler driven by simulated worker groups (no GPU, no torch).

    python bench/scheduler_capacity.py [--groups 1,8,64] [--step-ms 1] [--window-s 8] [--plaintext] [--profile DIR]

For each group count G it starts `python -m diffserve.scheduler.app` (no local worker, tmp state
and output folders, --ready-file, CURVE on the worker endpoint unless --plaintext) and one
`python -m diffserve.worker.simulated --groups G` process whose groups answer each DenoiseStep
after --step-ms (short: the scheduler is meant to be the bottleneck). It submits G × max_resident
long jobs over gRPC (every group full, each step command carrying max_batch_size jobs), lets
them run --warmup-s, then measures a window of --window-s:

- step commands/s (and job-steps/s): counted by the simulated worker over the window;
- dispatch latency p50/p99, two ways:
  * scheduler side (DIFFSERVE_DISPATCH_TRACE, scheduler/steps.py): from the moment the Result that
    left a group idle was received to the moment its next command was handed to the socket, i.e.
    command ready → sent, including every other Result and command the loop handled meanwhile;
  * worker side: Result sent → next command received on the same group, an upper bound of the
    above (adds two ZeroMQ hops, the CURVE crypto and the simulated worker's own loop);
- scheduler CPU seconds per step command: utime + stime of the scheduler process (all threads:
  asyncio loop, ZeroMQ I/O and CURVE, gRPC) over the window, from /proc/PID/stat;
- the machine's load: load average, and the CPU the rest of the machine used meanwhile.

One JSON line per configuration on stdout; all of them in bench/results/<date>-cpu<N>-scheduler_capacity[-suffix].json.
With --profile DIR the scheduler runs under cProfile (DIR/scheduler-G<G>.prof): slower, for finding the hot path only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


# `python -c PROFILED OUT MODULE ARGS...`: runs MODULE as __main__ under cProfile timed by the main
# thread's CPU clock (not wall time: on a busy machine a wall-clock profile charges a call for the
# time other threads and processes ran meanwhile), writing OUT at exit.
PROFILED = """
import cProfile, runpy, sys, time
out, module = sys.argv[1], sys.argv[2]
sys.argv = [module] + sys.argv[3:]
profile = cProfile.Profile(time.thread_time)
profile.enable()
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
except SystemExit:
    pass
finally:
    profile.disable()
    profile.dump_stats(out)
"""


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds per thread name of a process (threads of one name summed)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def machine_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # without guest (counted in user already)
    return (total - idle) / CLK_TCK, total / CLK_TCK


def wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")


def percentile(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))]


def cli(env: dict, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "diffserve.client.cli", *args], check=True, capture_output=True, env=env, timeout=60)


def run_config(args: argparse.Namespace, groups: int, work: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    state, trace = work / "state", work / "dispatch-trace.jsonl"
    address = f"tcp://127.0.0.1:{free_port()}"
    auth_worker: list[str] = ["--insecure-worker-plaintext"]
    auth_serve: list[str] = ["--insecure-worker-plaintext"]
    if not args.plaintext:
        cli(env, "keys", "new", "bench", "--out", str(work / "keys"))
        cli(env, "keys", "--state-dir", str(state), "add", "bench", str(work / "keys" / "bench.key"))
        auth_worker, auth_serve = ["--key-file", str(work / "keys" / "bench.key_secret"), "--scheduler-key", str(state / "keys" / "scheduler.key")], []
    resident = groups * args.max_resident
    jobs = resident + args.queue
    ready = work / "port"
    profile = [] if not args.profile else ["-c", PROFILED, str(Path(args.profile).resolve() / f"scheduler-G{groups}.prof"), "diffserve.scheduler.app"]
    sched_env = {**env, "DIFFSERVE_DISPATCH_TRACE": str(trace)}
    scheduler = subprocess.Popen(
        [sys.executable, *(profile or ["-m", "diffserve.scheduler.app"]), "--port", "0", "--worker-bind", address, "--state-dir", str(state),
         "--output-dir", str(work / "outputs"), "--ready-file", str(ready), "--log-level", "WARNING", "--max-queue", str(jobs + 16),
         "--max-batch-size", str(args.max_batch_size), "--drain-timeout", "0", *auth_serve],
        env=sched_env, cwd=work, stderr=(work / "scheduler.log").open("w"))
    worker = None
    try:
        port = wait_for(lambda: ready.exists() and ready.read_text(), 60, "the scheduler to start", scheduler)
        stats = work / "worker-stats.json"
        wprofile = ["-m"] if not args.profile else ["-c", PROFILED, str(Path(args.profile).resolve() / f"worker-G{groups}.prof")]
        worker = subprocess.Popen(
            [sys.executable, *wprofile, "diffserve.worker.simulated", "--scheduler", address, "--groups", str(groups), "--step-ms", str(args.step_ms),
             "--stage-ms", str(args.stage_ms), "--max-batch-size", str(args.max_batch_size), "--max-resident", str(args.max_resident),
             "--worker-id", "bench", "--stats-file", str(stats), "--ready-file", str(work / "worker-ready"), "--log-level", "WARNING", *auth_worker],
            env=env, cwd=work, stderr=(work / "worker.log").open("w"))
        from diffserve.client import Client

        client = Client(f"127.0.0.1:{port}")
        wait_for(lambda: (work / "worker-ready").exists(), 60, "every simulated group to register", worker)
        wait_for(lambda: client.health() == "SERVING", 30, "health SERVING", scheduler)
        log(f"G={groups}: {groups} groups registered; submitting {jobs} jobs")
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:  # concurrent submits: the scheduler is busy with the first jobs' steps meanwhile
            ids = list(pool.map(lambda i: client.submit(prompt=f"job {i}", seed=i, height=8, width=8, num_frames=1,
                                                        num_inference_steps=args.steps, output_format="npy").id, range(jobs)))
        submit_s = time.monotonic() - started
        # every job resident (each group full, as the heartbeats say) before the warm-up counts
        wait_for(lambda: sum(w.resident_jobs for m in client.list_models() for w in m.workers) == resident, 120, "every group to be full", scheduler)
        log(f"G={groups}: submitted in {submit_s:.1f} s, all resident after {time.monotonic() - started:.1f} s; warm-up {args.warmup_s} s")
        time.sleep(args.warmup_s)

        def snapshot() -> dict:
            busy, total = machine_cpu_s()
            return {"t": time.time(), "mono": time.monotonic(), "sched_cpu": proc_cpu_s(scheduler.pid), "threads": thread_cpu_s(scheduler.pid), "worker_cpu": proc_cpu_s(worker.pid),
                    "busy": busy, "total": total, "load": os.getloadavg()[0]}

        stats.unlink(missing_ok=True)
        worker.send_signal(signal.SIGUSR1)  # reset the worker's counters: the window starts
        wait_for(stats.exists, 5, "the worker's stats reset")
        stats.unlink()
        start = snapshot()
        time.sleep(args.window_s)
        worker.send_signal(signal.SIGUSR1)
        end = snapshot()
        seen = json.loads(wait_for(lambda: stats.exists() and stats.read_text(), 5, "the worker's stats"))
        time.sleep(1.2)  # the trace is flushed once a second
        sched_gaps = trace_window(trace, start["t"], end["t"])
        started = time.monotonic()
        n_jobs_done = sum(1 for i in ids[:64] if client.get(i).state not in (1, 2))
        get_ms = (time.monotonic() - started) / len(ids[:64]) * 1e3  # GetJob while the scheduler runs every group
        client.close()
    finally:
        for proc in (scheduler, worker):  # the scheduler first: it sends each group Shutdown
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            if proc is scheduler:
                try:
                    scheduler.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
        for proc in (scheduler, worker):
            if proc is not None:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    window = end["mono"] - start["mono"]
    commands = seen["step_commands"]
    sched_cpu = end["sched_cpu"] - start["sched_cpu"]
    worker_cpu = end["worker_cpu"] - start["worker_cpu"]
    machine_busy = end["busy"] - start["busy"]
    sched_gaps.sort()
    ms = lambda v: None if v is None else round(v * 1e3, 4)  # noqa: E731
    return {
        "groups": groups,
        "auth": "plaintext" if args.plaintext else "curve",
        "step_ms": args.step_ms,
        "stage_ms": args.stage_ms,
        "max_batch_size": args.max_batch_size,
        "max_resident": args.max_resident,
        "jobs": jobs,
        "queued": args.queue,
        "window_s": round(window, 3),
        "step_commands": commands,
        "step_commands_per_s": round(commands / window, 1),
        "job_steps_per_s": round(seen["step_entries"] / window, 1),
        "stage_commands": seen["stage_commands"],
        "dispatch_ms_scheduler": {"n": len(sched_gaps), "p50": ms(percentile(sched_gaps, 50)), "p90": ms(percentile(sched_gaps, 90)),
                                  "p99": ms(percentile(sched_gaps, 99)), "max": ms(sched_gaps[-1] if sched_gaps else None)},
        "dispatch_ms_worker_side": seen["gap_ms"],
        "scheduler_cpu_s": round(sched_cpu, 3),
        "scheduler_cpu_us_per_step_command": round(sched_cpu / commands * 1e6, 1) if commands else None,
        "scheduler_cpu_share": round(sched_cpu / window, 3),
        "scheduler_thread_cpu_share": {k: round((v - start["threads"].get(k, 0.0)) / window, 3) for k, v in end["threads"].items()
                                       if v - start["threads"].get(k, 0.0) > 0},
        "worker_cpu_share": round(worker_cpu / window, 3),
        "other_cpu_share": round((machine_busy - sched_cpu - worker_cpu) / window, 3),
        "machine_cpus": os.cpu_count(),
        "loadavg_1m": [round(start["load"], 2), round(end["load"], 2)],
        "jobs_ended_early": n_jobs_done,
        "submit_s": round(submit_s, 2),
        "get_job_ms_under_load": round(get_ms, 2),
        "profiled": bool(args.profile),
    }


def trace_window(path: Path, t0: float, t1: float) -> list[float]:
    """The scheduler's dispatch samples (seconds) flushed in [t0, t1] (wall clock), from its trace lines."""
    gaps: list[float] = []
    if not path.exists():
        return gaps
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if t0 <= row["t"] <= t1:
            gaps += row["gaps_s"]
    return gaps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", default="1,8,64", help="comma-separated group counts (default 1,8,64)")
    p.add_argument("--step-ms", type=float, default=1.0, help="simulated DenoiseStep time (default 1 ms)")
    p.add_argument("--stage-ms", type=float, default=0.2, help="simulated ENCODE / PREPARE / DECODE time")
    p.add_argument("--max-batch-size", type=int, default=4)
    p.add_argument("--max-resident", type=int, default=8)
    p.add_argument("--steps", type=int, default=100_000, help="steps per job: long, so no job ends in the window")
    p.add_argument("--queue", type=int, default=0, help="jobs queued beyond every group's max_resident (they wait all along)")
    p.add_argument("--warmup-s", type=float, default=3.0)
    p.add_argument("--window-s", type=float, default=8.0)
    p.add_argument("--plaintext", action="store_true", help="plain TCP worker endpoint instead of CURVE")
    p.add_argument("--profile", default="", help="run the scheduler under cProfile, profiles into this folder")
    p.add_argument("--out", default="bench/results", help="folder of the JSON results ('' = do not write)")
    p.add_argument("--suffix", default="", help="appended to the results file name")
    args = p.parse_args()
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    rows = []
    for groups in [int(g) for g in args.groups.split(",")]:
        work = Path(tempfile.mkdtemp(prefix=f"capacity-G{groups}-"))
        try:
            row = run_config(args, groups, work)
        except Exception:
            for name in ("scheduler.log", "worker.log"):  # the processes' last words
                if (work / name).exists():
                    log(f"--- {name}:\n" + "\n".join((work / name).read_text(errors="replace").splitlines()[-20:]))
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        row["machine"] = f"{platform.node()} {os.cpu_count()} CPUs, Python {platform.python_version()}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{time.strftime('%Y-%m-%d')}-cpu{os.cpu_count()}-scheduler_capacity{'-' + args.suffix if args.suffix else ''}.json"
        (folder / name).write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {folder / name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
