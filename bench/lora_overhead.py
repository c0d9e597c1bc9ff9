"""What per-request LoRA costs a batched DiT forward (issue 17): full-size Wan2.1-1.3B, synthetic weights,
bf16, a batch of 4 rows each with its own rank-64 adapter on every attention and FFN linear, against
the same batch with no adapter.

    python bench/lora_overhead.py [--shapes 480x832x81,480x832x1] [--rows 4] [--rank 64]
    python bench/lora_overhead.py --tiny     (CPU, the tests' tiny Wan, float32: checks the script itself)

Times (CUDA events, median of 5 after 2 warm-ups, all eager: a LoRA step never runs from a CUDA graph):
- plain_ms: the model as loaded, no LoRA layers installed;
- base_ms: LoRA layers installed (what `--lora-dir` does), no row with an adapter;
- lora_ms: every row its own adapter (one base GEMM per linear + two batched GEMMs over the rows' stacked
  adapters), the stacks kept from the step before (the same batch runs many steps);
- lora_cold_ms: the same, the stacks built in the forward (the first step of a new adapter mix);
- shared_ms: every row the same adapter (two GEMMs per linear over all rows, the adapter as it is).
Ops per forward (`base_ops`, `lora_ops`, `shared_ops`): aten ops dispatched, views left out (about one kernel
launch each), counted once outside the timed runs.
Exactness: each row of the 4-adapter forward against the same row run alone through the model with
that adapter merged into the weights (W + s B A), as relative error (`err_vs_merged`).
Prints one JSON row per shape and writes them to $OUT/<date>-<card>-lora.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import torch

from common import card, count_ops, rel_err, results_name, time_ms, write_json
from dit_forward import WAN_13B, wan_flops
from synthetic import free_memory, our_model

ROOT = Path(__file__).resolve().parent.parent
TARGETS = (r"blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)", r"blocks\.\d+\.ffn\.net\.(0\.proj|2)")
SHAPES = {"480x832x81": (16, 21, 60, 104), "480x832x1": (16, 1, 60, 104)}  # latents (C, F, H, W)
TEXT = 512


def adapters(model, names: list[str], rank: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> list:
    """Random adapters (nonzero A and B) on every targeted linear, built in memory."""
    from diffserve.worker.models.lora import LoraModule, LoraWeights

    out = []
    g = torch.Generator(device).manual_seed(seed)
    for name in names:
        modules = {}
        for module in names_of(model):
            linear = model.get_submodule(module)
            down = torch.randn(rank, linear.in_features, generator=g, device=device) / linear.in_features**0.5
            up = torch.randn(linear.out_features, rank, generator=g, device=device) * 0.1 / rank**0.5
            modules[module] = LoraModule(down.to(dtype), up.to(dtype), None, 1.0)
        out.append(LoraWeights(name, modules))
    return out


def names_of(model) -> list[str]:
    from diffserve.worker.models.lora import linear_names

    return [n for n in linear_names(model) if any(re.fullmatch(t, n) for t in TARGETS)]


def lora_flops(model, tokens: int, text: int, rank: int) -> float:
    """Low-rank FLOPs of one adapter on every row: cross-attention keys / values act on the text tokens."""
    return sum(2 * (text if re.search(r"attn2\.to_[kv]$", n) else tokens) * rank * (m.in_features + m.out_features)
               for n, m in ((n, model.get_submodule(n)) for n in names_of(model)))


def merged_row(model, x, t, ctx, adapter, scale: float) -> torch.Tensor:
    """One row through the model with `adapter` merged into its weights (restored after)."""
    saved = {}
    for name, m in adapter.modules.items():
        linear = model.get_submodule(name)
        saved[name] = linear.weight.detach().clone()
        linear.weight.data += (scale * m.scaling * (m.up.float() @ m.down.float())).to(linear.weight.dtype)
    try:
        return model(x, t, ctx)
    finally:
        for name, w in saved.items():
            model.get_submodule(name).weight.data.copy_(w)


def bench_shape(label: str, latent: tuple, cfg: dict, rows: int, rank: int, device, dtype, text: int) -> dict:
    from diffserve.worker.models.lora import LoraLayers
    from diffserve.worker.models.wan import WanTransformer

    cuda = device.type == "cuda"
    model = our_model(WanTransformer, "WanTransformer3DModel", cfg, dtype, device)
    g = torch.Generator(device).manual_seed(1)
    x = torch.randn(rows, *latent, generator=g, device=device).to(dtype)
    t = torch.linspace(100.0, 900.0, rows, device=device)  # requests at different steps
    ctx = torch.randn(rows, text, cfg["text_dim"], generator=g, device=device).to(dtype)
    scales = [0.5 + 0.25 * i for i in range(rows)]

    def forward():
        return WanTransformer.forward(model, x, t, ctx)

    with torch.no_grad():
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        plain_ms = time_ms(forward, cuda=cuda)
        plain_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        layers = LoraLayers.install(model, names_of(model))
        weights = adapters(model, [f"a{i}" for i in range(rows)], rank, dtype, device)
        own = [[(w, s)] for w, s in zip(weights, scales)]
        shared = [[(weights[0], 1.0)]] * rows
        base_ms = time_ms(forward, cuda=cuda)

        def with_rows(per_row):
            def run():
                with layers.rows(per_row):
                    return forward()
            return run

        def cold():
            layers.plans.clear()  # forget the stacks: built again in this forward
            return with_rows(own)()

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        lora_ms = time_ms(with_rows(own), cuda=cuda)
        lora_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        lora_cold_ms = time_ms(cold, cuda=cuda)
        shared_ms = time_ms(with_rows(shared), cuda=cuda)
        ops = {k: count_ops(fn) for k, fn in (("base", forward), ("lora", with_rows(own)), ("shared", with_rows(shared)))}
        batched = with_rows(own)()
        err = max(rel_err(batched[i:i + 1], merged_row(model, x[i:i + 1], t[i:i + 1], ctx[i:i + 1], w, s))
                  for i, (w, s) in enumerate(zip(weights, scales)))
    tokens = rows * (latent[1] * (latent[2] // 2) * (latent[3] // 2))
    flops = wan_flops(cfg, dict(latent=latent, text=text)) * rows
    row = dict(
        model="wan-1.3b" if cfg is WAN_13B else "wan-tiny", shape=label, rows=rows, rank=rank, adapters=rows,
        targets="attn1/attn2 q,k,v,o + ffn (all blocks)", plain_ms=round(plain_ms, 2), base_ms=round(base_ms, 2),
        lora_ms=round(lora_ms, 2), lora_cold_ms=round(lora_cold_ms, 2), shared_ms=round(shared_ms, 2), overhead=round(lora_ms / base_ms - 1, 4),
        shared_overhead=round(shared_ms / base_ms - 1, 4), lora_flop_share=round(lora_flops(model, tokens, rows * text, rank) / flops, 4),
        base_ops=ops["base"], lora_ops=ops["lora"], shared_ops=ops["shared"],
        adapter_mib=round(weights[0].nbytes / 2**20, 1), err_vs_merged=f"{err:.2e}",
        plain_peak_gib=round(plain_peak, 2) if plain_peak is not None else "", lora_peak_gib=round(lora_peak, 2) if lora_peak is not None else "",
        dtype=str(dtype).removeprefix("torch."), card=card(),
    )
    del model, weights, layers
    free_memory()
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated: {','.join(SHAPES)}")
    p.add_argument("--rows", type=int, default=4, help="rows in the batch, each with its own adapter (default 4)")
    p.add_argument("--rank", type=int, default=64, help="adapter rank (default 64)")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny Wan on the CPU in float32 (checks the script; timings mean nothing)")
    p.add_argument("--out", default="", help="folder for the JSON (default $OUT, else bench/results; --tiny: a temporary folder)")
    args = p.parse_args(argv)
    if args.tiny:
        sys.path.insert(0, str(ROOT))
        from tests.fixtures.tiny.wan import TINY_WAN_TRANSFORMER

        torch.set_num_threads(1)
        device, dtype, cfg, text = torch.device("cpu"), torch.float32, TINY_WAN_TRANSFORMER, 16
        shapes, rank = {"tiny": (16, 3, 8, 8)}, min(args.rank, 4)
        out = args.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="lora-overhead-tiny-")
    else:
        device, dtype, cfg, text = torch.device("cuda"), torch.bfloat16, WAN_13B, TEXT
        unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
        if unknown:
            p.error(f"unknown shape(s) {unknown}; choose from {','.join(SHAPES)}")
        shapes, rank, out = {s: SHAPES[s] for s in args.shapes.split(",")}, args.rank, args.out or None
    rows = []
    for label, latent in shapes.items():
        rows.append(bench_shape(label, latent, cfg, args.rows, rank, device, dtype, text))
        print(json.dumps(rows[-1]), flush=True)
        path = write_json(results_name("lora"), rows, out)  # after each shape, so a later failure keeps these
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
