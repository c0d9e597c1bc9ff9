"""One DiT forward, diffserve vs diffusers, same full-size config and random weights, bf16, same card.

python bench/dit_forward.py [--models wan-1.3b]   (GPU; writes $OUT/dit_forward.json)

Both sides load the same checkpoint folder with their from_pretrained (diffusers keeps its
fp32 modules; so do we). Exactness: each side's bf16 output against a float32 run of diffusers.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from common import card, print_table, rel_err, time_ms, write_json
from diffserve.kernels import attention as attn

WAN_13B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6)
# 480x832, 81 frames → latents (16, 21, 60, 104) → 21*30*52 = 32,760 tokens.
MODELS = {"wan-1.3b": (WAN_13B, (16, 21, 60, 104), "480x832x81")}


def wan_flops(cfg: dict, tokens: int, text: int = 512) -> float:
    d, ffn, layers = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"], cfg["num_layers"]
    per_layer = 2 * tokens * d * d * 4 + 2 * tokens * d * d * 2 + 2 * text * d * d * 2 + 4 * tokens * tokens * d + 4 * tokens * text * d + 2 * tokens * d * ffn * 2
    return layers * per_layer


def bench_wan(name: str, cfg: dict, latent_shape: tuple, shape_label: str, compile_modes: list[str]) -> list[dict]:
    from diffusers import WanTransformer3DModel

    from diffserve.worker.models.wan import WanTransformer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        with torch.device("cuda"):
            WanTransformer3DModel(**cfg).to(torch.bfloat16).save_pretrained(tmp)
        torch.cuda.empty_cache()
        ref_model = WanTransformer3DModel.from_pretrained(tmp, torch_dtype=torch.bfloat16).cuda().eval()
        ours = WanTransformer.from_pretrained(tmp, torch.bfloat16, "cuda").eval()
    g = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(1, *latent_shape, device="cuda", generator=g).to(torch.bfloat16)
    t = torch.tensor([500.0], device="cuda")
    ctx = torch.randn(1, 512, cfg["text_dim"], device="cuda", generator=g).to(torch.bfloat16)
    tokens = latent_shape[1] * (latent_shape[2] // 2) * (latent_shape[3] // 2)
    flops = wan_flops(cfg, tokens)

    with torch.no_grad():
        ref_out = ref_model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
        diffusers_ms = time_ms(lambda: ref_model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False))
        ref_model.float()
        fp32 = ref_model(hidden_states=x.float(), timestep=t, encoder_hidden_states=ctx.float(), return_dict=False)[0]
        ref_model = None  # free its memory before timing ours
        torch.cuda.empty_cache()
        diffusers_err = rel_err(ref_out, fp32)
        for backend in attn.available(x.device, x.dtype, cfg["attention_head_dim"]):
            attn.configure(backend)
            out = ours(x, t, ctx)
            torch.cuda.reset_peak_memory_stats()
            ms = time_ms(lambda: ours(x, t, ctx))
            rows.append(dict(model=name, shape=shape_label, card=card(), attention=backend, diffserve_ms=round(ms, 1),
                             diffusers_ms=round(diffusers_ms, 1), ratio=round(ms / diffusers_ms, 3),
                             tflops=round(flops / ms / 1e9), diffserve_err=f"{rel_err(out, fp32):.2e}",
                             diffusers_err=f"{diffusers_err:.2e}", peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1)))
        attn.configure("auto")
        for mode in compile_modes:
            import time

            compiled = torch.compile(ours, mode=None if mode == "default" else mode)
            started = time.perf_counter()
            out = compiled(x, t, ctx)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - started
            ms = time_ms(lambda: compiled(x, t, ctx))
            rows.append(dict(model=name, shape=shape_label, card=card(), attention=f"{attn.backend_for(x.new_empty(1, 1, 1, cfg['attention_head_dim']))}+compile:{mode}",
                             diffserve_ms=round(ms, 1), diffusers_ms=round(diffusers_ms, 1), ratio=round(ms / diffusers_ms, 3),
                             tflops=round(flops / ms / 1e9), diffserve_err=f"{rel_err(out, fp32):.2e}",
                             diffusers_err=f"{diffusers_err:.2e}", compile_s=round(compile_s)))
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--compile", default="", help="comma-separated torch.compile modes to time as well (default, max-autotune-no-cudagraphs)")
    args = p.parse_args()
    rows = []
    for name in args.models.split(","):
        rows += bench_wan(name, *MODELS[name], [m for m in args.compile.split(",") if m])
    write_json("dit_forward.json", rows)
    print_table(rows, ["model", "shape", "attention", "diffserve_ms", "diffusers_ms", "ratio", "tflops", "diffserve_err", "diffusers_err", "peak_gib", "compile_s", "card"])


if __name__ == "__main__":
    main()
