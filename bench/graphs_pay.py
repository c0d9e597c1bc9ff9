"""Where CUDA graphs pay (issue 15, item 2): Wan2.1-1.3B's DiT forward, eager against a replayed
graph (worker/cuda_graphs.py's GraphedForward, what --cuda-graphs wraps), per shape and batch rows,
with the memory each capture adds.

    python bench/graphs_pay.py [--shapes 480x832x1,720x1280x1,480x832x17,480x832x81] [--rows 1,2,4,8]
    python bench/graphs_pay.py --tiny      (CPU, tiny config: GraphedForward runs eagerly; checks the script)

Same synthetic weights and inputs as bench/dit_forward.py (bf16 on the GPU). Per (shape, rows):
eager ms and graph ms per forward (CUDA events, median of 5 after warm-up; graph = replay with the
input copies and output clone GraphedForward does), the ratio, and the capture's memory (reserved
bytes after minus before). Rows are a batch of requests of one shape (text 512 tokens each).
Writes $OUT/<date>-<card>-graphs_pay.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from common import card, print_table, results_name, write_json
from dit_forward import WAN, WAN_13B, tiny_cases
from synthetic import free_memory, our_model

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def latent(shape: str) -> tuple[int, int, int, int]:
    """480x832x81 → Wan's latent (16, 21, 60, 104)."""
    h, w, f = (int(v) for v in shape.split("x"))
    return 16, (f - 1) // 4 + 1, h // 8, w // 8


def batched(inputs: dict, rows: int) -> dict:
    return dict(x=inputs["x"].repeat(rows, 1, 1, 1, 1), t=inputs["t"].repeat(rows), ctx=inputs["ctx"].repeat(rows, 1, 1))


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            import time
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    from diffserve.worker.cuda_graphs import GraphedForward

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="480x832x1,720x1280x1,480x832x17,480x832x81")
    p.add_argument("--rows", default="1,2,4,8")
    p.add_argument("--max-tokens", type=int, default=70_000, help="skip (shape, rows) above this many latent tokens in all")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    cuda = not args.tiny
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    config = WAN_13B if cuda else tiny_cases()["wan-1.3b"].config
    shapes = args.shapes.split(",") if cuda else ["32x32x1", "32x32x5"]
    rows_list = [int(r) for r in args.rows.split(",")]
    text = 512 if cuda else 16
    model = our_model(WAN.our_class(), WAN.diffusers_class, config, dtype, device).eval()
    results = []
    with torch.no_grad():
        for shape in shapes:
            lat = latent(shape)
            tokens = lat[1] * (lat[2] // 2) * (lat[3] // 2)
            base = WAN.inputs(config, dict(latent=lat, text=text), device, dtype)
            for rows in rows_list:
                if tokens * rows > args.max_tokens:
                    continue
                inputs = batched(base, rows)
                eager = timed(lambda: model(inputs["x"], inputs["t"], inputs["ctx"]), 2)  # warm-up
                eager = timed(lambda: model(inputs["x"], inputs["t"], inputs["ctx"]), 5)
                graphed = GraphedForward(model.forward, max_graphs=1)
                if cuda:
                    torch.cuda.synchronize()
                    before = torch.cuda.memory_reserved()
                graphed(inputs["x"], inputs["t"], inputs["ctx"])  # captures
                memory = (torch.cuda.memory_reserved() - before) if cuda else 0
                graph = timed(lambda: graphed(inputs["x"], inputs["t"], inputs["ctx"]), 5)
                results.append(dict(model="wan-1.3b", shape=shape, rows=rows, tokens=tokens * rows, eager_ms=round(eager, 2),
                                    graph_ms=round(graph, 2), ratio=round(graph / eager, 3), capture_mib=round(memory / 2**20, 1),
                                    card=card() if cuda else "cpu"))
                graphed = None
                free_memory()
    print_table(results, ["shape", "rows", "tokens", "eager_ms", "graph_ms", "ratio", "capture_mib"])
    out = os.environ.get("OUT") or (tempfile.mkdtemp() if args.tiny else None)
    print(f"wrote {write_json(results_name('graphs_pay'), results, out)}")


if __name__ == "__main__":
    main()
