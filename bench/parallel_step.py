"""One denoising step on 1, 2, 4 ... GPUs in each parallel layout, against 1 GPU on the same machine.

python bench/parallel_step.py [--models wan-14b,flux.1-dev] [--gpus 2]   (GPU; NCCL; writes $OUT/<date>-<card>-parallel-<models>.json)
python bench/parallel_step.py --tiny                                  (CPU, gloo, tiny configs: checks the script)

A step is what the worker runs: Wan2.1-T2V-14B at 720x1280x81 with CFG is one forward over two rows
(conditional, unconditional); FLUX.1-dev at 1024^2 (guidance-distilled, no CFG) one row. Each
layout runs in its own set of processes (one per GPU), every rank builds the same full-size model
with synthetic weights (bench/synthetic.py), and the group runs the step as a worker group does:
rows over the cfg axis (parallel/cfg.py: split_rows), tokens over ulysses x ring, heads over tp.
Rank 0 times it (CUDA events around a barrier-aligned step, median). Speedup = t(1 GPU) / t(N);
efficiency = speedup / N.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import card, print_table, results_name, time_ms, write_json  # noqa: E402
from profiling import print_profile, profile_calls  # noqa: E402
from dit_forward import CASES, tiny_cases  # noqa: E402
from synthetic import our_model  # noqa: E402

# Layouts per GPU count, (cfg, ulysses, ring, tp); which make sense depends on the model.
LAYOUTS = {
    "wan-14b": {1: [(1, 1, 1, 1)], 2: [(2, 1, 1, 1), (1, 2, 1, 1), (1, 1, 2, 1), (1, 1, 1, 2)],
                4: [(2, 2, 1, 1), (1, 4, 1, 1), (2, 1, 2, 1), (1, 2, 2, 1), (2, 1, 1, 2)]},
    "flux.1-dev": {1: [(1, 1, 1, 1)], 2: [(1, 2, 1, 1), (1, 1, 2, 1), (1, 1, 1, 2)], 4: [(1, 4, 1, 1), (1, 2, 2, 1), (1, 2, 1, 2)]},
}
CFG_ROWS = {"wan-14b": 2, "flux.1-dev": 1}


def _label(layout) -> str:
    names = ("cfg", "ulysses", "ring", "tp")
    parts = [f"{n}{d}" for n, d in zip(names, layout) if d > 1]
    return " x ".join(parts) or "single"


def _rows(inputs: dict, rows: int) -> dict:
    """The step's batch: every per-sample tensor repeated to `rows` rows (CFG: cond + uncond)."""
    return {k: (torch.cat([v] * rows) if torch.is_tensor(v) and v.ndim >= 1 and v.shape[0] == 1 else v) for k, v in inputs.items()}


def _run_rank(rank: int, world: int, init: str, name: str, layout, tiny: bool, result_file: str, compile_mode: str = "",
              profile: bool = False, cuda_graphs: bool = False, hang_s: float = 480) -> None:
    from diffserve.worker.parallel import ParallelDims, ParallelState
    from diffserve.worker.parallel.cfg import split_rows

    cuda = not tiny
    faulthandler.dump_traceback_later(hang_s, exit=True)  # a hung rank prints where it is and ends the call
    mark = lambda what: print(f"[rank {rank}] {time.strftime('%X')} {what}", file=sys.stderr, flush=True)  # noqa: E731
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.set_grad_enabled(False)
    case = (tiny_cases() if tiny else CASES)[name]
    fam = case.family
    model = our_model(fam.our_class(), fam.diffusers_class, case.config, dtype, device).eval()
    state = ParallelState.single()
    if world > 1:
        state = ParallelState.init(ParallelDims(*layout), rank, init, device)
        from diffserve.worker.parallel.plans import parallelize

        parallelize(model, state)
    if compile_mode:  # the sharded forward compiles as one graph (tests/test_parallel_compile.py)
        from diffserve.kernels import attention

        attention.prepare(device, dtype, case.config["attention_head_dim"])  # else the second call recompiles
        model = torch.compile(model, mode=None if compile_mode == "default" else compile_mode)
    inputs = _rows(fam.inputs(case.config, case.shape, device, dtype), CFG_ROWS[name])
    batched = {"wan-14b": (0, 1, 2), "flux.1-dev": (0, 1, 2, 3, 6)}[name]
    step = split_rows(state, lambda *a: fam.ours_call(model, _unpack(name, a)), batched=batched)
    args = _pack(name, inputs)

    graphs = "reduce-overhead" in compile_mode  # CUDA graphs: each call a new step; outputs live until the next

    def once():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        if world > 1:
            dist.barrier(device_ids=[rank]) if cuda else dist.barrier()
        return step(*args)

    mark("model built")
    first = once()
    mark("eager step done")
    norm = float(first.float().norm())
    graph_err = None
    if cuda_graphs:  # the graphed step must give the eager step's output
        from diffserve.worker.cuda_graphs import GraphedForward

        model.forward = GraphedForward(model.forward)
        graphed = once()
        mark("graph captured and replayed")
        graph_err = float((graphed.float() - first.float()).abs().max() / first.float().abs().max())
    slow = case.slow and not tiny
    # A slow (multi-second) step is timed once after the first: its spread is well under 1 %.
    ms = time_ms(once, warmup=0 if slow else 1, repeat=1 if slow else 5, cuda=cuda)
    result = dict(ms=ms, peak=torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0, norm=norm, graph_err=graph_err)
    if profile:  # every rank runs the calls; rank 0 records them
        result["profile"] = profile_calls(once, calls=1 if slow else 3, active=rank == 0)
    mark("timed")
    if rank == 0:
        Path(result_file).write_text(json.dumps(result))
    if world > 1:
        dist.barrier(device_ids=[rank]) if cuda else dist.barrier()
        if cuda_graphs and cuda:  # destroying NCCL communicators that graphs captured hangs (pytorch#115388)
            sys.stderr.flush()
            os._exit(0)
        dist.destroy_process_group()


# The step's positional arguments per model (row_parallel splits positions), and back to the dict.
_ORDER = {"wan-14b": ("x", "t", "ctx"), "flux.1-dev": ("x", "t_train", "ctx", "pooled", "img_ids", "txt_ids", "guidance")}


def _pack(name: str, inputs: dict) -> tuple:
    return tuple(inputs[k] for k in _ORDER[name])


def _unpack(name: str, args: tuple) -> dict:
    return dict(zip(_ORDER[name], args))


def run_layout(name: str, layout, tiny: bool, compile_mode: str = "", profile: bool = False, cuda_graphs: bool = False,
               hang_s: float = 480) -> dict:
    world = layout[0] * layout[1] * layout[2] * layout[3]
    with tempfile.TemporaryDirectory() as folder:
        result = os.path.join(folder, "result")
        port = 29500 + (os.getpid() % 1000) + world * 7 + sum(layout)
        mp.spawn(_run_rank, args=(world, f"tcp://127.0.0.1:{port}", name, layout, tiny, result, compile_mode, profile, cuda_graphs, hang_s),
                 nprocs=world, join=True)
        return json.loads(Path(result).read_text())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="wan-14b,flux.1-dev")
    p.add_argument("--gpus", default="", help="comma-separated GPU counts to run besides 1 (default: 2 and 4 where present)")
    p.add_argument("--tiny", action="store_true", help="tiny configs on CPU processes over gloo (checks the script)")
    p.add_argument("--compile", default="", help="torch.compile mode for every layout (e.g. default); empty: eager")
    p.add_argument("--cuda-graphs", action="store_true", help="replay the step from a CUDA graph (worker/cuda_graphs.py); checks it against eager")
    p.add_argument("--hang-s", type=float, default=480, help="a rank still running after this many seconds prints its stack and exits")
    p.add_argument("--layouts", default="", help="only these layout labels, comma-separated (e.g. single,ulysses2)")
    p.add_argument("--profile", action="store_true", help="also profile rank 0's step: GPU busy vs wall, kernel time by kind")
    args = p.parse_args(argv)
    available = 4 if args.tiny else torch.cuda.device_count()
    counts = [int(c) for c in args.gpus.split(",") if c] or [n for n in (2, 4) if n <= available]
    rows = []
    out = (os.environ.get("OUT") or tempfile.mkdtemp()) if args.tiny else None
    tag = "-".join(["parallel", *args.models.replace(".", "").split(","), *([f"compile-{args.compile}"] if args.compile else []),
                     *(["graphs"] if args.cuda_graphs else [])])
    for name in args.models.split(","):
        if name not in LAYOUTS:
            p.error(f"unknown model {name}; choose from {','.join(LAYOUTS)}")
        case = (tiny_cases() if args.tiny else CASES)[name]
        base = None
        for n in [1, *counts]:
            for layout in LAYOUTS[name].get(n, []):
                if args.layouts and _label(layout) not in args.layouts.split(","):
                    continue
                if args.tiny and case.config["num_attention_heads"] % (layout[1] * layout[3]):
                    continue  # the tiny configs have 2 heads
                started = time.perf_counter()
                result = run_layout(name, layout, args.tiny, args.compile, args.profile, args.cuda_graphs, args.hang_s)
                ms, peak, norm = result["ms"], result["peak"], result["norm"]
                base = base or (ms, norm)
                speedup = base[0] / ms
                rows.append(dict(model=name, shape=case.label, card=card(), gpus=n, layout=_label(layout) + (f" +compile:{args.compile}" if args.compile else "") + (" +graphs" if args.cuda_graphs else ""), step_ms=round(ms, 1),
                                 speedup=round(speedup, 3), efficiency=round(speedup / n, 3), peak_gib=round(peak, 1),
                                 out_norm_rel=round(abs(norm - base[1]) / base[1], 5), graph_err=result["graph_err"], wall_s=round(time.perf_counter() - started)))
                if "profile" in result:
                    rows[-1]["profile"] = result["profile"]
                    print_profile(f"{name} {rows[-1]['layout']} (rank 0)", result["profile"])
                print_table(rows[-1:], [k for k in rows[-1] if k != "profile"])
                sys.stdout.flush()
                path = write_json(results_name(tag), rows, out)  # after each layout: a time limit keeps the rows so far
    print_table(rows, ["model", "shape", "gpus", "layout", "step_ms", "speedup", "efficiency", "peak_gib", "out_norm_rel", "graph_err"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
