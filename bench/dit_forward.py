"""One DiT forward, diffserve vs diffusers: same full-size config and synthetic weights, bf16, same card, same run.

    python bench/dit_forward.py [--models wan-1.3b,wan-14b,flux.1-dev,qwen-image,hunyuan-video] [--compile default]
    python bench/dit_forward.py --tiny     (CPU, tiny configs, float32: checks the script itself)

Writes $OUT/<date>-<card>.json (a row per diffserve variant: eager per attention backend, compiled).
Weights come from bench/synthetic.py, built on the GPU: one side is built, run and freed before
the other, so a 20B model needs one copy of its weights. Each forward is timed with CUDA events
after warm-up (median of 5, or of 3 after one warm-up for models whose forward takes seconds);
peak memory is per side. Exactness: each side's bf16 output against a float32 run of diffusers;
for the models whose float32 run does not fit or costs minutes, at a smaller shape or depth
(the `exactness` column says which; bench/NOTES.md says why).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from common import card, print_table, rel_err, results_name, time_ms, write_json
from diffserve.kernels import attention as attn
from synthetic import diffusers_model, free_memory, our_model

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------
# Configs (diffusers' transformer/config.json of each released checkpoint)
# ---------------------------------------------------------------------------------------------

WAN_13B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6)
WAN_14B = dict(WAN_13B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
QWEN_IMAGE = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
                  joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
HUNYUAN_VIDEO = dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
                     num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
                     guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
                     rope_axes_dim=(16, 56, 56))

# ---------------------------------------------------------------------------------------------
# Model families: equal inputs for both sides, each side's call, the FLOP count
# ---------------------------------------------------------------------------------------------


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, device=g.device)


def mmdit_flops(blocks: int, tokens: int, dim: int) -> float:
    """Double- or single-stream block with a 4x MLP over `tokens` (text + image): QKV + out (8 T D^2)
    + MLP (16 T D^2) + attention (4 T^2 D). Modulation linears act on one vector: not counted."""
    return blocks * (24 * tokens * dim * dim + 4 * tokens * tokens * dim)


def wan_flops(cfg: dict, shape: dict) -> float:
    _, f, h, w = shape["latent"]
    pt, ph, pw = cfg["patch_size"]
    tokens, text = (f // pt) * (h // ph) * (w // pw), shape["text"]
    d, ffn, layers = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"], cfg["num_layers"]
    per_layer = (2 * tokens * d * d * 4 + 2 * tokens * d * d * 2 + 2 * text * d * d * 2 + 4 * tokens * tokens * d
                 + 4 * tokens * text * d + 2 * tokens * d * ffn * 2)
    return layers * per_layer


def wan_inputs(cfg: dict, shape: dict, device: torch.device, dtype: torch.dtype) -> dict:
    g = torch.Generator(device).manual_seed(1)
    return dict(x=_randn(g, 1, *shape["latent"]).to(dtype), t=torch.tensor([500.0], device=device),
                ctx=_randn(g, 1, shape["text"], cfg["text_dim"]).to(dtype))


def flux_inputs(cfg: dict, shape: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Packed latents on an (h, w) grid of 2x2 patches, T5 states, CLIP pooled, guidance 3.5."""
    g = torch.Generator(device).manual_seed(1)
    h, w = shape["grid"]
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return dict(x=_randn(g, 1, h * w, cfg["in_channels"]).to(dtype), ctx=_randn(g, 1, shape["text"], cfg["joint_attention_dim"]).to(dtype),
                pooled=_randn(g, 1, cfg["pooled_projection_dim"]).to(dtype), t=torch.tensor([0.5], device=device),
                t_train=torch.tensor([500.0], device=device),  # ours takes the sampler's timestep, diffusers t / 1000
                guidance=torch.tensor([3.5], device=device),
                img_ids=torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(h * w, 3).float(),  # (0, row, col)
                txt_ids=torch.zeros(shape["text"], 3, device=device))


def qwen_inputs(cfg: dict, shape: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Packed latents of one image ((frames, h, w) grid of 2x2 patches) and unpadded Qwen2.5-VL states."""
    g = torch.Generator(device).manual_seed(1)
    f, h, w = shape["grid"]
    return dict(x=_randn(g, 1, f * h * w, cfg["in_channels"]).to(dtype), t=torch.tensor([0.5], device=device),
                t_train=torch.tensor([500.0], device=device),  # ours takes the sampler's timestep, diffusers t / 1000
                text=_randn(g, 1, shape["text"], cfg["joint_attention_dim"]).to(dtype), grid=(f, h, w))


def hunyuan_inputs(cfg: dict, shape: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Latent video, LLaMA states with every token valid, CLIP pooled, embedded guidance 6.0 x 1000."""
    g = torch.Generator(device).manual_seed(1)
    s = shape["text"]
    return dict(x=_randn(g, 1, *shape["latent"]).to(dtype), t=torch.tensor([500.0], device=device),
                text=_randn(g, 1, s, cfg["text_embed_dim"]).to(dtype), mask=torch.ones(1, s, device=device),
                pooled=_randn(g, 1, cfg["pooled_projection_dim"]).to(dtype),
                guidance=(torch.tensor([6.0], device=device) * 1000.0).to(dtype),
                guidance_raw=torch.tensor([6.0], device=device))  # ours takes the scale as it is


def _tokens_hunyuan(cfg: dict, shape: dict) -> int:
    _, f, h, w = shape["latent"]
    return (f // cfg["patch_size_t"]) * (h // cfg["patch_size"]) * (w // cfg["patch_size"]) + shape["text"]


@dataclasses.dataclass(frozen=True)
class Family:
    """How to build, feed and count one DiT architecture on both sides."""

    diffusers_class: str
    our_class: Callable[[], type]  # imported lazily
    inputs: Callable[[dict, dict, torch.device, torch.dtype], dict]
    activations: tuple[str, ...]  # inputs cast to float32 for the reference run
    diffusers_call: Callable[[nn.Module, dict], torch.Tensor]
    ours_call: Callable[[nn.Module, dict], torch.Tensor]
    flops: Callable[[dict, dict], float]


def _wan_class():
    from diffserve.worker.models.wan import WanTransformer
    return WanTransformer


def _flux_class():
    from diffserve.worker.models.flux import FluxTransformer
    return FluxTransformer


def _qwen_class():
    from diffserve.worker.models.qwen_image import QwenImageTransformer
    return QwenImageTransformer


def _hunyuan_class():
    from diffserve.worker.models.hunyuan_video import HunyuanVideoTransformer
    return HunyuanVideoTransformer


WAN = Family(
    "WanTransformer3DModel", _wan_class, wan_inputs, ("x", "ctx"),
    lambda m, i: m(hidden_states=i["x"], timestep=i["t"], encoder_hidden_states=i["ctx"], return_dict=False)[0],
    lambda m, i: m(i["x"], i["t"], i["ctx"]),
    wan_flops,
)
FLUX = Family(
    "FluxTransformer2DModel", _flux_class, flux_inputs, ("x", "ctx", "pooled"),
    lambda m, i: m(hidden_states=i["x"], encoder_hidden_states=i["ctx"], pooled_projections=i["pooled"], timestep=i["t"],
                   img_ids=i["img_ids"], txt_ids=i["txt_ids"], guidance=i["guidance"], return_dict=False)[0],
    lambda m, i: m(i["x"], i["t_train"], i["ctx"], i["pooled"], i["img_ids"], i["txt_ids"], i["guidance"]),
    lambda c, s: mmdit_flops(c["num_layers"] + c["num_single_layers"], s["grid"][0] * s["grid"][1] + s["text"],
                             c["num_attention_heads"] * c["attention_head_dim"]),
)
QWEN = Family(
    "QwenImageTransformer2DModel", _qwen_class, qwen_inputs, ("x", "text"),
    lambda m, i: m(hidden_states=i["x"], timestep=i["t"], encoder_hidden_states=i["text"], encoder_hidden_states_mask=None,
                   img_shapes=[[i["grid"]]], return_dict=False)[0],
    lambda m, i: m(i["x"], i["t_train"], i["text"], None, [i["grid"]]),
    lambda c, s: mmdit_flops(c["num_layers"], s["grid"][0] * s["grid"][1] * s["grid"][2] + s["text"],
                             c["num_attention_heads"] * c["attention_head_dim"]),
)
HUNYUAN = Family(
    "HunyuanVideoTransformer3DModel", _hunyuan_class, hunyuan_inputs, ("x", "text", "pooled", "guidance"),
    lambda m, i: m(i["x"], i["t"], i["text"], i["mask"], i["pooled"], i["guidance"], return_dict=False)[0],
    lambda m, i: m(i["x"], i["t"], i["text"], [i["text"].shape[1]], i["pooled"], i["guidance_raw"]),
    lambda c, s: mmdit_flops(c["num_layers"] + c["num_single_layers"], _tokens_hunyuan(c, s),
                             c["num_attention_heads"] * c["attention_head_dim"]),
)


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked model: config and input shape for timing, and where exactness is measured.

    exact_shape: the float32 reference runs at this smaller input (the timed models produce the
    bf16 outputs at it too). exact_layers: the reference (and both bf16 sides) use a copy with
    only the first blocks (same synthetic weights), for models whose float32 copy does not fit."""

    family: Family
    config: dict
    shape: dict
    label: str
    slow: bool = False  # forward takes seconds: 1 warm-up + 3 timed instead of 2 + 5
    all_backends: bool = False  # one eager row per attention backend, else the auto dispatch only
    exact_shape: dict | None = None
    exact_label: str = ""
    exact_layers: dict | None = None  # config overrides, e.g. {"num_layers": 30}


# 480x832x81 -> latents (16, 21, 60, 104) -> 21*30*52 = 32,760 tokens; 720x1280x81 -> (16, 21, 90, 160) -> 75,600.
# FLUX / Qwen-Image 1024^2 -> 128x128 latents -> 64x64 = 4,096 packed tokens. HunyuanVideo 720x1280x33 -> (16, 9, 90, 160)
# -> 9*45*80 = 32,400 tokens (129 frames, 118,800 tokens, takes ~32 s per diffusers forward: too long here).
CASES = {
    "wan-1.3b": Case(WAN, WAN_13B, dict(latent=(16, 21, 60, 104), text=512), "480x832x81", all_backends=True),
    "wan-14b": Case(WAN, WAN_14B, dict(latent=(16, 21, 90, 160), text=512), "720x1280x81", slow=True,
                    exact_shape=dict(latent=(16, 6, 60, 104), text=512), exact_label="480x832x21"),
    "flux.1-dev": Case(FLUX, FLUX_DEV, dict(grid=(64, 64), text=512), "1024x1024"),
    "qwen-image": Case(QWEN, QWEN_IMAGE, dict(grid=(1, 64, 64), text=128), "1024x1024", exact_layers=dict(num_layers=30)),
    "hunyuan-video": Case(HUNYUAN, HUNYUAN_VIDEO, dict(latent=(16, 9, 90, 160), text=256), "720x1280x33", slow=True,
                          exact_shape=dict(latent=(16, 3, 90, 160), text=256), exact_label="720x1280x9"),
    # Small shapes (issue 15): launch-bound, where the host's per-call work shows.
    "wan-1.3b-image": Case(WAN, WAN_13B, dict(latent=(16, 1, 60, 104), text=512), "480x832x1"),
    "flux.1-dev-512": Case(FLUX, FLUX_DEV, dict(grid=(32, 32), text=512), "512x512"),
    "qwen-image-512": Case(QWEN, QWEN_IMAGE, dict(grid=(1, 32, 32), text=128), "512x512", exact_layers=dict(num_layers=30)),
}


def tiny_cases() -> dict[str, Case]:
    """The same cases with the tests' tiny configs (CPU, float32), each exercising its case's path."""
    sys.path.insert(0, str(ROOT))
    from tests.fixtures.tiny.flux import TINY_FLUX_TRANSFORMER
    from tests.fixtures.tiny.hunyuan_video import TINY_HUNYUAN_TRANSFORMER
    from tests.fixtures.tiny.qwen_image import TINY_QWEN_TRANSFORMER
    from tests.fixtures.tiny.wan import TINY_WAN_TRANSFORMER

    return {
        "wan-1.3b": Case(WAN, TINY_WAN_TRANSFORMER, dict(latent=(16, 3, 8, 8), text=16), "tiny", all_backends=True),
        "wan-14b": Case(WAN, dict(TINY_WAN_TRANSFORMER, num_layers=3), dict(latent=(16, 5, 8, 8), text=16), "tiny", slow=True,
                        exact_shape=dict(latent=(16, 2, 8, 8), text=16), exact_label="tiny-2f"),
        "flux.1-dev": Case(FLUX, TINY_FLUX_TRANSFORMER, dict(grid=(4, 6), text=12), "tiny"),
        "qwen-image": Case(QWEN, TINY_QWEN_TRANSFORMER, dict(grid=(1, 4, 6), text=7), "tiny", exact_layers=dict(num_layers=1)),
        "hunyuan-video": Case(HUNYUAN, TINY_HUNYUAN_TRANSFORMER, dict(latent=(4, 3, 8, 8), text=12), "tiny", slow=True,
                              exact_shape=dict(latent=(4, 2, 8, 8), text=12), exact_label="tiny-2f"),
    }


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Side:
    ms: float
    first_s: float  # first call at the timed shape: includes compilation for compiled variants
    peak_gib: float | None
    exact: torch.Tensor | None  # output at the exactness input, when this model gives it


def run_side(call: Callable[[dict], torch.Tensor], inputs: dict, exact_inputs: dict | None, slow: bool, cuda: bool) -> Side:
    """Exactness output (if asked), a first call, then the timed calls; peak memory over all of them."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    exact = call(exact_inputs) if exact_inputs is not None and exact_inputs is not inputs else None
    started = time.perf_counter()
    out = call(inputs)
    if cuda:
        torch.cuda.synchronize()
    first_s = time.perf_counter() - started
    if exact_inputs is inputs:
        exact = out
    out = None
    ms = time_ms(lambda: call(inputs), warmup=0 if slow else 2, repeat=3 if slow else 5, cuda=cuda)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return Side(ms, first_s, peak, exact)


def output_of(build: Callable[[], nn.Module], call: Callable[[nn.Module, dict], torch.Tensor], inputs: dict) -> torch.Tensor:
    model = build()
    out = call(model, inputs)
    del model
    free_memory()
    return out


def bench_case(name: str, case: Case, device: torch.device, dtype: torch.dtype, compile_modes: list[str]) -> list[dict]:
    fam, cfg = case.family, case.config
    cuda = device.type == "cuda"
    inputs = fam.inputs(cfg, case.shape, device, dtype)
    exact_inputs = inputs if case.exact_shape is None else fam.inputs(cfg, case.exact_shape, device, dtype)
    exact_cfg = {**cfg, **(case.exact_layers or {})}
    timed_gives_exact = case.exact_layers is None  # else reduced-depth copies give the exactness outputs

    def diffusers_side() -> Side:
        model = diffusers_model(fam.diffusers_class, cfg, dtype, device)
        return run_side(lambda i: fam.diffusers_call(model, i), inputs, exact_inputs if timed_gives_exact else None, case.slow, cuda)

    def our_sides() -> list[tuple[str, str, Side]]:
        model = our_model(fam.our_class(), fam.diffusers_class, cfg, dtype, device)
        backends = attn.available(device, dtype, cfg["attention_head_dim"]) if case.all_backends else ["auto"]
        sides = []
        for backend in backends:
            attn.configure(backend)
            sides.append((backend, "eager", run_side(lambda i: fam.ours_call(model, i), inputs,
                                                     exact_inputs if timed_gives_exact else None, case.slow, cuda)))
        attn.configure("auto")
        for mode in compile_modes:
            compiled = torch.compile(model, mode=None if mode == "default" else mode)
            # A second input shape would recompile (and may turn shapes dynamic): exactness only at the timed one.
            same = timed_gives_exact and exact_inputs is inputs
            sides.append((f"auto+compile:{mode}", f"compiled:{mode}", run_side(lambda i, c=compiled: fam.ours_call(c, i), inputs,
                                                                                 inputs if same else None, case.slow, cuda)))
        return sides

    with torch.no_grad():
        reference = diffusers_side()
        free_memory()
        ours = our_sides()
        if compile_modes:
            torch._dynamo.reset()  # compiled graphs hold the model: drop them before the next build
        free_memory()
        if timed_gives_exact:
            diffusers_bf16, ours_bf16 = reference.exact, {label: side.exact for label, _, side in ours}
        else:
            diffusers_bf16 = output_of(lambda: diffusers_model(fam.diffusers_class, exact_cfg, dtype, device), fam.diffusers_call, exact_inputs)
            ours_auto = output_of(lambda: our_model(fam.our_class(), fam.diffusers_class, exact_cfg, dtype, device), fam.ours_call, exact_inputs)
            ours_bf16 = {label: ours_auto if version == "eager" else None for label, version, _ in ours}
        ref_inputs = {k: v.float() if k in fam.activations else v for k, v in exact_inputs.items()}
        fp32 = output_of(lambda: diffusers_model(fam.diffusers_class, exact_cfg, torch.float32, device), fam.diffusers_call, ref_inputs)

    if case.exact_layers:
        layers = ", ".join(f"{k} {v} of {cfg[k]}" for k, v in case.exact_layers.items())
        exactness = f"fp32 diffusers, {case.label}, {layers}"
    else:
        exactness = f"fp32 diffusers, {case.exact_label or case.label}"
    flops = fam.flops(cfg, case.shape)
    diffusers_err = f"{rel_err(diffusers_bf16, fp32):.2e}"
    rows = []
    for label, version, side in ours:
        out = ours_bf16[label]
        rows.append(dict(
            model=name, shape=case.label, card=card(), attention=label, version=version,
            diffserve_ms=round(side.ms, 1), diffusers_ms=round(reference.ms, 1), ratio=round(side.ms / reference.ms, 3),
            tflops=round(flops / side.ms / 1e9), diffusers_tflops=round(flops / reference.ms / 1e9),
            diffserve_err=f"{rel_err(out, fp32):.2e}" if out is not None else "", diffusers_err=diffusers_err, exactness=exactness,
            diffserve_peak_gib=round(side.peak_gib, 1) if side.peak_gib is not None else "",
            diffusers_peak_gib=round(reference.peak_gib, 1) if reference.peak_gib is not None else "",
            compile_s=round(side.first_s) if version != "eager" else "", flop=f"{flops:.3e}",
        ))
    return rows


COLUMNS = ["model", "shape", "attention", "diffserve_ms", "diffusers_ms", "ratio", "tflops", "diffserve_err", "diffusers_err",
           "diffserve_peak_gib", "diffusers_peak_gib", "compile_s", "exactness", "card"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="all", help=f"comma-separated, or all: {','.join(CASES)}")
    p.add_argument("--compile", default="", help="comma-separated torch.compile modes to time as well (default, max-autotune-no-cudagraphs)")
    p.add_argument("--tiny", action="store_true", help="tiny configs on the CPU in float32 (checks the script; timings mean nothing)")
    p.add_argument("--out", default="", help="folder for the JSON (default $OUT, else bench/results; --tiny: a temporary folder)")
    args = p.parse_args(argv)
    cases = tiny_cases() if args.tiny else CASES
    names = list(cases) if args.models == "all" else args.models.split(",")
    unknown = [n for n in names if n not in cases]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {','.join(cases)}")
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared machine
        out = args.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="dit-forward-tiny-")
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        out = args.out or None
    modes = [m for m in args.compile.split(",") if m]
    rows = []
    for name in names:
        started = time.perf_counter()
        rows += bench_case(name, cases[name], device, dtype, modes)
        path = write_json(results_name(), rows, out)  # after each model, so a later failure keeps these
        print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
        print_table(rows, COLUMNS)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
