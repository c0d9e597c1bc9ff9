"""What a packed forward costs against the unpacked forwards of the same rows (issue 15, item 4):
full-size Wan2.1-1.3B, synthetic weights, bf16, requests of different sizes.

    python bench/packed_forward.py [--scenarios a,b] [--repeat 10]
    python bench/packed_forward.py --tiny     (CPU, the tests' tiny Wan, float32: checks the script itself)

Scenarios (rows: a request each, its own timestep and its own 512-token prompt):
- a: two 480x832x1 rows + two 720x1280x1 rows: unpacked = two forwards of 2 rows, packed = one forward of 4;
- b: eight small images, two each of 256x256, 384x384, 320x576 and 480x832: unpacked = four forwards of
  2 rows, packed = one forward of 8.
Variants, each timed as the whole set of rows (CUDA events, median of --repeat after 2 warm-ups):
- unpacked: one `WanTransformer.forward` per size, eager;
- unpacked graphs: the same through worker/cuda_graphs.py's GraphedForward with the worker's default
  `--cuda-graphs auto` rule (a forward of at most 4096 latent tokens replays a graph, larger ones run
  eagerly): what the service runs unpacked;
- packed: one `forward_packed` over every row (modulation per request read by index, varlen attention);
- packed, loop attention: the same with one attention call per request and layer (the varlen kernel off),
  to show what the varlen call buys.
`ratio` is each variant's time over unpacked eager. `rel_err`: each packed request's output against its
unpacked forward's (largest over requests; bf16, different attention kernels: not zero on the GPU).
Prints one JSON row per (scenario, variant), the table last, and writes $OUT/<date>-<card>-packed_forward.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from common import card, print_table, rel_err, results_name, time_ms, write_json
from dit_forward import WAN_13B
from synthetic import free_memory, our_model

ROOT = Path(__file__).resolve().parent.parent
GRAPH_MAX_TOKENS = 4096  # the worker's --cuda-graph-max-tokens default (--cuda-graphs auto)
TEXT = 512

SCENARIOS = {
    "a": [("480x832x1", 2), ("720x1280x1", 2)],
    "b": [("256x256x1", 2), ("384x384x1", 2), ("320x576x1", 2), ("480x832x1", 2)],
}
TINY_SCENARIOS = {  # latent sides even (Wan's 2x2 patches), a few tokens each
    "a": [("32x32x1", 2), ("48x64x1", 2)],
    "b": [("16x16x1", 2), ("32x32x1", 2), ("32x48x1", 2), ("48x32x1", 2)],
}


def latent(shape: str) -> tuple[int, int, int, int]:
    """'480x832x81' -> Wan's latent (16, 21, 60, 104)."""
    h, w, f = (int(v) for v in shape.split("x"))
    return 16, (f - 1) // 4 + 1, h // 8, w // 8


def tokens_of(lat: tuple[int, int, int, int]) -> int:
    return lat[1] * (lat[2] // 2) * (lat[3] // 2)


@contextlib.contextmanager
def loop_attention():
    """Packed forwards with one attention call per request and layer (attention_varlen's fallback)."""
    from diffserve.kernels import attention

    original = attention._varlen_fn
    attention._varlen_fn = lambda q: None
    try:
        yield
    finally:
        attention._varlen_fn = original


def bench_scenario(name: str, groups: list[tuple[str, int]], model, cfg: dict, device, dtype, text: int, repeat: int) -> list[dict]:
    from diffserve.kernels import attention
    from diffserve.worker.cuda_graphs import GraphedForward
    from diffserve.worker.models.wan import WanTransformer

    cuda = device.type == "cuda"
    g = torch.Generator(device).manual_seed(1)
    rows = [(shape, latent(shape)) for shape, n in groups for _ in range(n)]
    latents = [torch.randn(*lat, generator=g, device=device).to(dtype) for _, lat in rows]
    t = torch.linspace(50.0, 950.0, len(rows), device=device)  # requests at different steps
    ctx = torch.randn(len(rows), text, cfg["text_dim"], generator=g, device=device).to(dtype)
    # Unpacked: the rows of one size stacked, one forward per size (what same-shape batching runs).
    spans, start = [], 0
    for _, n in groups:
        spans.append((start, start + n))
        start += n
    stacked = [(torch.stack(latents[a:b]), t[a:b], ctx[a:b]) for a, b in spans]
    graphed = GraphedForward(lambda *args: WanTransformer.forward(model, *args), max_graphs=len(groups), max_tokens=GRAPH_MAX_TOKENS)

    def unpacked():
        return [WanTransformer.forward(model, *batch) for batch in stacked]

    def unpacked_graphs():
        return [graphed(*batch) for batch in stacked]

    def packed():
        return model.forward_packed(latents, t, ctx)

    def looped():
        with loop_attention():
            return model.forward_packed(latents, t, ctx)

    tokens = sum(tokens_of(lat) for _, lat in rows)
    q = torch.empty(1, tokens, cfg["num_attention_heads"], cfg["attention_head_dim"], device=device, dtype=dtype)
    varlen = "fa3 varlen" if attention._varlen_fn(q) is not None else f"loop ({attention.backend_for(q)})"
    results = []
    with torch.no_grad():
        reference = [out[i] for out in unpacked() for i in range(out.shape[0])]
        for variant, fn, backend in (("unpacked", unpacked, "per size"), ("unpacked graphs", unpacked_graphs, "per size"),
                                     ("packed", packed, varlen), ("packed, loop attention", looped, "loop")):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            ms = time_ms(fn, warmup=2, repeat=repeat, cuda=cuda)
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
            outs = fn()
            outs = outs if variant.startswith("packed") else [o[i] for o in outs for i in range(o.shape[0])]
            err = max(rel_err(o.float(), r.float()) for o, r in zip(outs, reference))
            results.append(dict(
                scenario=name, variant=variant, rows=len(rows), sizes=" + ".join(f"{n}x{s}" for s, n in groups), forwards=1 if variant.startswith("packed") else len(groups),
                tokens=tokens, ms=round(ms, 2), attention=backend, rel_err=f"{err:.2e}", peak_gib=round(peak, 2) if peak is not None else "",
                dtype=str(dtype).removeprefix("torch."), card=card() if cuda else "cpu",
            ))
            print(json.dumps(results[-1]), flush=True)
    base = results[0]["ms"]
    for row in results:
        row["ratio"] = round(row["ms"] / base, 3)
    graphed.graphs.clear()  # the captures' memory goes back before the next scenario
    free_memory()
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenarios", default="a,b", help="comma-separated: a (2x 480x832 + 2x 720x1280), b (8 small images of 4 sizes)")
    p.add_argument("--repeat", type=int, default=10, help="timed runs per variant (median)")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny Wan on the CPU in float32 (checks the script; timings mean nothing)")
    p.add_argument("--out", default="", help="folder for the JSON (default $OUT, else bench/results; --tiny: a temporary folder)")
    args = p.parse_args(argv)
    names = args.scenarios.split(",")
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; choose from {','.join(SCENARIOS)}")
    if args.tiny:
        sys.path.insert(0, str(ROOT))
        from tests.fixtures.tiny.wan import TINY_WAN_TRANSFORMER

        torch.set_num_threads(1)
        device, dtype, cfg, text, scenarios = torch.device("cpu"), torch.float32, TINY_WAN_TRANSFORMER, 16, TINY_SCENARIOS
        out, repeat = args.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="packed-forward-tiny-"), min(args.repeat, 2)
    else:
        device, dtype, cfg, text, scenarios, out, repeat = torch.device("cuda"), torch.bfloat16, WAN_13B, TEXT, SCENARIOS, args.out or None, args.repeat
    from diffserve.worker.models.wan import WanTransformer
    from diffserve.worker.warmup import prepare_attention

    model = our_model(WanTransformer, "WanTransformer3DModel", cfg, dtype, device).eval()
    prepare_attention(model)
    results = []
    for name in names:
        results += bench_scenario(name, scenarios[name], model, cfg, device, dtype, text, repeat)
        path = write_json(results_name("packed_forward"), results, out)  # after each scenario: a later failure keeps these
    print_table(results, ["scenario", "sizes", "variant", "forwards", "tokens", "attention", "ms", "ratio", "rel_err", "peak_gib"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
